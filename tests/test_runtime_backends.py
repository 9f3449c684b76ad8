"""Every runtime backend on one exported irregular tiny model: same greedy tokens as torch, same seeded
samples, streaming, no torch on the ONNX path, and the effllm-generate / effllm-bench commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IRREGULAR, one_torch_thread, tiny_model
from effllm.export.executorch_export import export_executorch
from effllm.export.onnx_export import export_onnx
from effllm.export.quantize import quantize_onnx_dir
from effllm.runtime.cli import bench_main, bench_parser, generate_main, generate_parser
from effllm.runtime.generate import load_generator
from effllm.runtime.model_files import locate
from effllm.runtime.sampling import SamplingConfig

MAX_SEQ_LEN = 64
NEW_TOKENS = 20
PROMPTS = ["The return statement", "A class definition", "def f(x):\n    return"]
BACKENDS = ["torch", "onnxruntime", "genai", "executorch"]


@pytest.fixture(scope="module")
def run_dir(tokenizer, tmp_path_factory) -> Path:
    """run/model (irregular: a layer with neither attention nor FFN, FFN width 17, GQA) and run/export.

    Untied embeddings: a random model with tied ones only repeats its input token, which would make
    "same greedy tokens" a weak check; untied, the greedy continuations wander through the vocabulary.
    """
    run = tmp_path_factory.mktemp("runtime") / "run"
    model = tiny_model(seed=0, tie_word_embeddings=False, **IRREGULAR)
    model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    with one_torch_thread():
        export_onnx(model, run / "export" / "onnx", MAX_SEQ_LEN, model_dir=run / "model")
        quantize_onnx_dir(run / "export" / "onnx", run / "export" / "onnx-int8", "int8")
        export_executorch(model, run / "export" / "executorch", MAX_SEQ_LEN, model_dir=run / "model")
    return run


@pytest.fixture(scope="module")
def generators(run_dir):
    with one_torch_thread():  # the torch backend's threads=1 sets torch's global count; restore it after
        gens = {b: load_generator(run_dir / "export", backend=b, threads=1) for b in BACKENDS}
        gens["executorch-runner"] = load_generator(run_dir / "export", backend="executorch-runner", threads=1)
        yield gens
        for g in gens.values():
            g.close()


@torch.no_grad()
def reference_greedy(run_dir: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy by full recomputation, no KV cache: independent of every cache implementation."""
    from effllm import EfficientLLMForCausalLM

    model = EfficientLLMForCausalLM.from_pretrained(run_dir / "model").eval()
    ids = list(prompt_ids)
    for _ in range(new_tokens):
        ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def test_every_backend_gives_torchs_greedy_tokens(run_dir, generators):
    tok = generators["onnxruntime"].tokenizer
    eos = generators["onnxruntime"].eos_ids
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        expected = reference_greedy(run_dir, ids, NEW_TOKENS)
        assert len(set(expected)) > 3, expected  # a continuation that exercises the model, not one token repeated
        for backend in BACKENDS:
            got = generators[backend].generate(prompt, NEW_TOKENS, stop_at_eos=False).token_ids
            assert got == expected, (backend, prompt)
        # the C++ runner stops at EOS and returns text: compare with torch's text up to EOS
        until_eos = expected[: next((i for i, t in enumerate(expected) if t in eos), len(expected))]
        text = generators["executorch-runner"].generate(prompt, NEW_TOKENS).text
        assert text == tok.decode(until_eos), prompt


def test_seeded_sampling_gives_the_same_tokens_on_every_backend(generators):
    config = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, seed=123)
    outputs = {b: generators[b].generate(PROMPTS[0], NEW_TOKENS, config, stop_at_eos=False).token_ids for b in BACKENDS}
    assert len(set(map(tuple, outputs.values()))) == 1, outputs
    assert outputs["torch"] != generators["torch"].generate(PROMPTS[0], NEW_TOKENS, stop_at_eos=False).token_ids
    again = generators["onnxruntime"].generate(PROMPTS[0], NEW_TOKENS, config, stop_at_eos=False).token_ids
    assert again == outputs["onnxruntime"]


@pytest.mark.parametrize("backend", [*BACKENDS, "executorch-runner"])
def test_stream_pieces_concatenate_to_the_generated_text(generators, backend):
    gen = generators[backend]
    pieces = list(gen.stream(PROMPTS[1], NEW_TOKENS))
    assert pieces and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == gen.generate(PROMPTS[1], NEW_TOKENS).text
    prompt_tokens = len(generators["onnxruntime"].tokenizer.encode(PROMPTS[1]).ids)
    assert gen.stats.new_tokens >= 1 and gen.stats.prompt_tokens == prompt_tokens


def test_the_runners_own_stats_parse_like_the_phones(generators):
    """TextLLMRunner prints its stats with the same C++ code as llama_main on a phone (the PyTorchObserver line)."""
    from effllm.runtime.android import observer_metrics, parse_observer_lines

    runner = generators["executorch-runner"]
    runner.generate(PROMPTS[0], 12, stop_at_eos=True)
    raw = runner.runner_stats
    assert {"prompt_tokens", "generated_tokens", "inference_start_ms", "prompt_eval_end_ms"} <= set(raw)
    record = parse_observer_lines("PyTorchObserver " + json.dumps(raw))[0]
    metrics = observer_metrics(record)
    assert metrics["prompt_tokens"] == runner.stats.prompt_tokens == len(runner_prompt_ids(generators))
    assert metrics["generated_tokens"] == runner.stats.new_tokens - 1  # the first comes from the prefill
    assert metrics["load_s"] is not None and metrics["ttft_s"] is not None


def runner_prompt_ids(generators):
    return generators["onnxruntime"].tokenizer.encode(PROMPTS[0]).ids


def test_runner_refuses_options_it_cannot_honour(generators):
    from effllm.runtime.sampling import SamplingError

    with pytest.raises(SamplingError, match="temperature only"):
        list(generators["executorch-runner"].stream("x", 4, SamplingConfig(temperature=0.5, top_k=5)))


def test_quantized_onnx_variant_runs(run_dir):
    gen = load_generator(run_dir / "export", backend="onnxruntime", variant="onnx-int8", threads=1)
    assert gen.backend.path == run_dir / "export" / "onnx-int8" / "model.onnx"
    assert len(gen.generate(PROMPTS[0], 8, stop_at_eos=False).token_ids) == 8


def test_locate_finds_files_from_any_entry_point(run_dir):
    export, model = run_dir / "export", run_dir / "model"
    assert locate(model).backend == "onnxruntime"  # a model directory finds its export beside it
    assert locate(model, "torch").path == model
    assert locate(export, "torch").path == model  # and the export finds its model
    assert locate(run_dir, "executorch").path == export / "executorch" / "model.pte"
    assert locate(export / "executorch").backend == "executorch"
    assert locate(export / "onnx" / "model.onnx", "genai").path == export / "onnx"
    assert locate(export, variant="executorch").backend == "executorch"


ONNX_PATH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from effllm.runtime.generate import load_generator
    texts = [load_generator(sys.argv[1], backend=b).generate("The return statement", 6).text
             for b in ("onnxruntime", "genai")]
    print(json.dumps({"torch": "torch" in sys.modules, "texts": texts}))
    """
)


def test_onnx_path_imports_no_torch(run_dir, generators):
    expected = generators["onnxruntime"].generate("The return statement", 6).text
    out = subprocess.run(
        [sys.executable, "-c", ONNX_PATH_SCRIPT, str(run_dir / "export")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch": False, "texts": [expected, expected]}


EXECUTORCH_OPENMP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from effllm.runtime.generate import load_generator
    text = load_generator(sys.argv[1], backend=sys.argv[2], threads=2).generate("The return statement", 4).text
    import torch
    print(json.dumps({"env": os.environ.get("OMP_NUM_THREADS"), "openmp_threads": torch.get_num_threads(), "text": text}))
    """
)


@pytest.mark.parametrize(
    "backend, env, openmp_threads", [("executorch", "1", 1), ("executorch-runner", "1", 1), ("torch", None, 2)]
)
def test_generator_keeps_openmp_single_threaded_beside_executorch_only(run_dir, generators, backend, env, openmp_threads):
    """A process that runs a .pte sets OpenMP to one thread before torch loads (XNNPACK's pool does the work;
    OpenMP's spinning threads slowed the 8da4w decode of a real model 5x); the torch backend keeps its threads."""
    expected = generators["torch"].generate("The return statement", 4).text
    unset = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    target = run_dir / ("model" if backend == "torch" else "export")
    out = subprocess.run(
        [sys.executable, "-c", EXECUTORCH_OPENMP_SCRIPT, str(target), backend],
        capture_output=True, text=True, timeout=300, env=dict(unset, TOKENIZERS_PARALLELISM="false"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"env": env, "openmp_threads": openmp_threads, "text": expected}


# ---- effllm-generate ----------------------------------------------------------------------------------
def test_generate_cli_streams_the_continuation(run_dir, generators, capsys):
    expected = generators["torch"].generate(PROMPTS[0], 8).text
    for backend in ("onnxruntime", "executorch-runner", "torch"):
        code = generate_main(
            [str(run_dir / "export"), PROMPTS[0], "--backend", backend, "--max-new-tokens", "8", "--threads", "1"]
        )
        out, err = capsys.readouterr()
        assert code == 0, err
        assert out == PROMPTS[0] + expected + "\n"
        assert f"[{backend}]" in err and "tok/s" in err
    code = generate_main([str(run_dir / "model"), "x", "--no-echo", "--quiet", "--max-new-tokens", "3", "--seed", "1",
                          "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--backend", "genai"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and err == "" and not out.startswith("x")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{missing}"], "does not exist"),
        (["{export}/onnx", "--backend", "torch"], "needs the model directory"),
        (["{model}", "--variant", "onnx-int4"], "no variant 'onnx-int4'"),
        (["{export}", "--backend", "executorch", "--variant", "onnx"], "does not run"),
        (["{export}", "--top-p", "2"], "top-p"),
        (["{export}", "--temperature", "-1"], "temperature"),
        (["{export}", "x", "--backend", "executorch-runner", "--seed", "3"], "temperature only"),
        (["{export}", "word " * 80], "the model serves 64 at most"),
        (["{export}", "--threads", "0"], "--threads"),
        (["{export}", "--backend", "tensorflow"], "--backend"),
    ],
)
def test_generate_cli_bad_input_is_one_line_and_exit_2(run_dir, capsys, argv, message):
    argv = [a.format(missing=run_dir / "nope", export=run_dir / "export", model=run_dir / "model") for a in argv]
    code = call(generate_main, argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def call(main, argv) -> int:
    """The exit code, whether main returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_generate_without_a_model_uses_the_quickstart_or_says_what_to_do(tmp_path, monkeypatch, capsys, run_dir):
    monkeypatch.chdir(tmp_path)
    assert generate_main([]) == 2
    err = capsys.readouterr().err
    assert "runs/quickstart/export" in err and "effllm-train" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart" / "export").symlink_to(run_dir / "export")
    assert generate_main(["--max-new-tokens", "2", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("The return statement")


@pytest.mark.parametrize("parser", [generate_parser, bench_parser])
def test_help_explains_every_flag(parser):
    p = parser()
    for action in p._actions:
        assert action.help and len(action.help) > 10, action.dest
    assert len(p.description) > 100
    with pytest.raises(SystemExit) as exit_:
        p.parse_args(["--help"])
    assert exit_.value.code == 0


# ---- effllm-bench ---------------------------------------------------------------------------------------
def test_bench_writes_json_markdown_and_png(run_dir, tmp_path, capsys):
    export = run_dir / "export"
    verify = {"variants": [{"name": "onnx-int8", "top1_agreement": 0.97, "ppl_increase": 0.012, "passed": True}]}
    (export / "verify.json").write_text(json.dumps(verify))
    out = tmp_path / "bench"
    args = [str(export), "--prompt-lengths", "8", "16", "--new-tokens", "4", "--repeats", "2", "--warmup", "0"]
    code = bench_main(args + ["--threads", "1", "--out", str(out), "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]  # no temp files left
    report = json.loads((out / "bench.json").read_text())
    rows = {(r["backend"], r["variant"]): r for r in report["results"]}
    assert set(rows) == {
        ("torch", "model"),
        ("onnxruntime", "onnx"),
        ("onnxruntime", "onnx-int8"),
        ("genai", "onnx"),
        ("genai", "onnx-int8"),
        ("executorch", "executorch"),
    }
    assert report["machine"]["memory_bandwidth_gb_s"] > 0 and report["machine"]["load_average_start"] is not None
    for key, r in rows.items():
        assert r["error"] is None, (key, r["error"])
        assert r["load_s"] > 0 and r["ttft_s"] > 0 and r["file_bytes"] > 0 and r["peak_rss_mb"] > 0
        # the runtime's imports and the model are told apart: both add memory, the model's share is under the peak
        assert r["rss_before_load_mb"] < r["rss_runtime_mb"] and 0 < r["model_rss_mb"] < r["peak_rss_mb"]
        assert set(r["prefill"]) == {"8", "16"} and r["prefill"]["16"]["tokens_per_s"] > 0
        assert len(r["prefill"]["8"]["runs_s"]) == 2
        assert r["decode"]["tokens_per_s"] > 0 and r["decode"]["new_tokens"] == 4
        assert r["weight_bytes_per_token"] > 0 and 0 < r["roofline_fraction"]
        assert r["decode_vs_torch"] > 0
        if key[0] in ("onnxruntime", "genai"):
            assert r["torch_imported"] is False  # the ONNX workers run without torch
    # ExecuTorch's worker keeps OpenMP at one thread (its spinning threads slowed decode 5x); torch's uses --threads
    assert rows[("executorch", "executorch")]["openmp_threads"] == 1
    assert rows[("torch", "model")]["openmp_threads"] == 1  # --threads 1 here
    fp32 = rows[("torch", "model")]["weight_bytes_per_token"]
    assert rows[("onnxruntime", "onnx")]["weight_bytes_per_token"] == pytest.approx(fp32, rel=0.05)
    assert rows[("executorch", "executorch")]["weight_bytes_per_token"] == pytest.approx(fp32, rel=0.05)
    assert rows[("onnxruntime", "onnx-int8")]["weight_bytes_per_token"] < 0.5 * fp32
    assert rows[("onnxruntime", "onnx-int8")]["decode_vs_fp32"] > 0
    assert rows[("onnxruntime", "onnx-int8")]["accuracy"]["top1_agreement"] == 0.97
    md = (out / "bench.md").read_text()
    assert "| backend | variant |" in md and "decode tok/s" in md and "achieved/roofline" in md
    assert "| onnxruntime | onnx-int8 |" in md and "+1.20%" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| genai | onnx |" in stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{run}/nope"], "does not exist"),
        (["{run}/export", "--variants", "onnx-int4"], "no variant onnx-int4"),
        (["{run}/export/onnx", "--backends", "torch"], "nothing to benchmark"),
    ],
)
def test_bench_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, argv, message):
    argv = [a.format(run=run_dir) for a in argv] + ["--out", str(tmp_path / "b")]
    assert call(bench_main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_bench_without_a_model_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench_main([]) == 2
    assert "effllm-export" in capsys.readouterr().err


def test_bench_worker_records_a_failure_instead_of_crashing(tmp_path):
    from effllm.runtime.bench_targets import BenchSettings, Target
    from effllm.runtime.bench_worker import run_target

    broken = tmp_path / "onnx"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model")
    result = run_target(Target("onnxruntime", "onnx", "fp32", str(broken), 11), BenchSettings(threads=1, repeats=1))
    assert result["error"] and "Traceback" not in result["error"]


def test_weights_per_token_counts_a_gathered_embedding_as_one_row(run_dir):
    from effllm.runtime.roofline import onnx_bytes_per_token, pte_bytes_per_token, safetensors_bytes_per_token

    config = json.loads((run_dir / "model" / "config.json").read_text())
    d, vocab = config["hidden_size"], config["vocab_size"]
    total = safetensors_bytes_per_token(run_dir / "model")
    with torch.no_grad():
        from effllm import EfficientLLMForCausalLM

        model = EfficientLLMForCausalLM.from_pretrained(run_dir / "model")
        params = sum(p.numel() for p in model.parameters())
    assert total == 4 * (params - vocab * d + d)
    assert np.isclose(onnx_bytes_per_token(run_dir / "export" / "onnx" / "model.onnx"), total, rtol=0.05)
    # the .pte: read off the program (its embedding table one row, the untied lm_head in full)
    pte = run_dir / "export" / "executorch" / "model.pte"
    assert np.isclose(pte_bytes_per_token(pte), total, rtol=0.05)
    assert pte_bytes_per_token(pte) < pte.stat().st_size - 4 * (vocab - 1) * d + 1  # the table is not counted


# ---- the Android app's expectations -----------------------------------------------------------------------
APP = Path(__file__).resolve().parents[1] / "android_demo"


def kotlin_constants(path: Path) -> dict[str, str]:
    import re

    return dict(re.findall(r'const val (\w+) = "([^"]*)"', path.read_text()))


def test_the_app_expects_exactly_what_effllm_export_writes_and_it_runs_in_textllmrunner(run_dir, generators):
    import re

    from effllm.export.executorch_export import PTE_FILE
    from effllm.runtime.android import DEVICE_DIR
    from effllm.runtime.executorch_backend import RunnerGenerator

    names = kotlin_constants(APP / "app/src/main/java/org/effllm/demo/ModelFiles.kt")
    assert names["MODEL_FILE"] == PTE_FILE == "model.pte"
    assert names["TOKENIZER_FILE"] == "tokenizer.json"
    assert names["DEVICE_DIR"] == DEVICE_DIR  # where effllm-bench --target android pushes, too
    variant = run_dir / "export" / "executorch"
    assert sorted(p.name for p in variant.iterdir()) == sorted([names["MODEL_FILE"], names["TOKENIZER_FILE"]])
    readme = (APP / "README.md").read_text()
    assert f"adb push runs/quickstart/export/executorch-8da4w {DEVICE_DIR}/" in readme

    # the files, by the app's names, in the C++ runner LlmModule wraps: torch's greedy text
    runner = RunnerGenerator(variant / names["MODEL_FILE"], variant / names["TOKENIZER_FILE"], threads=1)
    expected = generators["torch"].generate(PROMPTS[2], 16).text
    assert runner.generate(PROMPTS[2], 16).text == expected

    # every stats field the app reads is in the runner's stats JSON
    runner_stats = runner.runner_stats
    kotlin = (APP / "app/src/main/java/org/effllm/demo/RunStats.kt").read_text()
    fields = set(re.findall(r'"([a-z_]+_ms|prompt_tokens|generated_tokens|SCALING_FACTOR_UNITS_PER_SECOND)"', kotlin))
    assert fields and fields <= set(runner_stats), fields - set(runner_stats)


def test_app_sources_use_the_documented_llm_api():
    """A static check (no Android SDK here): the LlmModule / LlmCallback calls the app makes exist in the API."""
    main = (APP / "app/src/main/java/org/effllm/demo/MainActivity.kt").read_text()
    assert "import org.pytorch.executorch.extension.llm.LlmCallback" in main
    assert "import org.pytorch.executorch.extension.llm.LlmModule" in main
    assert "LlmModule(model.absolutePath, tokenizer.absolutePath, temperature)" in main  # (path, tokenizer, float)
    assert ".generate(prompt, seqLen, this, false)" in main  # (prompt, seqLen, callback, echo)
    assert "override fun onResult(result: String)" in main and "override fun onStats(stats: String)" in main
    gradle = (APP / "app/build.gradle.kts").read_text()
    assert 'implementation("org.pytorch:executorch-android:$executorchVersion")' in gradle
    import importlib.metadata

    props = (APP / "gradle.properties").read_text()
    assert f"executorchVersion={importlib.metadata.version('executorch')}" in props  # the runtime that exported
