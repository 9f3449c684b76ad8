"""Shared by the export tests: the model shapes, a briefly trained model, and one real CLI export of it.

Exports are slow (ExecuTorch's XNNPACK lowering takes tens of seconds even for a tiny model), so the
expensive artifacts are built once per test process and shared by the three test files:
- "uniform" and "odd" (conftest's IRREGULAR: an empty layer, FFN width 17) are random-weight models
  that each format's tests export directly;
- "irregular" (a layer without attention, one without FFN, GQA ratios 1 and 3, FFN widths that are
  not multiples of 32) is trained for a few seconds so that quantization metrics mean something, and
  is exported by `effllm-export --quantize all`: the CLI test checks that run, and the format tests
  check its fp32 and quantized outputs in the runtimes themselves.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from conftest import IRREGULAR, one_torch_thread, tiny_model
from tokenizers import Tokenizer

SHAPES = {
    "uniform": dict(num_hidden_layers=3),
    "irregular": dict(
        num_hidden_layers=3, num_attention_heads=[4, 0, 6], num_key_value_heads=[4, 0, 2], intermediate_size=[40, 80, 0]
    ),
    "odd": dict(IRREGULAR),
}
PROMPTS = ["The return statement", "A class definition defines"]
MAX_SEQ_LEN = 64  # direct exports: enough for the prompts plus the decode steps checked
CLI_MAX_SEQ_LEN = 128
TRAIN_STEPS = 150

_cache: dict[str, object] = {}


def scratch_dir() -> Path:
    """One temporary directory per test process for the shared artifacts, removed at exit."""
    if "scratch" not in _cache:
        path = Path(tempfile.mkdtemp(prefix="effllm-export-tests-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _cache["scratch"] = path
    return _cache["scratch"]


def save_model_dir(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_model_dir(name: str, tokenizer) -> tuple[object, Path]:
    """A random-weight tiny model of SHAPES[name], saved with the tokenizer (cached)."""
    key = f"random-{name}"
    if key not in _cache:
        model = tiny_model(**SHAPES[name])
        _cache[key] = (model, save_model_dir(model, tokenizer, scratch_dir() / f"{name}-model"))
    return _cache[key]


def heldout_text() -> str:
    """Standard-library docstrings: text the trained model never saw (it trains on the pydoc topics)."""
    import warnings

    from effllm.data.corpus import python_docs_corpus

    topics = len(python_docs_corpus(include_stdlib=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # inspect touching typing.io/typing.re
        docs = python_docs_corpus(include_stdlib=True)
    return "\n\n".join(docs[topics:])[:40_000]


def trained_model_dir(tokenizer, corpus: list[str]) -> Path:
    """SHAPES["irregular"] trained for TRAIN_STEPS steps (seconds), at run/model, held-out ids in run/data."""
    if "trained" not in _cache:
        run = scratch_dir() / "run"
        model = tiny_model(**SHAPES["irregular"]).train()
        ids = torch.tensor(tokenizer("\n\n".join(corpus))["input_ids"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        generator = torch.Generator().manual_seed(0)
        with one_torch_thread():
            for _ in range(TRAIN_STEPS):
                starts = torch.randint(0, len(ids) - 65, (16,), generator=generator)
                batch = torch.stack([ids[s : s + 64] for s in starts])
                loss = model(batch, labels=batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        save_model_dir(model, tokenizer, run / "model")
        write_train_heldout(run, tokenizer(heldout_text())["input_ids"], len(tokenizer))
        _cache["trained"] = run / "model"
    return _cache["trained"]


def write_train_heldout(run: Path, ids: list[int], vocab_size: int) -> None:
    """run/data/heldout.bin + meta.json in effllm-train's layout (flat uint16 ids; see effllm/data/prepare.py)."""
    (run / "data").mkdir(parents=True, exist_ok=True)
    np.asarray(ids, dtype=np.uint16).tofile(run / "data" / "heldout.bin")
    meta = {"dtype": "uint16", "heldout_tokens": len(ids), "vocab_size": vocab_size}
    (run / "data" / "meta.json").write_text(json.dumps(meta))


@dataclass
class CliRun:
    code: int
    out: Path
    stdout: str
    stderr: str


def cli_export_of_trained_model(tokenizer, corpus) -> CliRun:
    """`effllm-export run/model --quantize all --max-seq-len 128`, run once; out defaults to run/export."""
    if "cli" not in _cache:
        from effllm.export.cli import main

        model_dir = trained_model_dir(tokenizer, corpus)
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), one_torch_thread():
            code = main([str(model_dir), "--quantize", "all", "--max-seq-len", str(CLI_MAX_SEQ_LEN)])
        _cache["cli"] = CliRun(code, model_dir.parent / "export", stdout.getvalue(), stderr.getvalue())
    return _cache["cli"]


def encode(model_dir: Path, text: str) -> list[int]:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


@torch.no_grad()
def torch_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens by full recomputation (no cache): independent of every cache implementation."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def before_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def heldout_windows(model_dir: Path, size: int, count: int = 6) -> list[list[int]]:
    ids = encode(model_dir, heldout_text())
    return [ids[i : i + size] for i in range(0, count * size, size)]


def top1_and_ppl_change(model, windows: list[list[int]], run_window) -> tuple[float, float]:
    """(top-1 agreement with torch, relative perplexity change) over windows; run_window(ids) -> logits [T, V]."""
    agree = total = 0
    nll_ref = nll_q = 0.0
    for window in windows:
        with torch.no_grad():
            ref = model(torch.tensor([window]), use_cache=False).logits[0].double()
        got = torch.as_tensor(run_window(window)).double()
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(window)
        targets = torch.tensor(window[1:])
        nll_ref += float(torch.nn.functional.cross_entropy(ref[:-1], targets, reduction="sum"))
        nll_q += float(torch.nn.functional.cross_entropy(got[:-1], targets, reduction="sum"))
    return agree / total, float(torch.exp(torch.tensor((nll_q - nll_ref) / (total - len(windows))))) - 1.0
