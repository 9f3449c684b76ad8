"""effllm: pruning-aware pretraining of edge language models (EfficientLLM, arXiv 2502.06663).

Importing effllm registers the EfficientLLM classes with transformers' Auto classes, and marks them
so that ``save_pretrained`` copies configuration_effllm.py / modeling_effllm.py into the model
directory with an ``auto_map``: the directory then loads with trust_remote_code where effllm is absent.
"""

import logging

# transformers imports torchao, which logs a warning for each CUDA-only kernel library it cannot load
# on a CPU machine, and torch's pytree warns about torchao's enums: noise for every effllm command.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from .configuration_effllm import EfficientLLMConfig, EfficientLLMConfigError  # noqa: E402
from .modeling_effllm import EfficientLLMForCausalLM, EfficientLLMModel  # noqa: E402

__version__ = "0.1.0"

AutoConfig.register(EfficientLLMConfig.model_type, EfficientLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(EfficientLLMConfig, EfficientLLMForCausalLM, exist_ok=True)
EfficientLLMConfig.register_for_auto_class()
EfficientLLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["EfficientLLMConfig", "EfficientLLMConfigError", "EfficientLLMForCausalLM", "EfficientLLMModel"]
