"""Training data: text -> memory-mapped token shards -> deterministic, resumable, DDP-sharded batches.

``prepare_tokens`` tokenizes the sources (see data_sources.py) with the model's tokenizer into
``out_dir/train.bin`` and ``out_dir/heldout.bin`` (flat arrays, each document followed by eos) plus
``meta.json``, atomically, and reuses them when the sources and tokenizer are unchanged.
``TokenBatches`` reads train.bin as windows of ``seq_len + 1`` tokens with stride ``seq_len`` (so
inputs never overlap and every token after the first is a label exactly once), in a seeded order
reshuffled each epoch; its ``state_dict`` is the position a checkpoint stores.
``evaluate_batches`` and ``unigram_perplexity`` serve held-out evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data_sources import DataError, fingerprint, iter_pieces, resolve_sources, tokenizer_fingerprint

__all__ = ["DataError", "TokenData", "prepare_tokens", "TokenBatches", "evaluate_batches", "unigram_perplexity"]

FORMAT_VERSION = 1
BATCH_CHARS = 1 << 20  # characters handed to the tokenizer per call
BATCH_PIECES = 1024
READ_CHUNK = 1 << 24  # tokens per chunk when scanning a shard


@dataclass
class TokenData:
    """What ``prepare_tokens`` wrote (or found): paths, dtype and token counts."""

    train_path: Path
    heldout_path: Path
    dtype: str  # "uint16" or "uint32"
    train_tokens: int
    heldout_tokens: int
    vocab_size: int
    eos_token_id: int
    fingerprint: str
    meta_path: Path
    reused: bool = False


def _vocab_size(tokenizer) -> int:
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def _existing(out: Path, fp: str) -> dict | None:
    """meta.json of data already in ``out`` with fingerprint ``fp`` and intact files, else None."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("fingerprint") != fp:
            return None
        size = np.dtype(meta["dtype"]).itemsize
        ok = (out / "train.bin").stat().st_size == meta["train_tokens"] * size
        return meta if ok and (out / "heldout.bin").stat().st_size == meta["heldout_tokens"] * size else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _info(out: Path, meta: dict, reused: bool) -> TokenData:
    return TokenData(
        train_path=out / "train.bin",
        heldout_path=out / "heldout.bin",
        dtype=meta["dtype"],
        train_tokens=meta["train_tokens"],
        heldout_tokens=meta["heldout_tokens"],
        vocab_size=meta["vocab_size"],
        eos_token_id=meta["eos_token_id"],
        fingerprint=meta["fingerprint"],
        meta_path=out / "meta.json",
        reused=reused,
    )


def _batches(sources, text_field: str, split: str) -> Iterator[list[tuple[str, bool]]]:
    batch, chars = [], 0
    for source in sources:
        for text, end in iter_pieces(source, text_field, split):
            batch.append((text, end))
            chars += len(text)
            if chars >= BATCH_CHARS or len(batch) >= BATCH_PIECES:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _tokenize(sources, tokenizer, files, dtype, every, max_tokens, text_field, split, bar) -> dict:
    """Append each document's tokens + eos to files[0] (train) or files[1] (every ``every``-th document)."""
    eos = tokenizer.eos_token_id
    tokens, docs = [0, 0], [0, 0]
    doc_index, doc_tokens, total = 0, 0, 0
    for batch in _batches(sources, text_field, split):
        encoded = tokenizer(
            [text for text, _ in batch], add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        pending: tuple[list[int], list[int]] = ([], [])
        done = False
        for ids, (_, end) in zip(encoded, batch):
            dest = 1 if (doc_index + 1) % every == 0 else 0
            pending[dest].extend(ids)
            doc_tokens += len(ids)
            total += len(ids)
            if end or (max_tokens is not None and total >= max_tokens):  # a capped document is cut here
                if doc_tokens:
                    pending[dest].append(eos)
                    total += 1
                    docs[dest] += 1
                    doc_index += 1
                doc_tokens = 0
                done = max_tokens is not None and total >= max_tokens
                if done:
                    break
        for dest in (0, 1):
            if pending[dest]:
                np.asarray(pending[dest], dtype=dtype).tofile(files[dest])
                tokens[dest] += len(pending[dest])
        bar.update(len(pending[0]) + len(pending[1]))
        if done:
            break
    return {
        "train_tokens": tokens[0],
        "heldout_tokens": tokens[1],
        "train_documents": docs[0],
        "heldout_documents": docs[1],
    }


def prepare_tokens(
    data=None,
    tokenizer=None,
    out_dir: str | os.PathLike = "data",
    heldout_fraction: float = 0.02,
    max_tokens: int | None = None,
    text_field: str = "text",
    split: str = "train",
    show_progress: bool = True,
) -> TokenData:
    """Tokenize ``data`` into ``out_dir`` (train.bin, heldout.bin, meta.json), or reuse what is there.

    ``data``: None (the embedded corpus), or a path / dataset id, or a list of them (see data_sources).
    Every ``round(1 / heldout_fraction)``-th document goes to the held-out split. ``max_tokens`` caps
    the total: tokenization stops at the end of the document (or long-document piece) that reaches it.
    Raises DataError, leaving ``out_dir`` as it was, on bad input.
    """
    from tqdm.auto import tqdm

    if tokenizer is None:
        raise DataError("no tokenizer given: pass the model's tokenizer")
    if not 0 < heldout_fraction <= 0.5:
        raise DataError(f"heldout_fraction={heldout_fraction} is outside (0, 0.5]: pass e.g. 0.02")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens={max_tokens} is not positive: pass a positive number, or None for all data")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token: set tokenizer.eos_token, or use the model's own tokenizer")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output '{out}' is a file, not a directory: pass a directory for the token shards")
    vocab_size = _vocab_size(tokenizer)
    dtype = "uint16" if vocab_size < 65536 else "uint32"
    sources = resolve_sources(data, text_field, exclude=out)
    every = max(2, round(1 / heldout_fraction))
    key = dict(
        format=FORMAT_VERSION,
        sources=fingerprint(sources, text_field, split),
        tokenizer=tokenizer_fingerprint(tokenizer),
        every=every,
        max_tokens=max_tokens,
        dtype=dtype,
    )
    fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    meta = _existing(out, fp)
    if meta is not None:
        if show_progress:  # quiet callers (other DDP ranks, --quiet) print nothing
            print(f"reusing tokenized data in {out} (fingerprint {fp}: same sources and tokenizer)")
        return _info(out, meta, reused=True)

    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    tag = f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"  # unique even across nodes sharing a disk
    temps = {name: out / f".{name}{tag}" for name in ("train.bin", "heldout.bin", "meta.json")}
    try:
        with (
            open(temps["train.bin"], "wb") as train_f,
            open(temps["heldout.bin"], "wb") as held_f,
            tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing", disable=not show_progress) as bar,
        ):
            counts = _tokenize(sources, tokenizer, (train_f, held_f), dtype, every, max_tokens, text_field, split, bar)
        n_docs = counts["train_documents"] + counts["heldout_documents"]
        names = ", ".join(s.name for s in sources[:3]) + (", ..." if len(sources) > 3 else "")
        if n_docs == 0:
            raise DataError(f"no text found in the data ({names}): the files or dataset are empty; give data with text")
        if counts["heldout_documents"] == 0:
            fix = (
                f"raise heldout_fraction to at least {1 / n_docs:.3g}, or add documents"
                if n_docs >= 2
                else "add documents (a text file is one document: split it into several, or use JSONL, one per line)"
            )
            raise DataError(
                f"the held-out split would be empty: {n_docs} document(s), and every {every}th goes to held-out "
                f"(heldout_fraction={heldout_fraction}): {fix}"
            )
        meta = dict(
            format=FORMAT_VERSION,
            fingerprint=fp,
            dtype=dtype,
            **counts,
            vocab_size=vocab_size,
            eos_token_id=eos,
            heldout_fraction=heldout_fraction,
            heldout_every=every,
            max_tokens=max_tokens,
            text_field=text_field,
            split=split,
            source_fingerprint=key["sources"],
            tokenizer_fingerprint=key["tokenizer"],
            sources=[s.describe() for s in sources],
        )
        temps["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
        (out / "meta.json").unlink(missing_ok=True)  # old meta must never describe new shards
        os.replace(temps["train.bin"], out / "train.bin")
        os.replace(temps["heldout.bin"], out / "heldout.bin")
        os.replace(temps["meta.json"], out / "meta.json")
    except BaseException:
        for path in temps.values():
            path.unlink(missing_ok=True)
        for path in created:  # innermost first
            try:
                path.rmdir()
            except OSError:
                break
        raise
    if show_progress:
        print(
            f"tokenized {n_docs} documents into {out}: {counts['train_tokens']:,} train and "
            f"{counts['heldout_tokens']:,} held-out tokens ({dtype})"
        )
    return _info(out, meta, reused=False)


def _open_tokens(path, dtype) -> np.ndarray:
    path = Path(path)
    dtype = np.dtype(dtype)
    if not path.is_file():
        raise DataError(f"token file '{path}' does not exist: run prepare_tokens first")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"token file '{path}' has {size} bytes, not a whole number of {dtype}: pass meta.json's dtype")
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _gather(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> torch.Tensor:
    index = (np.asarray(windows, dtype=np.int64) * seq_len)[:, None] + np.arange(seq_len + 1)
    return torch.from_numpy(tokens[index].astype(np.int64))


def _n_windows(tokens: np.ndarray, seq_len: int, path, what: str) -> int:
    n = (len(tokens) - 1) // seq_len if len(tokens) else 0
    if n < 1:
        raise DataError(
            f"{what} '{path}' holds {len(tokens)} tokens, fewer than one window of seq_len+1={seq_len + 1}: "
            "use more data or a smaller seq_len"
        )
    return n


class TokenBatches:
    """Endless batches [batch_size, seq_len + 1] of windows of a token file, seeded and resumable.

    Window i is tokens[i*seq_len : i*seq_len + seq_len + 1]. Each epoch visits all windows in the order
    of a permutation drawn from numpy's default_rng((seed, epoch)). A step consumes world_size *
    batch_size consecutive entries of that order (continuing into the next epoch's order when one
    ends); rank r takes entries r, r + world_size, ... of them.
    """

    def __init__(self, path, dtype, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len={seq_len} and batch_size={batch_size} must be positive: pass positive values")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size}): pass the process's own rank")
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.tokens = _open_tokens(path, dtype)
        self.n_windows = _n_windows(self.tokens, seq_len, path, "training data")
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n_windows))
        return self._order[1]

    def next_batch(self) -> torch.Tensor:
        need, parts = self.batch_size * self.world_size, []
        while need:
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(need, self.n_windows - self.position)
            parts.append(self._permutation(self.epoch)[self.position : self.position + take])
            self.position += take
            need -= take
        windows = np.concatenate(parts)[self.rank :: self.world_size]
        return _gather(self.tokens, windows, self.seq_len)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return dict(
            epoch=self.epoch,
            position=self.position,
            seed=self.seed,
            seq_len=self.seq_len,
            n_windows=self.n_windows,
            batch_size=self.batch_size,
            world_size=self.world_size,
        )

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len") != self.seq_len or state.get("n_windows") != self.n_windows:
            raise DataError(
                f"the data position is for {state.get('n_windows')} windows of seq_len {state.get('seq_len')}, "
                f"this data has {self.n_windows} of seq_len {self.seq_len}: resume with the same data and seq_len"
            )
        if not 0 <= int(state["position"]) <= self.n_windows:
            raise DataError(f"data position {state['position']} is out of range: the checkpoint is corrupt")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._order = None


def evaluate_batches(
    path, dtype, seq_len: int, max_windows: int | None = None, batch_size: int = 8
) -> Iterator[torch.Tensor]:
    """Held-out windows in order (stride seq_len, the tail shorter than a window dropped), as
    LongTensors [n <= batch_size, seq_len + 1]; at most ``max_windows`` windows."""
    tokens = _open_tokens(path, dtype)
    n = _n_windows(tokens, seq_len, path, "held-out data")
    n = n if max_windows is None else min(n, max_windows)

    def batches():
        for start in range(0, n, batch_size):
            yield _gather(tokens, np.arange(start, min(n, start + batch_size)), seq_len)

    return batches()


def _bincount(path, dtype, vocab_size: int) -> np.ndarray:
    tokens = _open_tokens(path, dtype)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), READ_CHUNK):
        chunk = np.bincount(tokens[start : start + READ_CHUNK], minlength=vocab_size)
        if len(chunk) > vocab_size:
            raise DataError(
                f"'{path}' holds token id {len(chunk) - 1} >= vocab_size {vocab_size}: pass meta's vocab_size"
            )
        counts += chunk
    return counts


def unigram_perplexity(train_path, heldout_path, dtype, vocab_size: int) -> float:
    """Held-out perplexity of an add-one-smoothed unigram model fit on train: the baseline to beat."""
    counts = _bincount(train_path, dtype, vocab_size) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    held = _bincount(heldout_path, dtype, vocab_size)
    if held.sum() == 0:
        raise DataError(f"held-out file '{heldout_path}' is empty: prepare data with a non-empty held-out split")
    return float(np.exp(-(held * log_p).sum() / held.sum()))
