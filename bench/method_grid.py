"""The method study's grid: its sizes (presets) and its cells (method x target x budget x seed x variant).

Definitions only, no training: bench/method.py runs the cells, bench/method_report.py reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- what to run ------------------------------------------------------------------------------
# Hidden-channel prices tried at the lowest target: 0.3 undoes the overpricing measured on S
# (bench/stem_saliency.py); 0.12 and 0.1 are where one-shot selection on S narrows the hidden size to
# about a half and a fifth (chosen from the architectures selection produces, before any training).
STEM_PRICES = (0.3, 0.12, 0.1)


@dataclass(frozen=True)
class Preset:
    """Every size of a study. Budgets are fractions of the source's pretraining tokens."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq_len: int
    batch_size: int
    source_tokens: int
    budgets: tuple[float, ...]
    targets: tuple[float, ...]
    seeds: tuple[int, ...]
    extras: bool
    calib_batches: int
    source_evals: int  # points on S's held-out curve
    workers: int  # cells run side by side (each with cores // workers threads)
    corpus: str  # "linux-doc" or "embedded" (the quickstart's Python docs)
    heldout_fraction: float
    lr: float = 1e-3
    warmup_steps: int = 10
    extra_seeds: tuple[int, ...] | None = None  # seeds of the cells around the core grid (default: seeds)
    stem_prices: tuple[float, ...] = STEM_PRICES
    why: str = ""


PRESETS = {
    "cpu": Preset(
        layers=6, hidden=128, heads=8, kv_heads=8, ffn=256, vocab=512, seq_len=128, batch_size=8,
        source_tokens=1_200_000, budgets=(0.05, 0.1, 0.2), targets=(0.12, 0.28, 0.5), seeds=(1, 2, 3),
        extras=True, calib_batches=16, source_evals=12, workers=2, corpus="linux-doc", heldout_fraction=0.0125,
        why="S: 1.05M parameters, 6 layers, embedding 6.2% (the paper's source: ~6%), attention groups of "
        "8K parameters (0.8% of S, fine enough to land within 1% of a target), pretrained on 1.2M tokens "
        "(an eighth of the corpus: no token seen twice). Budgets of 5/10/20% of S's tokens (60K/120K/240K) "
        "and ~100K held-out tokens keep the 90 runs of the study under 90 minutes on 2 cores.",
    ),  # fmt: skip
    "gpu": Preset(
        layers=12, hidden=512, heads=8, kv_heads=4, ffn=1536, vocab=8192, seq_len=512, batch_size=64,
        source_tokens=40_000_000, budgets=(0.05, 0.1, 0.2), targets=(0.12, 0.28, 0.5), seeds=(1, 2, 3),
        extras=True, calib_batches=16, source_evals=20, workers=1, corpus="linux-doc", heldout_fraction=0.03,
        lr=1e-3, warmup_steps=50,
        why="S: ~42M parameters (embedding ~10%) on 40M tokens, budgets 2-8M tokens, bf16 on one GPU; "
        "about 300M tokens in all. The default corpus has ~6M tokens: pass a larger --data.",
    ),  # fmt: skip
    "smoke": Preset(
        layers=2, hidden=32, heads=2, kv_heads=1, ffn=64, vocab=256, seq_len=32, batch_size=4,
        source_tokens=8_192, budgets=(0.5,), targets=(0.5,), seeds=(1, 2), extras=True, calib_batches=2,
        source_evals=2, workers=1, corpus="embedded", heldout_fraction=0.1, extra_seeds=(1,), stem_prices=(0.3,),
        why="a minute: every kind of cell once, what the tests run",
    ),  # fmt: skip
}

PAP, ONESHOT, SCRATCH = "pruning-aware", "one-shot + recovery", "scratch"

DEFAULT = "default"


@dataclass(frozen=True)
class Cell:
    """One run: a method at a target size and a token budget, with one seed and one variant."""

    method: str
    target: float
    budget: int
    seed: int
    variant: str = DEFAULT

    @property
    def key(self) -> str:
        slug = {PAP: "pap", ONESHOT: "oneshot", SCRATCH: "scratch"}[self.method]
        return f"{slug}-t{self.target}-b{self.budget}-{self.variant}-s{self.seed}"

    @property
    def group(self) -> tuple:
        return (self.method, self.target, self.budget, self.variant)

    def reference(self) -> Cell:
        """The (i) run this cell is sized (and, for scratch-auto, shaped) after."""
        return Cell(PAP, self.target, self.budget, self.seed)


def stem_price(cell: Cell) -> float:
    return float(cell.variant.removeprefix("stem-price")) if cell.variant.startswith("stem-price") else 1.0


def build_grid(preset: Preset) -> list[Cell]:
    budgets = [int(b * preset.source_tokens) for b in preset.budgets]
    mid = budgets[len(budgets) // 2]
    cells = [
        Cell(method, target, budget, seed)
        for target in preset.targets
        for budget in budgets
        for seed in preset.seeds
        for method in (PAP, ONESHOT)
    ]
    if preset.extras:
        around = min(preset.targets, key=lambda t: abs(t - 0.28))
        low = min(preset.targets)
        for seed in preset.extra_seeds or preset.seeds:
            cells += [
                Cell(PAP, around, mid, seed, "phase0.3"),
                Cell(PAP, around, mid, seed, "phase0.9"),
                Cell(PAP, around, mid, seed, "cubic"),
                Cell(ONESHOT, around, mid, seed, "first-order"),
                Cell(SCRATCH, around, mid, seed, "auto-arch"),
                Cell(SCRATCH, around, mid, seed, "uniform-arch"),
            ]
            cells += [Cell(m, low, mid, seed, f"stem-price{p}") for p in preset.stem_prices for m in (PAP, ONESHOT)]
    return cells


def source_config(preset: Preset, tokenizer):
    """S's architecture for a preset (its vocabulary and special tokens from the study's tokenizer)."""
    from effllm import EfficientLLMConfig

    p = preset
    return EfficientLLMConfig(
        vocab_size=len(tokenizer), hidden_size=p.hidden, num_hidden_layers=p.layers,
        num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, intermediate_size=p.ffn,
        head_dim=p.hidden // p.heads, max_position_embeddings=max(1024, p.seq_len), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
