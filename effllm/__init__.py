"""effllm: pruning-aware pretraining of edge language models (EfficientLLM, arXiv 2502.06663).

Importing effllm registers the EfficientLLM classes with transformers' Auto classes, and marks them
so that ``save_pretrained`` copies configuration_effllm.py / modeling_effllm.py into the model
directory with an ``auto_map``: the directory then loads with trust_remote_code where effllm is absent.

The import itself stays light: torch and transformers load only when something needs them, so
``effllm.runtime.onnx_backend`` (numpy + onnxruntime + tokenizers) runs without importing torch. The
registration (at the end of modeling_effllm.py) happens at once if transformers is already imported,
else right after transformers is, or on first use of an effllm model class, whichever comes first.
"""

import importlib
import importlib.abc
import importlib.util
import logging
import sys

# transformers imports torchao, which logs a warning for each CUDA-only kernel library it cannot load
# on a CPU machine, and torch's pytree warns about torchao's enums: noise for every effllm command.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__version__ = "0.1.0"

_LAZY = {
    "EfficientLLMConfig": "configuration_effllm",
    "EfficientLLMConfigError": "configuration_effllm",
    "EfficientLLMForCausalLM": "modeling_effllm",
    "EfficientLLMModel": "modeling_effllm",
}
__all__ = list(_LAZY)


def __getattr__(name: str):  # PEP 562: `from effllm import EfficientLLMForCausalLM` imports torch only then
    if name in _LAZY:
        importlib.import_module(".modeling_effllm", __name__)  # registers the Auto classes too
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds transformers like the normal finders do, then imports modeling_effllm once it has loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one use; also keeps the find_spec below from reaching us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def load_then_register(module):
            load(module)
            # If an effllm model module is what imports transformers, it is half initialised now and
            # registers the classes at its own end; importing modeling_effllm here would be circular.
            if not any(f"{__name__}.{name}" in sys.modules for name in ("configuration_effllm", "modeling_effllm")):
                importlib.import_module(".modeling_effllm", __name__)

        spec.loader.exec_module = load_then_register
        return spec


if "transformers" in sys.modules:
    importlib.import_module(".modeling_effllm", __name__)
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
