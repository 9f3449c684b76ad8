"""effllm: pruning-aware pretraining of edge language models (EfficientLLM, arXiv 2502.06663).

Importing effllm registers the EfficientLLM classes with transformers' Auto classes, and marks them
so that ``save_pretrained`` copies configuration_effllm.py / modeling_effllm.py into the model
directory with an ``auto_map``: the directory then loads with trust_remote_code where effllm is absent.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_effllm import EfficientLLMConfig, EfficientLLMConfigError
from .modeling_effllm import EfficientLLMForCausalLM, EfficientLLMModel

__version__ = "0.1.0"

AutoConfig.register(EfficientLLMConfig.model_type, EfficientLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(EfficientLLMConfig, EfficientLLMForCausalLM, exist_ok=True)
EfficientLLMConfig.register_for_auto_class()
EfficientLLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["EfficientLLMConfig", "EfficientLLMConfigError", "EfficientLLMForCausalLM", "EfficientLLMModel"]
