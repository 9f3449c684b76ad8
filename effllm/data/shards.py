"""Tokenizing the document stream into token shards, one chunk of documents at a time.

The main process (data.prepare_tokens) decides for every document whether it is training or held-out
text (heldout_split.py); ``cut_into_chunks`` cuts that stream into chunks of about ``shard_chars``
characters, the unit of parallel work. A chunk goes to ``encode_chunk`` (in the main process, or in
a worker process started with ``init_worker``; ``encode_chunks`` schedules them and stops at the
token cap), which writes ``train-NNNNN.bin`` and ``heldout-NNNNN.bin`` and, last, a small
``NNNNN.json`` holding the counts; each file is written to a temporary name and renamed, so a
chunk whose JSON exists is complete even after a SIGKILL. The output of a chunk depends only on
the chunk, so any number of processes writes the same bytes.

This module imports only numpy and tokenizers (transformers only for a tokenizer without a fast
backend), so worker processes start quickly.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from effllm.data.sources import DataError

BATCH_CHARS = 1 << 20  # characters handed to the tokenizer per call
BATCH_PIECES = 1024


@dataclass
class Chunk:
    """Pieces ``(text or token ids, end_of_document, held_out)`` in stream order, numbered ``index``."""

    index: int
    pieces: list = field(default_factory=list)
    chars: int = 0
    cap: int | None = None  # stop at the first piece end where this many tokens are written


def shard_names(index: int) -> tuple[str, str, str]:
    return f"train-{index:05d}.bin", f"heldout-{index:05d}.bin", f"{index:05d}.json"


class Encoder:
    """The tokenizer as workers rebuild it: the fast backend from its JSON, else the pickled tokenizer."""

    def __init__(self, spec: tuple[str, object], eos: int, dtype: str, vocab_size: int):
        kind, payload = spec
        self.spec = spec
        self.eos, self.dtype, self.vocab_size = eos, np.dtype(dtype), vocab_size
        if kind == "backend":
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(payload)
            self.backend.no_truncation()  # a tokenizer.json may carry call settings; we want every token
            self.backend.no_padding()
            self.slow = None
        else:
            self.backend, self.slow = None, pickle.loads(payload)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return self.slow(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]

    def check_ids(self, ids: list[int]) -> list[int]:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = max(ids) if max(ids) >= self.vocab_size else min(ids)
            raise DataError(
                f"pre-tokenized data holds token id {bad}, outside the tokenizer's vocabulary of {self.vocab_size}: "
                "tokenize with the model's own tokenizer"
            )
        return list(ids)


def tokenizer_spec(tokenizer) -> tuple[str, object]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return ("backend", backend.to_str())
    return ("pickle", pickle.dumps(tokenizer))


_ENCODER: Encoder | None = None


def init_worker(spec, eos: int, dtype: str, vocab_size: int) -> None:
    """Worker initializer: one tokenizer thread per process (the processes are the parallelism)."""
    global _ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ENCODER = Encoder(spec, eos, dtype, vocab_size)


def _write_atomic_array(path: Path, parts: list[np.ndarray]) -> int:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    with open(tmp, "wb") as f:
        for part in parts:
            part.tofile(f)
            n += len(part)
    os.replace(tmp, path)
    return n


def encode_chunk(chunk: Chunk, out_dir: str, encoder: Encoder | None = None) -> dict:
    """Tokenize ``chunk`` into ``out_dir``; returns (and writes as JSON) its counts."""
    enc = encoder or _ENCODER
    assert enc is not None, "init_worker was not called"
    out = Path(out_dir)
    parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    tokens, docs, total, capped = [0, 0], [0, 0], 0, False

    def flush(batch):
        nonlocal total, capped
        texts = [p[0] for p in batch if isinstance(p[0], str)]
        encoded = iter(enc.encode(texts) if texts else [])
        for piece, end, held in batch:
            ids = next(encoded) if isinstance(piece, str) else enc.check_ids(piece)
            dest = int(held)
            total += len(ids)
            cap_hit = chunk.cap is not None and total >= chunk.cap
            if end or cap_hit:  # a document cut by the cap ends here too
                ids = [*ids, enc.eos]
                total += 1
                docs[dest] += 1
            if ids:
                parts[dest].append(np.asarray(ids, dtype=enc.dtype))
                tokens[dest] += len(ids)
            if cap_hit:
                capped = True
                return

    batch, chars = [], 0
    for piece in chunk.pieces:
        batch.append(piece)
        chars += len(piece[0])
        if chars >= BATCH_CHARS or len(batch) >= BATCH_PIECES:
            flush(batch)
            batch, chars = [], 0
            if capped:
                break
    if batch and not capped:
        flush(batch)
    train_name, held_name, json_name = shard_names(chunk.index)
    _write_atomic_array(out / train_name, parts[0])
    _write_atomic_array(out / held_name, parts[1])
    result = {
        "index": chunk.index,
        "train_tokens": tokens[0],
        "heldout_tokens": tokens[1],
        "train_documents": docs[0],
        "heldout_documents": docs[1],
        "cap": chunk.cap,
        "capped": capped,
    }
    tmp = out / f".{json_name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out / json_name)
    return result


def finished_chunk(out_dir: Path, index: int, dtype: str, cap: int | None) -> dict | None:
    """The counts of chunk ``index`` if it was finished (with the same cap) and its shards are intact."""
    train_name, held_name, json_name = shard_names(index)
    try:
        result = json.loads((out_dir / json_name).read_text())
        size = np.dtype(dtype).itemsize
        ok = (out_dir / train_name).stat().st_size == result["train_tokens"] * size
        ok = ok and (out_dir / held_name).stat().st_size == result["heldout_tokens"] * size
        return result if ok and result.get("cap") == cap else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cut_into_chunks(pieces: Iterator[tuple], shard_chars: int) -> Iterator[Chunk]:
    """The piece stream in consecutive chunks of at least ``shard_chars`` characters (the last may be shorter)."""
    chunk = Chunk(0)
    for piece in pieces:
        chunk.pieces.append(piece)
        chunk.chars += len(piece[0])
        if chunk.chars >= shard_chars:
            yield chunk
            chunk = Chunk(chunk.index + 1)
    if chunk.pieces:
        yield chunk


def encode_chunks(chunks, build: Path, encoder: Encoder, num_proc: int, max_tokens: int | None, bar) -> list[dict]:
    """Every chunk's counts, in order: reused when already on disk, else tokenized by ``num_proc``
    processes with at most 2 chunks per process in flight (so memory stays flat)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    dtype = encoder.dtype.name
    pool = None
    if num_proc > 1:
        args = (encoder.spec, encoder.eos, dtype, encoder.vocab_size)
        pool = ProcessPoolExecutor(num_proc, mp_context=get_context("spawn"), initializer=init_worker, initargs=args)
    results: list[dict] = []
    total = 0
    pending: deque = deque()

    def finish(chunk: Chunk, result: dict) -> bool:
        """Record ``result``; True when the token cap is reached (tokenization stops)."""
        nonlocal total
        n = result["train_tokens"] + result["heldout_tokens"]
        if max_tokens is not None and total + n >= max_tokens:
            chunk.cap = max_tokens - total  # redo this chunk, stopping at the first piece end at the cap
            result = finished_chunk(build, chunk.index, dtype, chunk.cap) or encode_chunk(chunk, build, encoder)
            n = result["train_tokens"] + result["heldout_tokens"]
        results.append(result)
        total += n
        bar.update(n)
        return result["capped"]

    try:
        stopped = False
        for chunk in chunks:
            done = finished_chunk(build, chunk.index, dtype, None)
            if done is not None:
                pending.append((chunk, done))
            elif pool is None:
                pending.append((chunk, encode_chunk(chunk, build, encoder)))
            else:
                pending.append((chunk, pool.submit(encode_chunk, chunk, str(build))))
            while pending and (len(pending) > 2 * num_proc or not hasattr(pending[0][1], "result")):
                chunk0, result = pending.popleft()
                if finish(chunk0, result if isinstance(result, dict) else result.result()):
                    stopped = True
                    break
            if stopped:
                break
        while pending and not stopped:
            chunk0, result = pending.popleft()
            stopped = finish(chunk0, result if isinstance(result, dict) else result.result())
    finally:
        for _, result in pending:
            if not isinstance(result, dict):
                result.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    last = results[-1]["index"] if results else -1
    for path in build.iterdir():  # chunks after the cap (tokenized in parallel before it was known)
        stem = path.name.split(".")[0].rsplit("-", 1)[-1]
        if stem.isdigit() and int(stem) > last:
            path.unlink(missing_ok=True)
    return results
