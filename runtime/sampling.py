"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded. numpy only.

Every backend (torch, onnxruntime, onnxruntime-genai, ExecuTorch) hands its logits to this one
implementation, so the same options and the same seed give the same tokens everywhere, given the
same logits. The steps, in order:

    temperature == 0 (or top_k == 1)  greedy: the index of the largest logit (the first one on a tie,
                                      as numpy's and torch's argmax)
    logits / temperature              then, over the tokens sorted by logit (stable: ties by index),
    top_k > 0                         keep the k most likely,
    top_p < 1                         keep the shortest prefix whose probability reaches top_p (at least one),
    draw                              one uniform number from numpy's PCG64 generator seeded with ``seed``,
                                      inverted through the kept tokens' cumulative probabilities.

Probabilities are computed in float64. One uniform draw per sampled token, so a seeded run is a
pure function of (seed, sequence of logits).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from effllm.common.errors import EffllmError


class SamplingError(EffllmError):
    """Sampling options that make no sense; the message names the option and the valid range."""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0  # 1 = all tokens
    seed: int | None = None  # None = a fresh random stream each run

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top-k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top-p must be in (0, 1] (1 = no limit), got {self.top_p}")
        if self.seed is not None and self.seed < 0:
            raise SamplingError(f"seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def as_dict(self) -> dict:
        return asdict(self)


GREEDY = SamplingConfig()


class Sampler:
    """Stateful only through its random generator: create one per generation to reproduce a seeded run."""

    def __init__(self, config: SamplingConfig = GREEDY):
        self.config = config
        self.rng = np.random.Generator(np.random.PCG64(config.seed))

    def __call__(self, logits) -> int:
        return self.sample(logits)

    def sample(self, logits) -> int:
        """The next token id from a 1-D array of logits (the last position's)."""
        logits = np.asarray(logits).reshape(-1)
        if self.config.greedy:
            return int(np.argmax(logits))
        ids, probs = self.distribution(logits)
        cumulative = np.cumsum(probs)
        u = self.rng.random() * cumulative[-1]
        index = int(np.searchsorted(cumulative, u, side="right"))
        return int(ids[min(index, len(ids) - 1)])

    def distribution(self, logits) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) the sampler draws from, most likely first; probabilities sum to 1."""
        c = self.config
        scaled = np.asarray(logits, dtype=np.float64).reshape(-1) / max(c.temperature, 1e-12)
        if c.top_k and c.top_k < scaled.size:
            # argpartition finds the k largest fast; the stable sort then orders them (ties: lower id first)
            candidates = np.argpartition(-scaled, c.top_k - 1)[: c.top_k]
            threshold = scaled[candidates].min()
            candidates = np.flatnonzero(scaled >= threshold)  # every token tied with the k-th, in id order
            order = candidates[np.argsort(-scaled[candidates], kind="stable")][: c.top_k]
        else:
            order = np.argsort(-scaled, kind="stable")
        kept = scaled[order]
        probs = np.exp(kept - kept[0])
        probs /= probs.sum()
        if c.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), c.top_p, side="left")) + 1
            order, probs = order[:keep], probs[:keep]
            probs = probs / probs.sum()
        return order, probs


__all__ = ["GREEDY", "Sampler", "SamplingConfig", "SamplingError"]
