"""GGUF export: an EfficientLLM model as llama.cpp's "deci" architecture, written with the gguf package.

llama.cpp's deci architecture (NVIDIA's Nemotron/DeciLM) is the one whose hyperparameters may be per-layer
arrays: `deci.attention.head_count`, `deci.attention.head_count_kv` and `deci.feed_forward_length`, where 0
means the layer has no attention / no FFN. That is exactly effllm's per-layer shape, so an irregular model
needs no padding to a uniform one. What else the file must say (docs/formats.md, "GGUF"):
  * the head size explicitly (`attention.key_length` / `value_length`): llama.cpp's default is
    n_embd / n_head(layer 0), which pruning makes meaningless; `rope.dimension_count` equal to it;
  * q/k rows (and their biases) permuted per head from Hugging Face's rotate_half RoPE layout (pairs i,
    i + d/2) to llama.cpp's interleaved one (pairs 2i, 2i + 1): deci uses llama.cpp's "NORM" RoPE;
  * Qwen2's q/k/v biases and MLP biases as `blk.N.attn_q.bias`, ..., `ffn_down.bias`: deci's graph adds
    each one when the layer has it (llama.cpp's own qwen2 architecture cannot serve a pruned model: its
    loader sizes every layer's tensors by layer 0's head and FFN counts; docs/formats.md, "GGUF");
  * the byte-level BPE tokenizer as `tokenizer.ggml.model` "gpt2" with the pre-tokenizer that splits
    text as the Hugging Face one does (PRE_TOKENIZERS), so llama.cpp produces the same token ids.

Stand-ins (STANDINS): llama.cpp's deci graph mishandles some zero-width blocks, so the writer replaces them
with blocks that add exactly zero to the residual stream (all-zero weights): see STANDINS for which and why.
The verification (verify.py) checks the file in llama.cpp against torch, stand-ins included.

Anything llama.cpp's deci path cannot express (RoPE scaling other than linear, an activation
other than SiLU, a tokenizer whose splitting has no llama.cpp counterpart) is refused up front by
:func:`check_gguf_expressible`, with a one-line EffllmError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from effllm.common.errors import EffllmError

ARCH = "deci"
# A model whose layers all have one nonzero shape (--shape uniform) is written as llama.cpp's plain llama, which
# every GGUF runtime reads (ollama, LM Studio, llama.cpp's server); llama's graph adds q/k/v/FFN biases when present.
PLAIN_ARCH = "llama"
GGUF_FILE = "model.gguf"
GGUF_DTYPES = ("f16", "f32")
STANDIN_FFN = 32  # width of an all-zero stand-in FFN: one Q4_0/Q8_0 block, so quantizing keeps it quantized

# The zero-width patterns llama.cpp's deci code gets wrong, each replaced by an exact no-op stand-in.
# Each still happens when written natively, in llama-cpp-python 0.3.36's llama.cpp and in llama.cpp b11549:
STANDINS = {
    # src/models/deci.cpp: `if (n_ff == 0) continue;` also skips `inpL = cur`, dropping the layer's
    # attention output (wrong logits). Stand-in: an all-zero FFN of width STANDIN_FFN.
    "ffn_after_attention": "an attention layer without FFN gets an all-zero FFN",
    # The same `continue` in the last layer skips selecting the output rows: llama_decode aborts the
    # process (GGML_ASSERT). Stand-in: an all-zero FFN, also when the last layer has no attention either.
    "ffn_last_layer": "a last layer without FFN gets an all-zero FFN",
    # src/llama-model.cpp sets the head size to 0 when layer 0 has no heads, whatever key_length says,
    # so the model fails to load. Stand-in: one all-zero attention head (its output projection is zero).
    "attention_layer0": "an attention-free layer 0 gets one all-zero attention head",
}

# Hugging Face pre-tokenizers (tokenizer.json) -> llama.cpp's `tokenizer.ggml.pre` that splits the same way.
PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",  # GPT-2's regex inside ByteLevel (use_regex true): effllm's own tokenizer
    # SmolLM / SmolLM2 (the paper's sources): every digit on its own, then GPT-2's regex; llama.cpp's "smollm"
    # splits digits singly before the same regex.
    ("Digits", "ByteLevel"): "smollm",
}


@dataclass
class GgufLayer:
    """One layer as written: counts in the file, and the stand-ins it received."""

    heads: int
    kv_heads: int
    ffn: int
    standins: list[str] = field(default_factory=list)


# ---- what the file can express ------------------------------------------------------------------
def check_gguf_expressible(config, model_dir: Path) -> str:
    """The llama.cpp pre-tokenizer name for the model, or EffllmError saying what GGUF/deci cannot express."""
    where = f"{model_dir}: --format gguf"
    rope = config.rope_parameters or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise EffllmError(
            f"{where} cannot express {rope_type} RoPE (llama.cpp's deci architecture takes default or linear "
            "RoPE scaling here); re-save the model with default or linear RoPE"
        )
    if config.hidden_act != "silu":
        raise EffllmError(
            f"{where} cannot express the {config.hidden_act!r} activation (llama.cpp's deci FFN is SwiGLU with SiLU)"
        )
    return pre_tokenizer_name(model_dir)


def pre_tokenizer_name(model_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's text splitting, or EffllmError when there is none we know."""
    try:
        tok = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    except (OSError, ValueError) as err:
        raise EffllmError(f"{model_dir}/tokenizer.json is not readable JSON ({err}); re-save the tokenizer") from None
    model, decoder, pre = tok.get("model") or {}, tok.get("decoder") or {}, tok.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise EffllmError(
            f"{model_dir}: --format gguf writes byte-level BPE tokenizers only (this one is a {model.get('type')} "
            f"with a {decoder.get('type')} decoder)"
        )
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    signature = tuple(s.get("type") for s in steps)
    byte_level_regex = all(s.get("use_regex", True) for s in steps if s.get("type") == "ByteLevel")
    single_digits = all(s.get("individual_digits") for s in steps if s.get("type") == "Digits")
    name = PRE_TOKENIZERS.get(signature) if byte_level_regex and single_digits else None
    if name is None:
        raise EffllmError(
            f"{model_dir}: --format gguf does not know llama.cpp's counterpart of the pre-tokenizer "
            f"{'+'.join(map(str, signature))} (known: ByteLevel with GPT-2's regex, alone or after single Digits)"
        )
    return name


# ---- the layout -----------------------------------------------------------------------------------
def gguf_layers(shapes: list[tuple[int, int, int]], standins=tuple(STANDINS)) -> list[GgufLayer]:
    """Per-layer (heads, kv heads, FFN width) as written, with the stand-ins that fix llama.cpp's zero widths."""
    layers = []
    last = len(shapes) - 1
    for i, (heads, kv, ffn) in enumerate(shapes):
        layer = GgufLayer(heads, kv, ffn)
        if i == 0 and heads == 0 and "attention_layer0" in standins:
            layer.heads = layer.kv_heads = 1
            layer.standins.append("attention_layer0")
        if ffn == 0:
            # (a stand-in head adds zero, so dropping its output is harmless: only real attention counts)
            reason = "ffn_last_layer" if i == last else "ffn_after_attention" if heads else None
            if reason in standins:
                layer.ffn = STANDIN_FFN
                layer.standins.append(reason)
        layers.append(layer)
    return layers


def rope_rows_to_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """q_proj/k_proj rows from rotate_half order (pairs i, i + d/2) to llama.cpp's NORM order (2i, 2i + 1)."""
    rows = weight.shape[0]
    head_dim = rows // heads
    rest = weight.shape[1:]  # () for a bias: its entries move with their rows
    return weight.reshape(heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def layer_tensors(state: dict, i: int, layer: GgufLayer, hidden: int, head_dim: int):
    """(Hugging Face name, array) of layer i; stand-ins are all-zero (norm weights one) and have no biases
    (deci's loader takes biases per layer, so a stand-in without them still adds exactly zero)."""
    prefix = f"model.layers.{i}."
    if "attention_layer0" in layer.standins:
        zero = np.zeros((head_dim, hidden), np.float32)
        yield prefix + "input_layernorm.weight", np.ones(hidden, np.float32)
        for name in ("q_proj", "k_proj", "v_proj"):
            yield prefix + f"self_attn.{name}.weight", zero
        yield prefix + "self_attn.o_proj.weight", zero.T
    elif layer.heads:
        heads = {"q_proj": layer.heads, "k_proj": layer.kv_heads}
        yield prefix + "input_layernorm.weight", state[prefix + "input_layernorm.weight"]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for kind in ("weight", "bias"):
                key = prefix + f"self_attn.{name}.{kind}"
                if key in state:  # a bias only with attention_bias (Qwen2's q/k/v; o_proj never has one)
                    yield key, rope_rows_to_interleaved(state[key], heads[name]) if name in heads else state[key]
    if any(s.startswith("ffn_") for s in layer.standins):
        zero = np.zeros((layer.ffn, hidden), np.float32)
        yield prefix + "post_attention_layernorm.weight", np.ones(hidden, np.float32)
        yield prefix + "mlp.gate_proj.weight", zero
        yield prefix + "mlp.up_proj.weight", zero
        yield prefix + "mlp.down_proj.weight", zero.T
    elif layer.ffn:
        yield prefix + "post_attention_layernorm.weight", state[prefix + "post_attention_layernorm.weight"]
        for name in ("gate_proj", "up_proj", "down_proj"):
            for kind in ("weight", "bias"):
                key = prefix + f"mlp.{name}.{kind}"
                if key in state:  # a bias only with mlp_bias
                    yield key, state[key]


# ---- the file ---------------------------------------------------------------------------------------
def export_gguf(
    model, out_dir: str | Path, max_seq_len: int, model_dir: str | Path, dtype: str = "f16", standins=tuple(STANDINS)
) -> Path:
    """OUT_DIR/model.gguf (+ tokenizer.json for our own runtimes); returns the file's path."""
    import gguf

    from .onnx_export import copy_tokenizer_files

    config = model.config
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    pre = check_gguf_expressible(config, model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / GGUF_FILE
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    hidden, head_dim, n_layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    shapes = config.layer_shapes()
    plain = config.uniform_layer_shape() is not None
    arch = PLAIN_ARCH if plain else ARCH
    layers = gguf_layers(shapes, standins)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(model_dir.resolve().name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(max_seq_len)  # what the other formats serve (--max-seq-len); llama.cpp's n_ctx
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    per_layer = {
        "head_count": [layer.heads for layer in layers],
        "head_count_kv": [layer.kv_heads for layer in layers],
        "feed_forward_length": [layer.ffn for layer in layers],
    }
    if plain:  # one value for every layer, as llama.cpp's own converter writes a Llama
        per_layer = {key: values[0] for key, values in per_layer.items()}
    writer.add_head_count(per_layer["head_count"])
    writer.add_head_count_kv(per_layer["head_count_kv"])
    writer.add_feed_forward_length(per_layer["feed_forward_length"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = config.rope_parameters or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, model_dir, config.vocab_size, pre)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if plain else gguf.MODEL_ARCH.DECI, n_layers)
    tensors = [("model.embed_tokens.weight", state["model.embed_tokens.weight"])]
    for i, layer in enumerate(layers):
        tensors += list(layer_tensors(state, i, layer, hidden, head_dim))
    tensors.append(("model.norm.weight", state["model.norm.weight"]))
    if not config.tie_word_embeddings:  # tied: llama.cpp uses token_embd as the output projection
        tensors.append(("lm_head.weight", state["lm_head.weight"]))
    weight_dtype = np.float16 if dtype == "f16" else np.float32
    for hf_name, array in tensors:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        # Norm weights and biases stay f32 (llama.cpp's convention; they are tiny and feed every activation).
        writer.add_tensor(name, np.ascontiguousarray(array, np.float32 if array.ndim == 1 else weight_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    copy_tokenizer_files(model_dir, out_dir)
    return path


def add_tokenizer(writer, model_dir: Path, vocab_size: int, pre: str) -> None:
    """Tokens, merges, special ids and chat template, read by the gguf package's own vocab classes."""
    import gguf

    vocab = gguf.vocab.BpeVocab(model_dir)
    tokens = [text for text, _, _ in vocab.all_tokens()]
    types = [int(kind) for _, _, kind in vocab.all_tokens()]
    added = json.loads((model_dir / "tokenizer.json").read_text()).get("added_tokens", [])
    for token in added:  # special tokens live in the BPE vocab too; llama.cpp must treat them as control
        if token.get("special") and token["id"] < len(types):
            types[token["id"]] = int(gguf.TokenType.CONTROL)
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer (padding)
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    for kind in ("bos", "eos"):  # llama.cpp's own defaults would add a BOS the Hugging Face tokenizer does not
        special.add_special_token.setdefault(kind, False)
    special.add_to_gguf(writer, quiet=True)
