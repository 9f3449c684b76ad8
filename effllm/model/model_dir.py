"""Loading a model directory with effllm's installed classes, never with code from the directory.

Every saved directory holds copies of configuration_effllm.py / modeling_effllm.py (with an
``auto_map``) so that plain transformers loads it where effllm is absent. Where effllm is installed,
every effllm command loads it with the installed classes (registered with the Auto classes by
modeling_effllm) and ``trust_remote_code=False``: a directory someone sent cannot run code. A copy
that differs from the installed file gets one warning line, since it is not what runs.

The files are checked before transformers reads them: a config.json of the wrong types, a
truncated or corrupt safetensors file is a BadModelFileError (one line, exit 2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from effllm.common.errors import first_line
from effllm.model.configuration_effllm import EfficientLLMConfig, EfficientLLMConfigError
from effllm.model.file_checks import BadModelFileError, check_weights, warn_if_code_differs
from effllm.model.modeling_effllm import EfficientLLMForCausalLM  # importing it registers the Auto classes


def check_model_files(model_dir: str | os.PathLike) -> dict:
    """config.json as a dict, after checking it and the weights; BadModelFileError naming what is wrong."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadModelFileError(
            f"{config_path} is not readable JSON ({first_line(err)}); save the model again"
        ) from None
    if not isinstance(raw, dict):
        raise BadModelFileError(f"{config_path} holds a JSON {type(raw).__name__}, not an object; save the model again")
    if raw.get("model_type") == EfficientLLMConfig.model_type:
        try:
            EfficientLLMConfig.from_dict(raw)
        except (EfficientLLMConfigError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise BadModelFileError(
                f"{config_path} does not describe a valid EfficientLLM ({first_line(err)}); fix or re-save it"
            ) from None
        warn_if_code_differs(model_dir)
    check_weights(model_dir)
    return raw


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype | str = torch.float32, **kwargs):
    """The model in ``model_dir`` (an effllm directory, or any architecture transformers ships), eval mode."""
    from transformers import AutoModelForCausalLM

    raw = check_model_files(model_dir)
    effllm_dir = raw.get("model_type") == EfficientLLMConfig.model_type
    loader = EfficientLLMForCausalLM if effllm_dir else AutoModelForCausalLM
    try:
        model = loader.from_pretrained(model_dir, trust_remote_code=False, dtype=dtype, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        raise BadModelFileError(
            f"cannot load the model in {model_dir} ({first_line(err)}); effllm loads effllm directories and the "
            "architectures transformers ships, never a directory's own code"
        ) from None
    return model.eval()


def load_tokenizer(model_dir: str | os.PathLike, **kwargs):
    """The tokenizer in ``model_dir``, without any code of the directory's (no trust_remote_code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise BadModelFileError(
            f"cannot load the tokenizer in {model_dir} ({first_line(err)}); save it again"
        ) from None
