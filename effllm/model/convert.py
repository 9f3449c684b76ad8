"""Import a Llama-family checkpoint (hub id, local directory or GGUF file) as an EfficientLLM.

Supported: LlamaForCausalLM (SmolLM, SmolLM2, Llama 3.x), Qwen2ForCausalLM (q/k/v bias) and
MistralForCausalLM. Parameter names are the same as Llama's, so the state dict moves over as is;
the result has uniform shapes until pruning makes them irregular.
"""

from __future__ import annotations

import logging
import os

import torch

from effllm.common.errors import EffllmError, first_line
from effllm.model.configuration_effllm import EfficientLLMConfig
from effllm.model.file_checks import gguf_problem
from effllm.model.gguf_source import gguf_location, is_gguf_file
from effllm.model.model_dir import check_model_files
from effllm.model.modeling_effllm import EfficientLLMForCausalLM, EfficientLLMRotaryEmbedding

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    EfficientLLMConfig.model_type: "EfficientLLMForCausalLM",
}


class UnsupportedSourceError(EffllmError):
    """The source is not a model effllm can import; the message names what is supported."""


def source_location(source: str | os.PathLike) -> tuple[str, dict]:
    """(what transformers' from_pretrained takes first, its extra keyword arguments) for a source: a
    GGUF file is its directory plus ``gguf_file``; a directory or hub id is itself."""
    if is_gguf_file(source):
        problem = gguf_problem(source)
        if problem:
            raise UnsupportedSourceError(f"{problem}; give a GGUF model file, a model directory or a hub id")
        directory, name = gguf_location(source)
        return directory, {"gguf_file": name}
    return str(source), {}


def load_source_config(source: str | os.PathLike):
    """The source's transformers config, or a one-line error saying what is wrong with ``source``."""
    from transformers import AutoConfig

    where, kwargs = source_location(source)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, TypeError, ImportError) as err:
        raise UnsupportedSourceError(
            f"cannot read a model config from {str(source)!r} ({first_line(err)}); give a local model directory, "
            f"a GGUF file or a Hugging Face hub id of a {'/'.join(sorted(set(SUPPORTED_MODEL_TYPES.values())))} checkpoint"
        ) from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        arch = (getattr(config, "architectures", None) or [config.model_type])[0]
        raise UnsupportedSourceError(
            f"{str(source)!r} is a {arch}; effllm imports only "
            f"{', '.join(sorted(set(SUPPORTED_MODEL_TYPES.values())))} checkpoints"
        )
    return config


def effllm_config_from_source(src) -> EfficientLLMConfig:
    """The uniform EfficientLLMConfig that describes the same network as a Llama/Qwen2/Mistral config."""
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    window = getattr(src, "sliding_window", None)
    if src.model_type == "mistral" and window is not None and window < src.max_position_embeddings:
        logger.warning(
            "source uses a %d-token sliding window; EfficientLLM attends to the full context, "
            "so outputs differ only for sequences longer than %d tokens",
            window,
            window,
        )
    rope = dict(src.rope_parameters) if getattr(src, "rope_parameters", None) else None
    return EfficientLLMConfig(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=getattr(src, "num_key_value_heads", None) or src.num_attention_heads,
        intermediate_size=src.intermediate_size,
        head_dim=head_dim,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        initializer_range=getattr(src, "initializer_range", 0.02),
        rms_norm_eps=src.rms_norm_eps,
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)),
        rope_parameters=rope,
        # Qwen2 always has q/k/v biases and its config has no attention_bias field.
        attention_bias=bool(getattr(src, "attention_bias", src.model_type == "qwen2")),
        mlp_bias=bool(getattr(src, "mlp_bias", False)),
        pad_token_id=getattr(src, "pad_token_id", None),
        bos_token_id=getattr(src, "bos_token_id", None),
        eos_token_id=getattr(src, "eos_token_id", None),
    )


def from_source_model(source_model, dtype: torch.dtype | None = None) -> EfficientLLMForCausalLM:
    """An EfficientLLM with exactly the weights of an in-memory Llama/Qwen2/Mistral model."""
    if source_model.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedSourceError(
            f"a {type(source_model).__name__} cannot be imported; effllm imports only "
            f"{', '.join(sorted(set(SUPPORTED_MODEL_TYPES.values())))}"
        )
    config = effllm_config_from_source(source_model.config)
    state = source_model.state_dict()
    dtype = dtype or next(iter(state.values())).dtype
    # Build on the meta device and adopt the source tensors: no second random init of a large model.
    with torch.device("meta"):
        model = EfficientLLMForCausalLM(config)
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UnsupportedSourceError(
            f"source weights do not match the Llama layout (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.model.rotary_emb = EfficientLLMRotaryEmbedding(config)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.generation_config = source_model.generation_config
    return model.eval()


def from_pretrained(source: str | os.PathLike, dtype: torch.dtype | None = torch.float32, tokenizer: bool = True):
    """Load ``source`` (hub id, directory or GGUF file) as an EfficientLLM; returns (model, tokenizer or None).

    An effllm model directory (for example a previous run's result) loads as it is.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isfile(os.path.join(source, "config.json")):
        check_model_files(source)  # a local directory: its config and weights, before transformers reads them
    src_config = load_source_config(source)
    where, kwargs = source_location(source)
    if src_config.model_type == EfficientLLMConfig.model_type:
        model = EfficientLLMForCausalLM.from_pretrained(where, dtype=dtype).eval()
    else:  # only architectures transformers ships (SUPPORTED_MODEL_TYPES), never a directory's own code
        source_model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=False, **kwargs)
        model = from_source_model(source_model, dtype=dtype)
        del source_model
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(where, trust_remote_code=False, **kwargs)
        except (OSError, ValueError) as err:
            logger.warning("no tokenizer found with %s (%s); continuing without one", source, err)
    return model, tok
