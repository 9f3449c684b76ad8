"""EfficientLLM configuration: a Llama-family decoder whose layers may each have their own shapes.

This file is copied into every saved model directory (see ``auto_map``), so it must depend on
nothing but transformers: a machine without effllm loads the model with trust_remote_code. (Where
effllm is installed, EfficientLLMConfigError is an ``effllm.common.errors.EffllmError``; elsewhere a
ValueError.) It registers nothing: the Auto-class registration is at the end of modeling_effllm.py.

Per-layer shapes follow transformers 5's heterogeneous-config convention: the global
``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` are defaults and
``per_layer_config={i: {...}}`` overrides them for layer i. Reading a global per-layer attribute of an
irregular config raises ``AmbiguousGlobalPerLayerAttributeError``, which catches code that assumes
uniform shapes. Use ``config.layer_shapes()`` or ``config.per_layer_config[i]`` instead.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

try:
    from effllm.common.errors import EffllmError
except ImportError:  # the copy in a model directory, loaded with trust_remote_code where effllm is absent
    EffllmError = ValueError  # transformers skips imports inside try blocks when it checks a copy's requirements

PER_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")



def uniform_shape(shapes: list[tuple[int, int, int]]) -> tuple[int, int, int] | None:
    """The (heads, KV heads, FFN width) all ``shapes`` share, when they share one with no zero; else None.
    What stock loaders and llama.cpp's plain llama architecture can hold."""
    first = shapes[0] if shapes else None
    return first if first is not None and 0 not in first and all(s == first for s in shapes) else None

class EfficientLLMConfigError(EffllmError):
    """A config that cannot describe a runnable model; the message says what to fix."""


# What each field must be: a config.json from elsewhere with "num_hidden_layers": "thirty" is a clear
# error here, not a TypeError deep in the model's construction.
INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings")
OPTIONAL_INT_FIELDS = ("head_dim", "pad_token_id", "bos_token_id")
NUMBER_FIELDS = ("initializer_range", "rms_norm_eps", "attention_dropout")
BOOL_FIELDS = ("use_cache", "tie_word_embeddings", "attention_bias", "mlp_bias")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(fields: dict) -> None:
    def wrong(name: str, expected: str):
        return EfficientLLMConfigError(f"{name} must be {expected}, not {fields[name]!r}")

    for name in INT_FIELDS:
        if not _is_int(fields[name]):
            raise wrong(name, "an integer")
    for name in OPTIONAL_INT_FIELDS:
        if fields[name] is not None and not _is_int(fields[name]):
            raise wrong(name, "an integer or null")
    for name in NUMBER_FIELDS:
        if not (_is_int(fields[name]) or isinstance(fields[name], float)):
            raise wrong(name, "a number")
    for name in BOOL_FIELDS:
        if not isinstance(fields[name], bool):
            raise wrong(name, "true or false")
    for name in PER_LAYER_FIELDS:
        value = fields[name]
        if not (value is None or _is_int(value) or (isinstance(value, (list, tuple)) and all(map(_is_int, value)))):
            raise wrong(name, "an integer or a list of integers")
    eos = fields["eos_token_id"]
    if not (eos is None or _is_int(eos) or (isinstance(eos, list) and all(map(_is_int, eos)))):
        raise wrong("eos_token_id", "an integer, a list of integers or null")
    for key, entry in (fields["per_layer_config"] or {}).items():
        if not isinstance(entry, dict) or not all(_is_int(v) for v in entry.values()):
            raise EfficientLLMConfigError(f"per_layer_config[{key}] must map field names to integers, not {entry!r}")
        try:
            int(key)
        except (TypeError, ValueError):
            raise EfficientLLMConfigError(f"per_layer_config has key {key!r}, not a layer number") from None


class EfficientLLMConfig(PretrainedConfig):
    model_type = "effllm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 576,
        num_hidden_layers: int = 30,
        num_attention_heads: int | list[int] = 9,
        num_key_value_heads: int | list[int] | None = None,
        intermediate_size: int | list[int] = 1536,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        attention_dropout: float = 0.0,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        per_layer_config: dict | None = None,
        **kwargs: Any,
    ):
        _check_types(locals())
        # Lists are the convenient way to say "one value per layer"; they become per_layer_config.
        per_layer_lists = {
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "intermediate_size": intermediate_size,
        }
        if num_key_value_heads is None:
            per_layer_lists["num_key_value_heads"] = num_attention_heads
        globals_ = {}
        overrides: dict[int, dict[str, Any]] = {}
        for name, value in per_layer_lists.items():
            if isinstance(value, (list, tuple)):
                if len(value) != num_hidden_layers:
                    raise EfficientLLMConfigError(
                        f"{name} has {len(value)} entries but num_hidden_layers is {num_hidden_layers}; "
                        f"give one entry per layer"
                    )
                globals_[name] = int(max(value)) if value else 0
                for i, v in enumerate(value):
                    overrides.setdefault(i, {})[name] = int(v)
            else:
                globals_[name] = int(value)
        if per_layer_config:
            for key, entry in per_layer_config.items():
                overrides.setdefault(int(key), {}).update(entry)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = globals_["num_attention_heads"]
        self.num_key_value_heads = globals_["num_key_value_heads"]
        self.intermediate_size = globals_["intermediate_size"]
        self.head_dim = head_dim if head_dim is not None else hidden_size // max(self.num_attention_heads, 1)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.attention_dropout = attention_dropout
        self.rope_parameters = rope_parameters
        self._validate_dims()
        self._validate_overrides(overrides)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            per_layer_config=overrides or None,
            **kwargs,
        )
        # Write every layer's shapes into config.json, not only the ones that differ: the file is
        # then readable by a person and by tools that do not know the sparse convention.
        self.serialize_explicit_per_layer_config = True
        self.validate_shapes()

    def _validate_overrides(self, overrides: dict[int, dict[str, Any]]) -> None:
        for idx, entry in overrides.items():
            if not 0 <= idx < self.num_hidden_layers:
                raise EfficientLLMConfigError(
                    f"per_layer_config names layer {idx} but the model has {self.num_hidden_layers} layers "
                    f"(0..{self.num_hidden_layers - 1}); remove the entry or fix num_hidden_layers"
                )
            unknown = set(entry) - set(PER_LAYER_FIELDS)
            if unknown:
                raise EfficientLLMConfigError(
                    f"per_layer_config[{idx}] sets {sorted(unknown)}; only {list(PER_LAYER_FIELDS)} may vary per layer"
                )

    # ---- per-layer shapes -------------------------------------------------------------------
    def layer_shapes(self) -> list[tuple[int, int, int]]:
        """(query heads, KV heads, FFN width) for every layer."""
        shapes = []
        for layer in self.per_layer_config:
            shapes.append((layer.num_attention_heads, layer.num_key_value_heads, layer.intermediate_size))
        return shapes

    def uniform_layer_shape(self) -> tuple[int, int, int] | None:
        """The one shape every layer has, none of it zero (a --shape uniform model); None otherwise."""
        return uniform_shape(self.layer_shapes())

    def attention_layer_indices(self) -> list[int]:
        """Layers that have attention; the KV cache (and ONNX past/present) is indexed by position in this list."""
        return [i for i, (heads, _, _) in enumerate(self.layer_shapes()) if heads > 0]

    def set_layer_shapes(self, shapes: list[tuple[int, int, int]]) -> None:
        """Replace every layer's shapes (used by pruning surgery); validates the result."""
        if len(shapes) != self.num_hidden_layers:
            raise EfficientLLMConfigError(f"got {len(shapes)} layer shapes for {self.num_hidden_layers} layers")
        heads, kv, ffn = (list(col) for col in zip(*shapes))
        overrides = {
            i: {"num_attention_heads": heads[i], "num_key_value_heads": kv[i], "intermediate_size": ffn[i]}
            for i in range(self.num_hidden_layers)
        }
        self.per_layer_config = None  # drop the old spec so the globals can be rewritten
        self.num_attention_heads, self.num_key_value_heads, self.intermediate_size = max(heads), max(kv), max(ffn)
        self.per_layer_config = overrides
        self.validate_shapes()

    def _validate_dims(self) -> None:
        if self.hidden_size <= 0 or self.num_hidden_layers <= 0 or self.vocab_size <= 0:
            raise EfficientLLMConfigError(
                "hidden_size, num_hidden_layers and vocab_size must be positive "
                f"(got {self.hidden_size}, {self.num_hidden_layers}, {self.vocab_size})"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise EfficientLLMConfigError(f"head_dim must be a positive even number for RoPE (got {self.head_dim})")

    def validate_shapes(self) -> None:
        self._validate_dims()
        for i, (heads, kv, ffn) in enumerate(self.layer_shapes()):
            if heads < 0 or kv < 0 or ffn < 0:
                raise EfficientLLMConfigError(
                    f"layer {i}: sizes must be >= 0 (heads={heads}, kv_heads={kv}, intermediate_size={ffn})"
                )
            if (heads == 0) != (kv == 0):
                raise EfficientLLMConfigError(
                    f"layer {i}: {heads} query heads with {kv} KV heads; both must be zero or both positive"
                )
            if heads and heads % kv:
                raise EfficientLLMConfigError(
                    f"layer {i}: num_attention_heads ({heads}) is not divisible by num_key_value_heads ({kv}); "
                    f"every KV head must serve the same number of query heads"
                )


__all__ = ["EfficientLLMConfig", "EfficientLLMConfigError"]
