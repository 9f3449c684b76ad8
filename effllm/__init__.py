"""effllm: pruning-aware pretraining of edge language models (EfficientLLM, arXiv 2502.06663).

``import effllm`` has no side effects on the process: it imports neither torch nor transformers,
registers nothing and changes no logging, so ``effllm.runtime.onnx_backend`` (numpy + onnxruntime +
tokenizers) runs without torch. The model classes load on first use (PEP 562):
``from effllm import EfficientLLMForCausalLM`` (or any name in ``__all__``) imports
effllm.model.modeling_effllm, whose last lines register the classes with transformers' AutoConfig and
AutoModelForCausalLM and make ``save_pretrained`` copy the model code into the directory with an
``auto_map``. That is the only registration; a saved directory also loads with trust_remote_code
where effllm is absent.
"""

import importlib
import logging

__version__ = "0.1.0"

_LAZY = {
    "EfficientLLMConfig": "model.configuration_effllm",
    "EfficientLLMConfigError": "model.configuration_effllm",
    "EfficientLLMForCausalLM": "model.modeling_effllm",
    "EfficientLLMModel": "model.modeling_effllm",
}
__all__ = list(_LAZY)

# transformers imports torchao, which logs a warning for each CUDA-only kernel library it cannot load
# on a CPU machine, and torch's pytree warns about torchao's enums: noise, not news, for our commands.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def __getattr__(name: str):
    if name in _LAZY:
        # Through modeling_effllm for every name: the classes effllm hands out always come registered.
        importlib.import_module(".model.modeling_effllm", __name__)
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quiet_library_logs() -> None:
    """Silence NOISY_LOGGERS below ERROR. For a command's entry point (before transformers loads),
    never on import: a library must not change its user's logging."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
