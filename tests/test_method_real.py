"""bench/method.py's real-source study, its GPU preset at toy size (bf16 autocast on the CPU), on a tiny
source the test builds: every cell runs through effllm-train (continuous and one-shot, with and without
--distill, the uniform shape of the best recipe, the unpruned ceiling), compared cells have equal sizes, the
judgement (two held-out kinds, top-1 against S, samples with a repetition measure) lands in
method_real_smoke.{json,md}, and a rerun reuses every finished cell, from the run directories or from the
results file alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import method  # noqa: E402
import method_real  # noqa: E402
import method_real_grid as grid  # noqa: E402


def test_repeated_4gram_share_counts_4grams_seen_earlier():
    assert method_real.repeated_4gram_share([1, 2, 3, 4, 5, 6]) == 0.0
    assert method_real.repeated_4gram_share([7] * 8) == pytest.approx(4 / 5)  # 5 4-grams, the last 4 repeat
    assert method_real.repeated_4gram_share([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert method_real.repeated_4gram_share([1, 2]) == 0.0


def test_uniform_cells_take_the_recipe_of_lowest_mean_in_domain_ppl():
    preset = grid.REAL_PRESETS["real"]
    rows = {}
    for cell in grid.recipe_cells(preset):
        # one-shot + distill best at 0.5 on average although continuous wins seed 1; continuous best at 0.7
        ppl = {(grid.ONE_SHOT, True, 0.5): [20, 10], (grid.CONTINUOUS, False, 0.5): [19, 30],
               (grid.CONTINUOUS, False, 0.7): [9, 9]}.get((cell.schedule, cell.distill, cell.target), [40, 40])  # fmt: skip
        rows[cell.key] = {"domain": {"ppl": ppl[preset.seeds.index(cell.seed)]}}
    chosen = {(c.target, c.schedule, c.distill, c.shape) for c in grid.uniform_cells(preset, rows)}
    assert chosen == {(0.5, grid.ONE_SHOT, True, "uniform"), (0.7, grid.CONTINUOUS, False, "uniform")}
    assert len(grid.recipe_cells(preset)) + 2 * len(preset.seeds) == 22  # the ~5 h study: 22 cells


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from effllm.data.corpus import python_docs_corpus
    from effllm.model.tokenizer import train_ascii_bpe

    tmp = tmp_path_factory.mktemp("real-smoke")
    docs = python_docs_corpus(include_stdlib=False)
    tokenizer = train_ascii_bpe(docs, vocab_size=512)
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(0)  # S as users bring it: a plain transformers Llama directory, not an effllm one
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                         max_position_embeddings=256, tie_word_embeddings=True, **ids))  # fmt: skip
    model.save_pretrained(tmp / "S")
    tokenizer.save_pretrained(tmp / "S")
    for name, part in (("domain", docs[: len(docs) // 2]), ("general", docs[len(docs) // 2 :])):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    argv = ["--preset", "real-smoke", "--source", str(tmp / "S"), "--data", str(tmp / "domain.jsonl"),
            "--general", str(tmp / "general.jsonl"), "--out", str(tmp / "root"), "--results", str(tmp / "results")]  # fmt: skip
    assert method.main(argv) == 0
    return tmp, argv


def test_real_smoke_study_runs_every_cell_at_equal_sizes_and_judges_them(smoke_study):
    tmp, _ = smoke_study
    result = json.loads((tmp / "results" / "method_real_smoke.json").read_text())
    rows = result["rows"]
    assert len(rows) == 12  # (2 schedules x 2 losses + ceiling) x 2 seeds + uniform x 2 seeds
    source = result["source"]["params"]
    for seed in (1, 2):
        sizes = [r["params"] for r in rows.values() if r["seed"] == seed and r["target"] == 0.375]
        assert max(sizes) - min(sizes) <= 0.005 * source  # every compared cell within 0.5% of S
        ceiling = rows[grid.RealCell(grid.CEILING, 1.0, seed).key]
        assert ceiling["params"] == source and ceiling["tokens"] == 1_024
    for key in rows:  # the GPU preset's bf16 autocast reached every effllm-train run
        assert json.loads((tmp / "root" / "runs" / key / "run.json").read_text())["config"]["dtype"] == "bf16"
    uniform = [r for r in rows.values() if r["shape"] == "uniform"]
    assert len(uniform) == 2 and all(len({tuple(s) for s in r["layer_shapes"]}) == 1 for r in uniform)
    for row in rows.values():
        for kind in ("domain", "general"):
            assert row[kind]["ppl"] > 1 and 0 <= row[kind]["top1_vs_source"] <= 1
        assert len(row["samples"]) == len(grid.PROMPTS) and 0 <= row["repeated_4grams"] <= 1
    verdicts = {(v["a"], v["b"], v["kind"]) for v in result["verdicts"]}
    assert ("continuous", "one-shot", "domain") in verdicts and (
        "one-shot",
        "one-shot + distill",
        "general",
    ) in verdicts
    md = (tmp / "results" / "method_real_smoke.md").read_text()
    assert "repeated 4-grams" in md and grid.PROMPTS[0] in md and "| 1 | ceiling | 2 |" in md


def test_real_smoke_study_rerun_reuses_every_cell(smoke_study):
    tmp, argv = smoke_study
    judged = sorted((tmp / "root" / "runs").glob("*/judged.json"))
    before = {p: p.stat().st_mtime_ns for p in judged}
    assert len(judged) == 12 and method.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in judged} == before


def test_real_smoke_study_resumes_from_the_results_file_alone(smoke_study):
    """A fresh machine has the committed results file but no run directories: the rerun trains nothing."""
    import shutil
    from dataclasses import replace

    tmp, argv = smoke_study
    results = tmp / "results" / "method_real_smoke.json"
    before = json.loads(results.read_text())["rows"]
    shutil.rmtree(tmp / "root" / "runs")
    assert method.main(argv) == 0
    assert not (tmp / "root" / "runs").exists()
    assert json.loads(results.read_text())["rows"] == before
    # rows of other settings, or of another S, are not this study's
    preset = grid.REAL_PRESETS["real-smoke"]
    source = json.loads(results.read_text())["source"]
    assert method_real.stored_rows(tmp / "results", "real-smoke", preset, source) == before
    assert method_real.stored_rows(tmp / "results", "real-smoke", replace(preset, tokens=2048), source) == {}
    other_source = {**source, "domain": {**source["domain"], "ppl": source["domain"]["ppl"] * 1.01}}
    assert method_real.stored_rows(tmp / "results", "real-smoke", preset, other_source) == {}
