"""Preparing the training data: text -> memory-mapped token shards, described by meta.json.

``prepare_tokens`` tokenizes the sources (see data_sources.py) with the model's tokenizer into
shards: ``out_dir/tokens-<fingerprint>/train-NNNNN.bin`` and ``heldout-NNNNN.bin`` (flat arrays,
each document followed by eos), described by ``out_dir/meta.json``; it reuses them while the
sources and tokenizer are unchanged; the held-out split is also written whole as
``out_dir/heldout.bin`` (for effllm-eval and effllm-export). Which text is held out is decided in
heldout_split.py; the document stream is cut into chunks of about ``shard_chars`` characters, one
pair of shards each, tokenized by ``num_proc`` processes (shards.py; the bytes do not depend on the
number); only a bounded number of chunks is in memory at a time, so a corpus far larger than RAM
streams through. Every finished chunk is on disk for good: a preparation killed at any moment
continues from its finished chunks when called again.

Reading the shards back (training batches, held-out windows, the unigram baseline) is
token_batches.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from effllm.common.fileio import write_json_atomic
from effllm.data import heldout as heldout_split
from effllm.data.shards import Encoder, cut_into_chunks, encode_chunks, shard_names, tokenizer_spec
from effllm.data.sources import DataError, Source, fingerprint, resolve_sources, tokenizer_fingerprint

__all__ = ["DataError", "TokenData", "prepare_tokens"]

FORMAT_VERSION = 2
SHARD_CHARS = 16 << 20  # characters of text per chunk: ~4M tokens, one pair of shard files
WAIT_POLL_S = 2.0
# Below this many held-out tokens a perplexity's sampling error is several percent (a note says so).
TRUSTED_HELDOUT_TOKENS = 16_384  # how often a waiting rank looks for the data rank 0 prepares


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
        heldout=("end", heldout_fraction) if single else ("every", every, "topped-up", heldout_fraction),
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
        pieces = heldout_split.end_of_file(sources[0].name, heldout_fraction, notes)
    else:
        pieces = heldout_split.every_nth_document(sources, text_field, split, every, heldout_fraction)
    encoder = Encoder(tokenizer_spec(tokenizer), eos, dtype, vocab_size)
    if resumed and show_progress:
        print(f"continuing the tokenization in {build} from its finished shards", flush=True)
    try:
        with tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing", disable=not show_progress) as bar:
            chunks = cut_into_chunks(pieces, shard_chars or SHARD_CHARS)
            results = encode_chunks(chunks, build, encoder, num_proc, max_tokens, bar)
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
    if counts["heldout_tokens"] < TRUSTED_HELDOUT_TOKENS:
        notes.append(
            f"the held-out split has only {counts['heldout_tokens']:,} tokens: perplexities on it move by several "
            f"percent between samples, so do not trust small differences; add text or raise the held-out fraction "
            f"(at least {TRUSTED_HELDOUT_TOKENS:,} tokens)"
        )
    for line in notes:
        print(line)
    if show_progress:
        print(
            f"tokenized {n_docs} documents into {len(results)} shard(s) in {build}: {counts['train_tokens']:,} train "
            f"and {counts['heldout_tokens']:,} held-out tokens ({dtype})"
        )
    return _info(out, meta | {"dir": build.name}, reused=False, notes=notes)
