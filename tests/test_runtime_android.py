"""effllm-bench --target android: the runner's stats parser, and the adb path without a phone.

No phone here: a stand-in `adb` script plays the device (answers `devices`, `push`, `shell`), and the
llama runner's output is a sample in the exact format ExecuTorch's runner prints (stats.h's
print_report; the sample below is ExecuTorch 1.5's TextLLMRunner output, with phone-like timings).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
from effllm.runtime.android import choose_device, observer_metrics, parse_observer_lines
from effllm.runtime.cli import bench_main

# llama_main on a phone: ExecuTorch's log lines, the generated text, then the stats line.
RUNNER_OUTPUT = textwrap.dedent(
    """\
    I 00:00:00.000912 executorch:main.cpp:69] Resetting threadpool with num threads = 4
    I 00:00:00.004521 executorch:runner.cpp:67] Creating LLaMa runner: model_path=executorch-8da4w/model.pte, tokenizer_path=executorch-8da4w/tokenizer.json
    I 00:00:00.031877 executorch:llm_runner_helper.cpp:55] Loaded json tokenizer
    I 00:00:00.032010 executorch:llm_runner_helper.cpp:137] Metadata: get_max_seq_len = 1024
    I 00:00:00.032101 executorch:llm_runner_helper.cpp:179] eos_id = 0
    I 00:00:00.412288 executorch:text_llm_runner.cpp:89] RSS after loading model: 163.285156 MiB (0 if unsupported)
    I 00:00:00.668940 executorch:text_llm_runner.cpp:228] RSS after prompt prefill: 171.902344 MiB (0 if unsupported)
    The return statement leaves the current function call with the expression list as the return value.
    I 00:00:03.209004 executorch:text_llm_runner.cpp:258] RSS after finishing text generation: 172.011719 MiB (0 if unsupported)
    PyTorchObserver {"prefill_token_per_sec":500,"decode_token_per_sec":50,"prompt_tokens":128,"generated_tokens":127,"model_load_start_ms":1732791000000,"model_load_end_ms":1732791000412,"inference_start_ms":1732791000415,"inference_end_ms":1732791003211,"model_execution_start_ms":1732791000415,"model_execution_end_ms":1732791003209,"prompt_eval_end_ms":1732791000671,"first_token_ms":1732791000672,"aggregate_sampling_time_ms":38,"aggregate_model_execution_time_ms":2794,"SCALING_FACTOR_UNITS_PER_SECOND":1000}
    I 00:00:03.209311 executorch:stats.h:175] 	Prompt Tokens: 128    Generated Tokens: 127
    I 00:00:03.209330 executorch:stats.h:181] 	Model Load Time:		0.412000 (seconds)
    I 00:00:03.209347 executorch:stats.h:188] 	Total inference time:		2.796000 (seconds)		 Rate: 	45.422031 (tokens/second)
    I 00:00:03.209360 executorch:stats.h:197] 		Prompt evaluation:	0.256000 (seconds)		 Rate: 	500.000000 (tokens/second)
    I 00:00:03.209372 executorch:stats.h:207] 		Generated 127 tokens:	2.540000 (seconds)		 Rate: 	50.000000 (tokens/second)
    I 00:00:03.209383 executorch:stats.h:219] 	Time to first generated token:	0.257000 (seconds)
    I 00:00:03.209395 executorch:stats.h:225] 	Sampling time over 255 tokens:	0.038000 (seconds)
    """
)


def test_parse_the_runner_stats_line():
    records = parse_observer_lines(RUNNER_OUTPUT)
    assert len(records) == 1
    m = observer_metrics(records[0])
    assert m["prompt_tokens"] == 128 and m["generated_tokens"] == 127
    assert m["load_s"] == pytest.approx(0.412)
    assert m["ttft_s"] == pytest.approx(0.257)
    assert m["prefill_s"] == pytest.approx(0.256)
    assert m["prefill_tokens_per_s"] == pytest.approx(500.0)  # what print_report prints as the prompt rate
    assert m["decode_s"] == pytest.approx(2.540)
    assert m["decode_tokens_per_s"] == pytest.approx(50.0)  # and the generation rate
    assert m["total_s"] == pytest.approx(2.796)
    from effllm.runtime.android import peak_rss_mib

    assert peak_rss_mib(RUNNER_OUTPUT) == pytest.approx(172.011719)


def test_parse_older_format_and_text_before_the_tag():
    """executorch 0.x printed fewer fields; generated text may end on the same line as the tag."""
    line = (
        'the end.PyTorchObserver {"prompt_tokens":10,"generated_tokens":20,"model_load_start_ms":0,'
        '"model_load_end_ms":100,"inference_start_ms":200,"inference_end_ms":1200,"prompt_eval_end_ms":250,'
        '"first_token_ms":260,"aggregate_sampling_time_ms":5,"SCALING_FACTOR_UNITS_PER_SECOND":1000}'
    )
    records = parse_observer_lines("noise\nPyTorchObserver {not json\n" + line + "\nmore noise")
    assert len(records) == 1
    m = observer_metrics(records[0])
    assert m["prefill_tokens_per_s"] == pytest.approx(200.0)
    assert m["decode_tokens_per_s"] == pytest.approx(20 / 0.95)
    assert m["ttft_s"] == pytest.approx(0.06)


def test_choose_device():
    assert choose_device([("R58M", "device")], None) == "R58M"
    assert choose_device([("a", "device"), ("b", "device")], "b") == "b"
    with pytest.raises(Exception, match="several devices"):
        choose_device([("a", "device"), ("b", "device")], None)
    with pytest.raises(Exception, match="unauthorized"):
        choose_device([("a", "unauthorized")], "a")
    with pytest.raises(Exception, match="no Android device"):
        choose_device([("a", "offline")], None)


# ---- the command, with and without a (stand-in) adb -------------------------------------------------------
@pytest.fixture
def export_dir(tmp_path, tokenizer) -> Path:
    """An export directory as effllm-export lays it out (the .pte is never run here: the phone would run it)."""
    out = tmp_path / "run" / "export"
    for variant in ("executorch", "executorch-8da4w"):
        (out / variant).mkdir(parents=True)
        (out / variant / "model.pte").write_bytes(b"\0" * 1000)
        tokenizer.backend_tokenizer.save(str(out / variant / "tokenizer.json"))
    return out


@pytest.fixture
def no_sdk_env(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for var in ("ADB", "ANDROID_HOME", "ANDROID_SDK_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return empty


FAKE_ADB = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
log = os.environ["FAKE_ADB_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(args) + "\\n")
mode = os.environ.get("FAKE_ADB_MODE", "device")
if args and args[0] == "-s":
    args = args[2:]
if args[0] == "devices":
    print("List of devices attached")
    if mode == "device":
        print("R58M123ABC\\tdevice")
    elif mode == "unauthorized":
        print("R58M123ABC\\tunauthorized")
    print()
elif args[0] == "push":
    root = os.environ["FAKE_ADB_ROOT"]
    dst = os.path.join(root, args[2].lstrip("/"))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(args[1], dst)
    print(f"{{args[1]}}: 1 file pushed.")
elif args[0] == "shell":
    cmd = " ".join(args[1:])
    if cmd.startswith("getprop ro.product.model"):
        print("Pixel 8")
    elif cmd.startswith("getprop ro.soc.model"):
        print("Tensor G3")
    elif cmd.startswith("getprop"):
        print("14")
    elif "llama_main" in cmd:
        sys.stdout.write(open(os.environ["FAKE_RUNNER_OUTPUT"]).read())
"""


@pytest.fixture
def fake_adb(tmp_path, monkeypatch, no_sdk_env):
    adb = no_sdk_env / "adb"
    adb.write_text(FAKE_ADB.format(python=sys.executable))
    adb.chmod(adb.stat().st_mode | stat.S_IEXEC)
    output = tmp_path / "runner-output.txt"
    output.write_text(RUNNER_OUTPUT)
    monkeypatch.setenv("FAKE_ADB_LOG", str(tmp_path / "adb.log"))
    monkeypatch.setenv("FAKE_ADB_ROOT", str(tmp_path / "device"))
    monkeypatch.setenv("FAKE_RUNNER_OUTPUT", str(output))
    return tmp_path / "adb.log"


def test_without_adb_exit_2_with_a_clear_message(export_dir, no_sdk_env, capsys):
    assert bench_main([str(export_dir), "--target", "android"]) == 2
    err = capsys.readouterr().err
    assert "adb not found" in err and "platform-tools" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_with_adb_but_no_device_exit_2(export_dir, fake_adb, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_ADB_MODE", "none")
    assert bench_main([str(export_dir), "--target", "android"]) == 2
    err = capsys.readouterr().err
    assert "no Android device connected" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("FAKE_ADB_MODE", "unauthorized")
    assert bench_main([str(export_dir), "--target", "android", "--serial", "R58M123ABC"]) == 2
    assert "unauthorized" in capsys.readouterr().err
    monkeypatch.setenv("FAKE_ADB_MODE", "device")
    assert bench_main([str(export_dir), "--target", "android", "--serial", "OTHER"]) == 2
    assert "no device OTHER" in capsys.readouterr().err


def test_device_but_no_runner_exit_2(export_dir, fake_adb, capsys, tmp_path):
    assert bench_main([str(export_dir), "--target", "android"]) == 2
    assert "--runner PATH is required" in capsys.readouterr().err
    assert bench_main([str(export_dir), "--target", "android", "--runner", str(tmp_path / "nope")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_android_bench_pushes_runs_and_reports(export_dir, fake_adb, tmp_path, capsys):
    runner = tmp_path / "llama_main"
    runner.write_bytes(b"\x7fELF fake")
    out = tmp_path / "results"
    argv = [str(export_dir), "--target", "android", "--runner", str(runner), "--threads", "4", "--out", str(out)]
    code = bench_main(argv + ["--prompt-lengths", "16", "32", "--repeats", "2", "--warmup", "1"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    calls = [json.loads(line) for line in fake_adb.read_text().splitlines()]
    device = tmp_path / "device" / "data" / "local" / "tmp" / "effllm"
    for variant in ("executorch", "executorch-8da4w"):
        assert (device / variant / "model.pte").read_bytes() == (export_dir / variant / "model.pte").read_bytes()
        assert (device / variant / "tokenizer.json").is_file()
    assert (device / "llama_main").read_bytes() == runner.read_bytes()
    runs = [c for c in calls if c[:3] == ["-s", "R58M123ABC", "shell"] and "llama_main" in c[3]]
    assert len(runs) == 2 * 2 * 3  # variants x prompt lengths x (warm-up + repeats)
    assert all("--cpu_threads=4" in c[3] and "--temperature=0" in c[3] for c in runs)

    report = json.loads((out / "bench-android.json").read_text())
    assert report["kind"] == "android" and report["device"]["model"] == "Pixel 8"
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"executorch", "executorch-8da4w"}
    row = rows["executorch-8da4w"]
    assert row["backend"] == "executorch-android" and row["file_bytes"] == 1000
    assert row["decode"]["tokens_per_s"] == pytest.approx(50.0)
    assert row["prefill"]["16"]["tokens_per_s"] == pytest.approx(500.0)
    assert row["ttft_s"] == pytest.approx(0.257) and row["load_s"] == pytest.approx(0.412)
    assert row["peak_rss_mb"] == pytest.approx(172.011719)
    assert row["decode_vs_fp32"] == pytest.approx(1.0)
    assert "| executorch-android | executorch-8da4w |" in (out / "bench-android.md").read_text()
    assert (out / "bench-android.png").is_file()
    assert "executorch-8da4w" in stdout
    assert not os.path.exists(export_dir / "bench")
