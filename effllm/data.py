"""Training data: text -> memory-mapped token shards -> deterministic, resumable, DDP-sharded batches.

``prepare_tokens`` tokenizes the sources (see data_sources.py) with the model's tokenizer into
shards: ``out_dir/tokens-<fingerprint>/train-NNNNN.bin`` and ``heldout-NNNNN.bin`` (flat arrays,
each document followed by eos), described by ``out_dir/meta.json``; it reuses them while the
sources and tokenizer are unchanged; the held-out split is also written whole as
``out_dir/heldout.bin`` (for effllm-eval and effllm-export). The document stream is cut into chunks of about
``shard_chars`` characters, one pair of shards each, tokenized by ``num_proc`` processes (the bytes
do not depend on the number); only a bounded number of chunks is in memory at a time, so a corpus
far larger than RAM streams through. Every finished chunk is on disk for good (see shards.py): a
preparation killed at any moment continues from its finished chunks when called again.

Held-out text is whole documents (every ``round(1 / heldout_fraction)``-th); a single text file is
one document, so for it the held-out split is the end of the file instead.

``TokenBatches`` reads the train shards as one stream, in windows of ``seq_len + 1`` tokens with
stride ``seq_len`` (inputs never overlap and every token after the first is a label exactly once),
in a seeded order reshuffled each epoch; the windows do not depend on how the stream is sharded.
Its ``state_dict`` is the position a checkpoint stores. ``evaluate_batches`` and
``unigram_perplexity`` serve held-out evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data_sources import (
    DataError,
    Source,
    fingerprint,
    iter_pieces,
    resolve_sources,
    tokenizer_fingerprint,
)
from .fileio import write_json_atomic
from .shards import Chunk, Encoder, encode_chunk, finished_chunk, init_worker, shard_names, tokenizer_spec

__all__ = [
    "DataError",
    "TokenData",
    "TokenShards",
    "prepare_tokens",
    "TokenBatches",
    "evaluate_batches",
    "unigram_perplexity",
]

FORMAT_VERSION = 2
SHARD_CHARS = 16 << 20  # characters of text per chunk: ~4M tokens, one pair of shard files
READ_CHUNK = 1 << 24  # tokens per chunk when scanning shards
WAIT_POLL_S = 2.0  # how often a waiting rank looks for the data rank 0 prepares
OPEN_SHARDS = 64  # memory maps kept open at a time (each holds a file descriptor)


@dataclass
class TokenData:
    """What ``prepare_tokens`` wrote (or found): shard paths, dtype and token counts."""

    train_paths: list[Path]
    heldout_paths: list[Path]
    dtype: str  # "uint16" or "uint32"
    train_tokens: int
    heldout_tokens: int
    vocab_size: int
    eos_token_id: int
    fingerprint: str
    meta_path: Path
    reused: bool = False
    notes: list[str] = field(default_factory=list)

    # One name for "the training tokens": TokenBatches, evaluate_batches and unigram_perplexity take it.
    @property
    def train_path(self) -> list[Path]:
        return self.train_paths

    @property
    def heldout_path(self) -> list[Path]:
        return self.heldout_paths


def _vocab_size(tokenizer) -> int:
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def _shard_paths(root: Path, meta: dict) -> tuple[list[Path], list[Path]]:
    base = root / meta["dir"]
    return ([base / name for name, _ in meta["shards"]["train"]], [base / name for name, _ in meta["shards"]["heldout"]])


def _read_meta(root: Path, fp: str | None = None) -> dict | None:
    """meta.json in ``root`` (of fingerprint ``fp`` if given) whose shard files are all intact, else None."""
    try:
        meta = json.loads((root / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION or (fp is not None and meta.get("fingerprint") != fp):
            return None
        size = np.dtype(meta["dtype"]).itemsize
        for paths, split in zip(_shard_paths(root, meta), ("train", "heldout")):
            for path, (_, n) in zip(paths, meta["shards"][split]):
                if path.stat().st_size != n * size:
                    return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _info(root: Path, meta: dict, reused: bool, notes: list[str] | None = None) -> TokenData:
    train, held = _shard_paths(root, meta)
    return TokenData(
        train_paths=train,
        heldout_paths=held,
        dtype=meta["dtype"],
        train_tokens=meta["train_tokens"],
        heldout_tokens=meta["heldout_tokens"],
        vocab_size=meta["vocab_size"],
        eos_token_id=meta["eos_token_id"],
        fingerprint=meta["fingerprint"],
        meta_path=root / "meta.json",
        reused=reused,
        notes=notes or [],
    )


# ---- the document stream, cut into chunks ---------------------------------------------------------
def _marked_pieces(sources: list[Source], text_field: str, split: str, every: int) -> Iterator[tuple]:
    """(piece, end_of_document, held_out): every ``every``-th document is held out, whole."""
    doc_index = 0
    for source in sources:
        for piece, end in iter_pieces(source, text_field, split):
            yield piece, end, (doc_index + 1) % every == 0
            doc_index += end


def _single_file_pieces(path: str, heldout_fraction: float, note: list[str]) -> Iterator[tuple]:
    """One text file is one document: train on its beginning, hold out its last ``heldout_fraction``."""
    size = os.path.getsize(path)
    cut = size - max(1, round(size * heldout_fraction))  # bytes of training text
    seen, held = 0, False
    for piece, end in iter_pieces(Source("text", path)):
        if held:
            yield piece, end, True
            continue
        nbytes = len(piece.encode("utf-8", "replace"))
        if seen + nbytes <= cut and not end:
            seen += nbytes
            yield piece, False, False
            continue
        # this piece holds the cut: split it after a line break near the cut (or exactly at it)
        k = min(len(piece) - 1, max(0, round((cut - seen) * len(piece) / max(nbytes, 1))))
        j = piece.rfind("\n", 0, k) + 1 or k
        head, tail = piece[:j], piece[j:]
        if head or seen:
            yield head, True, False
        held = True
        held_bytes = nbytes - len(head.encode("utf-8", "replace")) + size - seen - nbytes
        note.append(
            f"one text file: holding out its last {held_bytes:,} bytes ({held_bytes / max(size, 1):.1%}) "
            "for evaluation, training on the rest"
        )
        yield tail, end, True


def _chunks(pieces: Iterator[tuple], shard_chars: int) -> Iterator[Chunk]:
    chunk = Chunk(0)
    for piece in pieces:
        chunk.pieces.append(piece)
        chunk.chars += len(piece[0])
        if chunk.chars >= shard_chars:
            yield chunk
            chunk = Chunk(chunk.index + 1)
    if chunk.pieces:
        yield chunk


def _encode_all(chunks, build: Path, encoder: Encoder, num_proc: int, max_tokens: int | None, bar) -> list[dict]:
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


def _check_token_dir(source: Source, tokenizer, vocab_size: int) -> TokenData:
    """A directory of shards written by prepare_tokens, used as it is (tokenize once, read from every rank)."""
    root = Path(source.name)
    meta = _read_meta(root)
    if meta is None:
        raise DataError(
            f"'{root}' holds effllm token shards that are incomplete or of another format version: "
            "tokenize the text again (or finish the run that was tokenizing it, with --resume)"
        )
    theirs, ours = meta.get("tokenizer_fingerprint"), tokenizer_fingerprint(tokenizer)
    if theirs != ours or meta["vocab_size"] != vocab_size:
        raise DataError(
            f"the token shards in '{root}' were made with another tokenizer (fingerprint {theirs}, this model's "
            f"is {ours}): use shards tokenized with this model's tokenizer, or pass the text"
        )
    return _info(root, meta, reused=True)


def _remove_stale(out: Path, keep: str) -> None:
    """Shard directories of earlier preparations (finished or not) and the format-1 train file."""
    for path in out.glob("tokens-*"):
        if path.is_dir() and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
    (out / "train.bin").unlink(missing_ok=True)


def _concatenate(paths: list[Path], dest: Path) -> None:
    """``dest`` = the files one after another, written beside it and renamed."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for path in paths:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
    os.replace(tmp, dest)


def prepare_tokens(
    data=None,
    tokenizer=None,
    out_dir: str | os.PathLike = "data",
    heldout_fraction: float = 0.02,
    max_tokens: int | None = None,
    text_field: str = "text",
    split: str = "train",
    show_progress: bool = True,
    num_proc: int = 1,
    shard_chars: int | None = None,
    wait: bool = False,
) -> TokenData:
    """Tokenize ``data`` into shards in ``out_dir`` (see the module docstring), or reuse what is there.

    ``data``: None (the embedded corpus), or a path / dataset id, or a list of them (see data_sources);
    a directory of shards written by prepare_tokens (one holding meta.json) is used in place.
    A ``text_field`` whose values are lists of token ids (e.g. ``input_ids``) is taken as
    pre-tokenized: one row is one document. ``max_tokens`` caps the total: tokenization stops at
    the end of the document (or long-document piece) that reaches it. ``num_proc`` processes
    tokenize; the result is byte-identical for any number. Raises DataError on bad input, leaving
    ``out_dir`` as it was; a killed preparation leaves finished chunks that the next call reuses.
    ``wait=True`` tokenizes nothing: it waits until another process (DDP rank 0) has written the
    data of this fingerprint, checking the files, not a collective (which would time out: a large
    corpus takes hours).
    """
    from tqdm.auto import tqdm

    if tokenizer is None:
        raise DataError("no tokenizer given: pass the model's tokenizer")
    if not 0 < heldout_fraction <= 0.5:
        raise DataError(f"heldout_fraction={heldout_fraction} is outside (0, 0.5]: pass e.g. 0.02")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens={max_tokens} is not positive: pass a positive number, or None for all data")
    if num_proc < 1:
        raise DataError(f"num_proc={num_proc} is not positive: pass 1 or more processes")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token: set tokenizer.eos_token, or use the model's own tokenizer")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output '{out}' is a file, not a directory: pass a directory for the token shards")
    vocab_size = _vocab_size(tokenizer)
    dtype = "uint16" if vocab_size < 65536 else "uint32"
    sources = resolve_sources(data, text_field, exclude=out)
    if any(s.kind == "tokens" for s in sources):
        if len(sources) > 1:
            raise DataError("a directory of token shards must be the only data: pass it alone, or pass text only")
        return _check_token_dir(sources[0], tokenizer, vocab_size)
    single = len(sources) == 1 and sources[0].kind == "text"
    every = max(2, round(1 / heldout_fraction))
    key = dict(
        format=FORMAT_VERSION,
        sources=fingerprint(sources, text_field, split),
        tokenizer=tokenizer_fingerprint(tokenizer),
        heldout=("end", heldout_fraction) if single else ("every", every),
        max_tokens=max_tokens,
        dtype=dtype,
        shard_chars=shard_chars or SHARD_CHARS,  # chunking changes the shard files, not the token stream
    )
    fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    meta = _read_meta(out, fp)
    while wait and meta is None:
        time.sleep(WAIT_POLL_S)
        meta = _read_meta(out, fp)
    if meta is not None:
        if show_progress:  # quiet callers (other DDP ranks, --quiet) print nothing
            print(f"reusing tokenized data in {out} (fingerprint {fp}: same sources and tokenizer)")
        return _info(out, meta, reused=True)

    created = [p for p in (out, *out.parents) if not p.exists()]
    build = out / f"tokens-{fp}"
    resumed = build.is_dir()
    build.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if single:
        pieces = _single_file_pieces(sources[0].name, heldout_fraction, notes)
    else:
        pieces = _marked_pieces(sources, text_field, split, every)
    encoder = Encoder(tokenizer_spec(tokenizer), eos, dtype, vocab_size)
    if resumed and show_progress:
        print(f"continuing the tokenization in {build} from its finished shards", flush=True)
    try:
        with tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing", disable=not show_progress) as bar:
            results = _encode_all(_chunks(pieces, shard_chars or SHARD_CHARS), build, encoder, num_proc, max_tokens, bar)
        counts = {
            k: sum(r[k] for r in results)
            for k in ("train_tokens", "heldout_tokens", "train_documents", "heldout_documents")
        }
        n_docs = counts["train_documents"] + counts["heldout_documents"]
        names = ", ".join(s.name for s in sources[:3]) + (", ..." if len(sources) > 3 else "")
        if n_docs == 0:
            raise DataError(f"no text found in the data ({names}): the files or dataset are empty; give data with text")
        if counts["heldout_documents"] == 0:
            fix = f"raise heldout_fraction to at least {1 / n_docs:.3g}, or add documents" if n_docs >= 2 else "add text"
            if single:
                fix = "add text, or raise --max-data-tokens so that the end of the file is reached"
            raise DataError(
                f"the held-out split would be empty: {n_docs} document(s), and every {every}th goes to held-out "
                f"(heldout_fraction={heldout_fraction}): {fix}"
            )
    except DataError:
        shutil.rmtree(build, ignore_errors=True)  # bad input leaves nothing behind
        for path in created:  # innermost first
            try:
                path.rmdir()
            except OSError:
                break
        raise
    shards = {
        "train": [[shard_names(r["index"])[0], r["train_tokens"]] for r in results],
        "heldout": [[shard_names(r["index"])[1], r["heldout_tokens"]] for r in results],
    }
    meta = dict(
        format=FORMAT_VERSION,
        fingerprint=fp,
        dtype=dtype,
        **counts,
        vocab_size=vocab_size,
        eos_token_id=eos,
        heldout_fraction=heldout_fraction,
        heldout_every=None if single else every,
        heldout_from_end=single,
        max_tokens=max_tokens,
        text_field=text_field,
        split=split,
        source_fingerprint=key["sources"],
        tokenizer_fingerprint=key["tokenizer"],
        sources=[s.describe() for s in sources],
        shards=shards,
    )
    write_json_atomic(build / "meta.json", {**meta, "dir": "."})  # the shard directory describes itself too
    # The held-out split (small) also as one file, <out>/heldout.bin, where effllm-eval and effllm-export
    # look for it beside a run's model; meta.json's dtype and heldout_tokens describe it.
    _concatenate([build / name for name, _ in shards["heldout"]], out / "heldout.bin")
    write_json_atomic(out / "meta.json", {**meta, "dir": build.name})
    _remove_stale(out, keep=build.name)
    for r in results:
        (build / shard_names(r["index"])[2]).unlink(missing_ok=True)
    for tmp in build.glob(".*.tmp-*"):  # half-written files of a killed attempt
        tmp.unlink(missing_ok=True)
    for line in notes:
        print(line)
    if show_progress:
        print(
            f"tokenized {n_docs} documents into {len(results)} shard(s) in {build}: {counts['train_tokens']:,} train "
            f"and {counts['heldout_tokens']:,} held-out tokens ({dtype})"
        )
    return _info(out, meta | {"dir": build.name}, reused=False, notes=notes)


# ---- reading shards -------------------------------------------------------------------------------
def _paths(path) -> list[Path]:
    if isinstance(path, (str, os.PathLike)):
        return [Path(path)]
    return [Path(p) for p in path]


class TokenShards:
    """Token files read as one stream (memory maps opened lazily, at most OPEN_SHARDS at a time)."""

    def __init__(self, paths: Sequence | str | os.PathLike, dtype):
        self.paths, self.dtype = _paths(paths), np.dtype(dtype)
        sizes = []
        for path in self.paths:
            if not path.is_file():
                raise DataError(f"token file '{path}' does not exist: run prepare_tokens first")
            size = path.stat().st_size
            if size % self.dtype.itemsize:
                raise DataError(
                    f"token file '{path}' has {size} bytes, not a whole number of {self.dtype}: pass meta.json's dtype"
                )
            sizes.append(size // self.dtype.itemsize)
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def describe(self) -> str:
        return str(self.paths[0]) if len(self.paths) == 1 else f"{self.paths[0].parent} ({len(self.paths)} shards)"

    def _map(self, i: int) -> np.ndarray:
        if i in self._maps:
            self._maps.move_to_end(i)
            return self._maps[i]
        m = np.memmap(self.paths[i], dtype=self.dtype, mode="r")
        self._maps[i] = m
        if len(self._maps) > OPEN_SHARDS:
            self._maps.popitem(last=False)
        return m

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the stream (across shard boundaries)."""
        parts = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < end:
            while self.offsets[i + 1] <= start:  # skip empty shards
                i += 1
            lo, hi = start - self.offsets[i], min(end, self.offsets[i + 1]) - self.offsets[i]
            parts.append(self._map(i)[lo:hi])
            start = int(self.offsets[i]) + int(hi)
        return np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])

    def chunks(self, size: int = READ_CHUNK) -> Iterator[np.ndarray]:
        for start in range(0, len(self), size):
            yield self.read(start, min(len(self), start + size))


def _gather(tokens: TokenShards, windows: np.ndarray, seq_len: int) -> torch.Tensor:
    rows = [tokens.read(int(w) * seq_len, int(w) * seq_len + seq_len + 1) for w in windows]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def _n_windows(tokens: TokenShards, seq_len: int, what: str) -> int:
    n = (len(tokens) - 1) // seq_len if len(tokens) else 0
    if n < 1:
        raise DataError(
            f"{what} '{tokens.describe()}' holds {len(tokens)} tokens, fewer than one window of seq_len+1="
            f"{seq_len + 1}: use more data or a smaller seq_len"
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
        self.dtype = np.dtype(dtype)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.tokens = TokenShards(path, dtype)
        self.n_windows = _n_windows(self.tokens, seq_len, "training data")
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
    tokens = TokenShards(path, dtype)
    n = _n_windows(tokens, seq_len, "held-out data")
    n = n if max_windows is None else min(n, max_windows)

    def batches():
        for start in range(0, n, batch_size):
            yield _gather(tokens, np.arange(start, min(n, start + batch_size)), seq_len)

    return batches()


def _bincount(path, dtype, vocab_size: int) -> np.ndarray:
    tokens = TokenShards(path, dtype)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for part in tokens.chunks():
        chunk = np.bincount(part, minlength=vocab_size)
        if len(chunk) > vocab_size:
            raise DataError(
                f"'{tokens.describe()}' holds token id {len(chunk) - 1} >= vocab_size {vocab_size}: pass meta's vocab_size"
            )
        counts += chunk
    return counts


def unigram_perplexity(train_path, heldout_path, dtype, vocab_size: int) -> float:
    """Held-out perplexity of an add-one-smoothed unigram model fit on train: the baseline to beat."""
    counts = _bincount(train_path, dtype, vocab_size) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    held = _bincount(heldout_path, dtype, vocab_size)
    if held.sum() == 0:
        raise DataError(f"held-out data '{TokenShards(heldout_path, dtype).describe()}' is empty: prepare data with a non-empty held-out split")
    return float(np.exp(-(held * log_p).sum() / held.sum()))
