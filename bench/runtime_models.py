"""The benchmark's models: a ~95M-parameter irregular model, one pruned to multiples of 32, and a uniform one.

All three are random-weight (speed does not depend on the values) and share the vocabulary (32000,
tied embeddings), hidden size (640), depth (16), head size (64) and parameter count (95.2M; the
last FFN width absorbs the difference):
    uniform        every layer 10 query / 5 KV heads, FFN 1792
    irregular      per-layer heads 0..12 with GQA ratios 1-3, FFN widths from 1151 to 2710 that are not
                   multiples of 32 (what pruning leaves), one layer without attention
    irregular-g32  the same layers with every FFN width rounded to a multiple of 32 (what
                   `effllm-train --granularity 32` leaves): int4 groups of 32 then cover every weight
Each is exported with effllm-export --quantize all (verified) beside its model directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

HIDDEN, LAYERS, HEAD_DIM, VOCAB = 640, 16, 64, 32000
UNIFORM = dict(num_attention_heads=10, num_key_value_heads=5, intermediate_size=1792)
IRREGULAR_HEADS = [12, 10, 8, 12, 6, 10, 12, 8, 0, 10, 12, 6, 8, 10, 12, 4]
IRREGULAR_KV = [4, 5, 4, 6, 2, 10, 4, 4, 0, 5, 6, 3, 8, 5, 4, 2]
IRREGULAR_FFN = [2311, 1705, 1999, 1403, 2617, 1201, 1893, 2047, 1511, 1777, 2203, 1301, 1609, 2429, 1151, None]


def layer_params(heads: int, kv: int, ffn: int) -> int:
    attn = HIDDEN * (heads + 2 * kv) * HEAD_DIM + heads * HEAD_DIM * HIDDEN + (HIDDEN if heads else 0)
    mlp = 3 * HIDDEN * ffn + (HIDDEN if ffn else 0)
    return attn + mlp


def irregular_shapes(granularity: int = 1) -> dict:
    """Per-layer shapes whose parameter count equals the uniform model's (the last FFN absorbs the difference);
    with granularity > 1 every FFN width is rounded to a multiple of it (parameters then equal within 0.1%)."""

    def rounded(width: int) -> int:
        return max(granularity, granularity * round(width / granularity))

    target = LAYERS * layer_params(**dict(zip(("heads", "kv", "ffn"), UNIFORM.values())))
    widths = [rounded(f) for f in IRREGULAR_FFN[:-1]]
    partial = sum(layer_params(h, k, f) for h, k, f in zip(IRREGULAR_HEADS[:-1], IRREGULAR_KV[:-1], widths))
    rest = target - partial - layer_params(IRREGULAR_HEADS[-1], IRREGULAR_KV[-1], 0) - HIDDEN
    ffn = widths + [rounded(round(rest / (3 * HIDDEN)))]
    return dict(num_attention_heads=IRREGULAR_HEADS, num_key_value_heads=IRREGULAR_KV, intermediate_size=ffn)


MODEL_SHAPES = {
    "irregular": lambda: irregular_shapes(),
    "irregular-g32": lambda: irregular_shapes(32),
    "uniform": lambda: UNIFORM,
}


def build_models(work: Path) -> dict[str, Path]:
    """Random-weight model directories (config, safetensors, tokenizer), built once and reused."""
    import torch

    from effllm import EfficientLLMConfig, EfficientLLMForCausalLM
    from effllm.model.params import count_parameters, format_count

    dirs = {name: work / name / "model" for name in MODEL_SHAPES}
    missing = [
        n for n, d in dirs.items() if not ((d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file())
    ]
    if not missing:
        return dirs
    tokenizer = build_tokenizer(work / "tokenizer")
    for name in missing:
        path = dirs[name]
        torch.manual_seed(0)
        config = EfficientLLMConfig(
            vocab_size=VOCAB,  # >= the tokenizer's: the built-in corpus yields fewer merges than a real one
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            head_dim=HEAD_DIM,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            **MODEL_SHAPES[name](),
        )
        model = EfficientLLMForCausalLM(config).eval()
        print(f"{name}: {format_count(count_parameters(config).total)} parameters", file=sys.stderr)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return dirs


def build_tokenizer(path: Path):
    """An ASCII byte-level BPE trained on the built-in corpus (cached); it stops short of VOCAB merges."""
    from transformers import PreTrainedTokenizerFast

    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    from effllm.data.corpus import python_docs_corpus
    from effllm.model.tokenizer import train_ascii_bpe

    print("training an ASCII BPE tokenizer on the built-in corpus ...", file=sys.stderr)
    tokenizer = train_ascii_bpe(python_docs_corpus(include_stdlib=True), vocab_size=VOCAB)
    tokenizer.save_pretrained(path)
    return tokenizer


def export(model_dir: Path, max_seq_len: int) -> tuple[Path, int]:
    """effllm-export --quantize all into MODEL/../export (skipped when verify.json is already there)."""
    out = model_dir.parent / "export"
    if (out / "verify.json").is_file():
        return out, 0
    from effllm.export.cli import main as export_main

    print(f"effllm-export {model_dir} --quantize all --max-seq-len {max_seq_len} ...", file=sys.stderr)
    code = export_main([str(model_dir), "--quantize", "all", "--max-seq-len", str(max_seq_len)])
    return out, code
