"""effllm-eval: sliding-window perplexity and the lm-evaluation-harness wiring, on a tiny local task."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import IRREGULAR, tiny_model

from effllm.evaluation.cli import main
from effllm.evaluation.perplexity import sliding_window_nll


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("eval") / "model"
    tiny_model(**IRREGULAR).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sliding_window_scores_every_token_once():
    model = tiny_model(**IRREGULAR)
    ids = torch.randint(1, 512, (100,))
    # window >= sequence: one forward pass
    full, count = sliding_window_nll(model, ids, window=128, stride=64)
    with torch.no_grad():
        direct = F.cross_entropy(model(ids[None, :-1]).logits[0], ids[1:], reduction="sum").item()
    assert count == 99 and math.isclose(full, direct, rel_tol=1e-5)
    # a short window: the same token count, each token scored with its own truncated context
    short, count = sliding_window_nll(model, ids, window=20, stride=7)
    with torch.no_grad():
        brute = 0.0
        for t in range(1, 100):
            # token t is scored in the window that ends at its stride block's end: recompute it by hand
            end = min(t if t < 20 else 19 + ((t - 19 + 6) // 7) * 7, 99) + 1
            chunk = ids[max(0, end - 20) : end]
            logits = model(chunk[None, :-1]).logits[0]
            k = t - max(0, end - 20) - 1
            brute -= logits[k].log_softmax(-1)[ids[t]].item()
    assert count == 99 and math.isclose(short, brute, rel_tol=1e-5)
    assert not math.isclose(short, full, rel_tol=1e-3)
    with pytest.raises(ValueError, match="stride must be"):
        sliding_window_nll(model, ids, window=20, stride=20)


def test_cli_perplexity_on_text(model_dir, tmp_path, corpus):
    text = tmp_path / "heldout.jsonl"
    text.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in corpus[:5]))
    out = tmp_path / "report"
    assert (
        main([str(model_dir), "--data", str(text), "--window", "64", "--stride", "32", "--out", str(out), "--quiet"])
        == 0
    )
    report = json.loads((out / "eval.json").read_text())
    p = report["perplexity"]
    assert p["window"] == 64 and p["tokens"] > 500
    assert math.isclose(p["perplexity"], math.exp(p["nll_per_token"]))
    # random weights: close to uniform over the 512-token vocabulary, far from a trained model
    assert 200 < p["perplexity"] < 2000
    assert "perplexity" in (out / "eval.md").read_text()


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "is not a model directory" in capsys.readouterr().err


def test_lm_eval_harness_wiring(model_dir, tmp_path, tokenizer):
    pytest.importorskip("lm_eval")
    rows = [{"question": f"Question {i}: which one?", "choices": [f" number {i}", " a cat", " the end"], "answer": i % 3}
            for i in range(6)]  # fmt: skip
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(
        "task: effllm_tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out = tmp_path / "report"
    code = main([str(model_dir), "--no-perplexity", "--tasks", "effllm_tiny_choice", "--include-path", str(tasks),
                 "--out", str(out), "--batch-size", "2", "--quiet"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    samples = report["zero_shot"]["samples"]["effllm_tiny_choice"]
    assert len(samples) == 6
    # The harness's log-likelihoods equal ones computed here with the same model: the wiring is real.
    model = tiny_model(**IRREGULAR)
    correct = 0
    for s in samples:
        lls = []
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            ids = torch.tensor(whole)
            with torch.no_grad():
                logp = model(ids[None, :-1]).logits[0].log_softmax(-1)
            cont = ids[len(ctx) :]
            ll = logp[len(ctx) - 1 :].gather(1, cont[:, None]).sum().item()
            assert math.isclose(ll, resp[0][0], abs_tol=1e-3), (ll, resp)
            lls.append(ll)
        correct += int(max(range(len(lls)), key=lls.__getitem__) == int(s["target"]))
    assert math.isclose(report["zero_shot"]["results"]["effllm_tiny_choice"]["acc,none"], correct / 6)


def test_cli_offline_tasks_is_one_line_in_a_fresh_process(model_dir, tmp_path, corpus):
    """A new user's effllm-eval without network: perplexity loads the directory as transformers would
    (no custom-code prompt, no config fallback warning), then --tasks paper ends in one line, exit 2."""
    pytest.importorskip("lm_eval")
    text = tmp_path / "heldout.jsonl"
    text.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in corpus[:2]))
    # An empty HF cache and offline mode: the task datasets cannot come from anywhere.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [str(model_dir), "--data", str(text), "--window", "64", "--stride", "32", "--max-tokens", "200",
            "--tasks", "paper", "--limit", "1", "--out", str(tmp_path / "report"), "--quiet"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "effllm.evaluation.cli", *args], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("effllm-eval: error:")]
    assert len(errors) == 1 and "Hugging Face Hub" in errors[0] and "--include-path" in errors[0], run.stderr
    assert "allenai/ai2_arc" in errors[0]  # the first paper task's dataset, named
    assert "custom code" not in run.stderr and "to instantiate a model of type" not in run.stderr, run.stderr
    assert "torchao" not in run.stderr and "_pytree" not in run.stderr, run.stderr  # quieted at the entry point
    assert not (tmp_path / "report").exists()


def test_usage_error_is_one_line_and_exit_2(capsys):
    """argparse's own errors in the style of every effllm command (effllm.common.cli_args.CliParser)."""
    with pytest.raises(SystemExit) as exit_:
        main(["--window", "wide"])
    assert exit_.value.code == 2
    message = "argument --window: invalid int value: 'wide'"
    assert capsys.readouterr().err.splitlines() == [f"effllm-eval: error: {message}; see effllm-eval --help"]
