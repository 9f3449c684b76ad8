"""bench/method.py, the method study, at its smoke size: every kind of cell runs, compared pairs have
equal sizes, the statistics name a winner only past two standard errors, and a second run resumes
every finished cell instead of training it again."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import method  # noqa: E402
import method_grid as grid  # noqa: E402
from method_report import compare  # noqa: E402


def _stats(mean: float, sd: float, n: int = 3, name: str = "a") -> dict:
    return {"method": name, "ppl_mean": mean, "ppl_sd": sd, "ppl_se": sd / math.sqrt(n)}


def test_a_winner_needs_two_standard_errors():
    a, b = _stats(50.0, 0.5, name="pruning-aware"), _stats(51.0, 0.5, name="one-shot")
    close = compare(a, b)  # gap 1.0, SE 0.41: 2.4 SE
    assert close["winner"] == "pruning-aware" and close["gap_in_se"] == pytest.approx(2.449, abs=1e-3)
    assert compare(a, _stats(50.5, 0.5, name="one-shot"))["winner"] == "tie"  # 1.2 SE
    assert compare(b, a)["winner"] == "pruning-aware"  # whichever side is lower
    assert compare(_stats(50, float("nan"), 1), _stats(60, float("nan"), 1))["winner"] == "tie"
    assert compare(b, a, ("defaults", "variant"))["winner"] == "variant"


def test_grid_holds_the_core_cells_and_the_cells_around_them():
    cells = grid.build_grid(grid.PRESETS["cpu"])
    core = [c for c in cells if c.variant == grid.DEFAULT]
    assert len(core) == 3 * 3 * 3 * 2 and len(cells) == len(core) + (6 + 2 * len(grid.STEM_PRICES)) * 3
    assert {c.target for c in core} == {0.12, 0.28, 0.5} and {c.budget for c in core} == {60_000, 120_000, 240_000}
    assert len({c.key for c in cells}) == len(cells)
    around = {(c.method, c.variant, c.target, c.budget) for c in cells if c.variant != grid.DEFAULT}
    assert (grid.SCRATCH, "uniform-arch", 0.28, 120_000) in around
    assert (grid.ONESHOT, "stem-price0.3", 0.12, 120_000) in around


def test_gpu_preset_sizes_fit_its_promise():
    """The GPU study has not run on a GPU yet; what can be checked here: a 30-60M source whose embedding
    is at most 10%, and the same grid as the CPU study."""
    from effllm.model.params import count_parameters
    from effllm.model.tokenizer import train_ascii_bpe

    preset = grid.PRESETS["gpu"]
    tokenizer = train_ascii_bpe(["a tiny corpus " * 50], vocab_size=300)
    tokenizer_like = type("T", (), {"__len__": lambda self: preset.vocab, "bos_token_id": tokenizer.bos_token_id,
                                    "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})()  # fmt: skip
    count = count_parameters(grid.source_config(preset, tokenizer_like))
    assert 30e6 <= count.total <= 60e6 and count.embedding / count.total <= 0.10
    cells = grid.build_grid(preset)
    assert len(cells) == len(grid.build_grid(grid.PRESETS["cpu"])) and preset.workers == 1


def test_smoke_study_runs_every_cell_with_matched_sizes_and_resumes(tmp_path):
    out, results = tmp_path / "study", tmp_path / "results"
    argv = ["--preset", "smoke", "--out", str(out), "--results", str(results)]
    assert method.main(argv) == 0
    report = json.loads((results / "method.json").read_text())
    cells = grid.build_grid(grid.PRESETS["smoke"])
    assert len(report["rows"]) == len(cells) == 2 * 2 + 6 + 2 * len(grid.PRESETS["smoke"].stem_prices)
    rows = {r["key"]: r for r in report["rows"]}
    for cell in cells:
        row = rows[cell.key]
        assert math.isfinite(row["heldout_ppl"]) and row["tokens"] >= cell.budget
        if cell.method != grid.PAP:
            ref = rows[cell.reference().key]
            assert abs(row["params"] - ref["params"]) <= 0.01 * ref["params"], (cell.key, row["params"], ref["params"])
            if cell.variant == "auto-arch":
                assert row["layer_shapes"] == ref["layer_shapes"] and row["hidden_size"] == ref["hidden_size"]
    assert report["max_size_gap_pair"] <= 0.01
    core = report["core"]
    assert len(core) == 1 and core[0]["pruning_aware"]["n"] == 2 and core[0]["winner"] in (
        "tie", grid.PAP, grid.ONESHOT)  # fmt: skip
    assert report["source"]["curve"] and report["corpus"]["heldout_tokens"] > 0
    md = (results / "method.md").read_text()
    assert "| target | tokens | (i) params |" in md and "in SE" in md
    for png in ("method_ppl_vs_budget.png", "method_params_by_type.png", "method_source_curve.png"):
        assert (results / png).stat().st_size > 1000

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")}
    assert len(stamps) == len(cells)
    assert method.main(argv) == 0  # resumes: every finished cell is reused, none trained again
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")} == stamps
    again = json.loads((results / "method.json").read_text())
    assert [r["heldout_ppl"] for r in again["rows"]] == [r["heldout_ppl"] for r in report["rows"]]
