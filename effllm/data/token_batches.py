"""Reading token shards: one stream over the shard files, training batches, held-out windows.

``TokenShards`` reads the shards that prepare_tokens (data.py) wrote as one stream of token ids.
``TokenBatches`` reads the train shards in windows of ``seq_len + 1`` tokens with stride ``seq_len``
(inputs never overlap and every token after the first is a label exactly once), in a seeded order
reshuffled each epoch; the windows do not depend on how the stream is sharded. Its ``state_dict``
is the position a checkpoint stores. ``evaluate_batches`` and ``unigram_perplexity`` serve
held-out evaluation.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from effllm.data.sources import DataError

__all__ = ["TokenShards", "TokenBatches", "evaluate_batches", "unigram_perplexity"]

READ_CHUNK = 1 << 24  # tokens per chunk when scanning shards
OPEN_SHARDS = 64  # memory maps kept open at a time (each holds a file descriptor)


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
