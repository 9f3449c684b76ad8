"""Nothing a user downloads runs code (docs/security.md): real attacks through the real commands.

A model directory whose modeling_effllm.py / configuration_effllm.py write a marker file when imported
goes through every command; a checkpoint whose pickle writes a marker goes through --resume. No marker
may appear. Bad files (truncated or crafted safetensors, GGUF, config.json, data) end in one line on
stderr, exit 2, and nothing written.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IRREGULAR, tiny_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
EVIL_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('code from the model directory ran')\n"


class Touch:
    """Unpickling this calls Path.write_text: the classic pickle attack, a file instead of a shell."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from the checkpoint ran"))


def command(name: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """One of effllm's console scripts in a fresh process, as a user runs it."""
    exe = Path(sys.executable).with_name(name)
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


def in_process(main, *args) -> tuple[int, str]:
    """(exit code, stderr) of a command's main() run here: the bad-file cases fail fast, no fresh process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def snapshot(root: Path) -> list:
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


def assert_refused(code: int, stderr: str, prog: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), (code, stderr[-3000:])
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer, corpus) -> Path:
    root = tmp_path_factory.mktemp("security")
    model = root / "model"
    tiny_model(**IRREGULAR).save_pretrained(model)
    tokenizer.save_pretrained(model)
    for name in ("modeling_effllm.py", "configuration_effllm.py"):  # both copies attack on import
        (model / name).write_text(EVIL_CODE.format(marker=str(root / "MARKER")) + (model / name).read_text())
    (root / "text.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in corpus[:60]))
    tiny_model(num_hidden_layers=2).save_pretrained(root / "clean")  # for the bad-file cases: no warning line
    tokenizer.save_pretrained(root / "clean")
    return root


@pytest.fixture(scope="module")
def gguf_export(ws) -> Path:
    """effllm-export of the attacking directory: it works with the installed classes and runs none of its code."""
    r = command("effllm-export", ws / "model", "--format", "gguf", "--no-verify", "--max-seq-len", 64,
                "--out", ws / "export")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "differ from the installed effllm's" in r.stderr and not (ws / "MARKER").exists()
    return ws / "export" / "gguf" / "model.gguf"


def test_the_attacks_are_real(ws, tmp_path):
    """The marker code does run when imported or unpickled, so its absence below means something."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Touch(marker)))
    assert marker.is_file()
    marker.unlink()
    exec(compile(EVIL_CODE.format(marker=str(marker)), "evil", "exec"), {})
    assert marker.is_file()


COMMANDS = {  # each run on the attacking directory: it must work, with the installed classes
    "effllm-eval": "{model} --data {text} --window 32 --max-tokens 64 --out {out} --quiet",
    "effllm-generate": "{model} def --backend torch --max-new-tokens 2 --quiet",
    "effllm-bench": "{model} --backends torch --prompt-lengths 4 --new-tokens 2 --warmup 0 --repeats 1 "
    "--no-progress --out {out}",
}


@pytest.mark.parametrize("prog", list(COMMANDS))
def test_model_directory_code_never_runs(ws, gguf_export, prog, tmp_path):
    names = {"model": ws / "model", "text": ws / "text.jsonl", "out": tmp_path / "out"}
    r = command(prog, *COMMANDS[prog].format(**names).split())
    assert not (ws / "MARKER").exists(), f"{prog} ran the directory's code"
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "differ from the installed effllm's" in line]
    assert len(warnings) <= 1 and (warnings or prog == "effllm-bench"), r.stderr  # bench's worker prints it


def test_training_on_it_then_a_pickled_checkpoint_never_runs(ws, tmp_path):
    out = tmp_path / "run"
    r = command("effllm-train", "--source", ws / "model", "--data", ws / "text.jsonl", "--out", out, "--seq-len", 32,
                "--batch-size", 4, "--eval-windows", 2, "--tokens", 2560, "--halt-at-step", 2, "--save-every", 100,
                "--warmup-steps", 1, "--quiet")  # fmt: skip
    assert r.returncode == 143 and not (ws / "MARKER").exists(), r.stderr[-3000:]
    checkpoint = out / "checkpoint"
    assert (checkpoint / "state.safetensors").is_file() and (checkpoint / "state.json").is_file()
    assert not list(checkpoint.rglob("*.pt")) and not list(checkpoint.rglob("*.bin"))

    # A truncated state.safetensors: one line, nothing changed.
    good = (checkpoint / "state.safetensors").read_bytes()
    (checkpoint / "state.safetensors").write_bytes(good[: len(good) // 2])
    before = snapshot(out)
    from effllm.cli import train_main

    code, stderr = in_process(train_main, "--out", out, "--resume")
    assert_refused(code, stderr, "effllm-train", "is corrupt", "--overwrite")
    assert snapshot(out) == before

    # An old-format checkpoint whose state.pt would write the marker when unpickled.
    for name in ("state.safetensors", "state.json"):
        (checkpoint / name).unlink()
    (checkpoint / "state.pt").write_bytes(pickle.dumps({"optimizer": Touch(ws / "MARKER")}))
    before = snapshot(out)
    r = command("effllm-train", "--out", out, "--resume")
    assert not (ws / "MARKER").exists(), "--resume unpickled the checkpoint"
    assert_refused(r.returncode, r.stderr, "effllm-train", "old format", "--overwrite")
    assert snapshot(out) == before


def test_no_pickle_loads_and_no_remote_code_in_the_sources():
    """torch.load only with weights_only=True, and trust_remote_code never True, anywhere in effllm."""
    offenders = []
    for path in [p for d in ("effllm", "export", "runtime") for p in (ROOT / d).rglob("*.py")]:
        source = path.read_text()
        if "trust_remote_code=True" in source:
            offenders.append(f"{path}: trust_remote_code=True")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            if (
                isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and ast.unparse(node.func) == "torch.load"
            ):
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
            flag = keywords.get("trust_remote_code")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                offenders.append(f"{path}:{node.lineno}: trust_remote_code={ast.unparse(flag)}")
            # pickle.load reads a file; pickle.loads in data/shards.py is our own bytes between our own processes
            if isinstance(node.func, ast.Attribute) and ast.unparse(node.func) == "pickle.load":
                offenders.append(f"{path}:{node.lineno}: pickle.load")
    assert not offenders, offenders


# ---- bad files: one line, exit 2, nothing written --------------------------------------------------
def _copy_model(ws: Path, dest: Path) -> Path:
    shutil.copytree(ws / "clean", dest)
    return dest


def _gguf_header_attack(data: bytes, what: str) -> bytes:
    b = bytearray(data)
    if what == "tensor_count":
        b[8:16] = struct.pack("<Q", 2**60)
    else:  # the first metadata key's length
        b[24:32] = struct.pack("<Q", 2**60)
    return bytes(b)


@pytest.mark.parametrize("how", ["truncated", "tensor_count", "string_length"])
def test_bad_gguf_for_generate_bench_and_source(ws, gguf_export, tmp_path, how):
    from effllm.runtime.cli import bench_main, generate_main

    from effllm.cli import train_main

    variant = tmp_path / "gguf"
    shutil.copytree(gguf_export.parent, variant)
    data = gguf_export.read_bytes()
    bad = data[: len(data) * 2 // 3] if how == "truncated" else _gguf_header_attack(data, how)
    (variant / "model.gguf").write_bytes(bad)
    before = snapshot(tmp_path)
    code, stderr = in_process(generate_main, variant, "def", "--backend", "llamacpp", "--max-new-tokens", 2)
    assert_refused(code, stderr, "effllm-generate", "model.gguf", "GGUF")
    code, stderr = in_process(bench_main, variant, "--backends", "llamacpp", "--out", tmp_path / "bench")
    assert_refused(code, stderr, "effllm-bench", "model.gguf", "GGUF")
    code, stderr = in_process(train_main, "--source", variant / "model.gguf", "--data", ws / "text.jsonl",
                              "--out", tmp_path / "run", "--tokens", 2560, "--quiet")  # fmt: skip
    assert_refused(code, stderr, "effllm-train", "model.gguf", "GGUF")
    assert snapshot(tmp_path) == before


def test_truncated_model_safetensors(ws, tmp_path):
    from effllm.runtime.cli import generate_main

    from effllm.evaluation.cli import main as eval_main

    model = _copy_model(ws, tmp_path / "model")
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[:-100])
    before = snapshot(tmp_path)
    code, stderr = in_process(eval_main, model, "--data", ws / "text.jsonl", "--out", tmp_path / "eval")
    assert_refused(code, stderr, "effllm-eval", "model.safetensors", "truncated or corrupt")
    code, stderr = in_process(generate_main, model, "def", "--backend", "torch")
    assert_refused(code, stderr, "effllm-generate", "model.safetensors", "truncated or corrupt")
    assert snapshot(tmp_path) == before


def test_config_of_the_wrong_types(ws, tmp_path):
    from effllm.export.cli import main as export_main

    from effllm.evaluation.cli import main as eval_main

    model = _copy_model(ws, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "thirty"}))
    before = snapshot(tmp_path)
    code, stderr = in_process(eval_main, model, "--data", ws / "text.jsonl", "--out", tmp_path / "eval")
    assert_refused(code, stderr, "effllm-eval", "num_hidden_layers must be an integer")
    code, stderr = in_process(export_main, model, "--format", "gguf", "--out", tmp_path / "export")
    assert_refused(code, stderr, "effllm-export", "num_hidden_layers must be an integer")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["binary", "latin1", "huge_line"])
def test_bad_data_files(ws, tmp_path, case):
    from effllm.cli import train_main
    from effllm.data.sources import MAX_LINE_BYTES

    data = tmp_path / "data"
    data.mkdir()
    if case == "binary":
        path = data / "corpus.txt"
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
        expected = "is not UTF-8 text"
    elif case == "latin1":
        path = data / "corpus.txt"
        path.write_bytes("Café crème, naïve façade.\n".encode("latin-1") * 50)
        expected = "is not UTF-8 text"
    else:
        path = data / "corpus.jsonl"
        with path.open("wb") as f:  # one 65 MB document on one line, after a good line
            f.write(b'{"text": "a good line"}\n{"text": "')
            f.write(b"x" * (MAX_LINE_BYTES + (1 << 20)))
            f.write(b'"}\n')
        expected = "line 2 is longer than 64 MB"
    before = snapshot(tmp_path)
    code, stderr = in_process(train_main, "--source", ws / "clean", "--data", path, "--out", tmp_path / "run",
                              "--tokens", 2560, "--quiet")  # fmt: skip
    assert_refused(code, stderr, "effllm-train", str(path), expected)
    assert snapshot(tmp_path) == before


def test_a_nul_byte_in_valid_utf8_is_binary(tmp_path):
    from effllm.data.sources import DataError, Source, iter_pieces

    (tmp_path / "a.txt").write_bytes(b"plain text\x00\x01\x02 and more")
    with pytest.raises(DataError, match="is binary"):
        list(iter_pieces(Source("text", str(tmp_path / "a.txt"))))
