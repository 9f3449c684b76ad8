"""Held-out text for the quantized variants' checks and calibration, first found: --eval-text FILE; the
held-out split effllm-train tokenized beside the model (runs/<name>/data/heldout.bin, never trained on);
built-in Python standard-library docstrings (fine for comparing quantized with fp32 even if seen in
training).

The first windows judge the variants (verification); the windows after them calibrate the quantizers
(weight_quant.input_gram), so no variant is judged on the text it was calibrated on; a short text is
split between the two (verify.py), and only a single window serves both (verify.json then says so).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# effllm-train's held-out split: runs/<name>/data/heldout.bin (flat token ids, dtype in meta.json)
# beside runs/<name>/model; tokenized by the same tokenizer, never trained on.
TRAIN_HELDOUT = ("data/heldout.bin", "data/meta.json")


def find_train_heldout(model_dir: Path, vocab_size: int) -> Path | None:
    """effllm-train's heldout.bin beside the model, if it is intact and matches the model's vocabulary."""
    tokens, meta = (model_dir.resolve().parent / name for name in TRAIN_HELDOUT)
    try:
        info = json.loads(meta.read_text())
        itemsize = np.dtype(info["dtype"]).itemsize
        intact = tokens.stat().st_size == int(info["heldout_tokens"]) * itemsize
        return tokens if intact and int(info["vocab_size"]) <= vocab_size else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_heldout_tokens(path: Path, limit: int) -> list[int]:
    dtype = json.loads((path.parent / "meta.json").read_text())["dtype"]
    return np.fromfile(path, dtype=dtype, count=limit).astype(np.int64).tolist()


@dataclass
class HeldoutTokens:
    ids: list[int]
    source: str  # what verify.json names as the text (verify.py cuts the ids into windows)


def heldout_tokens(eval_text: Path | None, heldout_bin: Path | None, tokenizer, limit: int) -> HeldoutTokens:
    """Up to ``limit`` held-out token ids, from the first source of the module docstring."""
    if heldout_bin is not None:
        return HeldoutTokens(read_heldout_tokens(heldout_bin, limit), str(heldout_bin.resolve()))
    if eval_text is not None:
        return HeldoutTokens(tokenizer.encode(eval_text.read_text(errors="replace")).ids[:limit], str(eval_text.resolve()))
    return HeldoutTokens(tokenizer.encode(builtin_eval_text()).ids[:limit], "built-in: Python standard-library docstrings")


def builtin_eval_text() -> str:
    """English text that ships with Python: standard-library docstrings (the corpus minus pydoc topics)."""
    from effllm.data.corpus import python_docs_corpus

    topics = len(python_docs_corpus(include_stdlib=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # inspect touching typing.io / typing.re
        docs = python_docs_corpus(include_stdlib=True)
    return "\n\n".join(docs[topics:])
