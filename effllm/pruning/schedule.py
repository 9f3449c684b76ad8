"""The parameter budget over training: continuous parameter dropping (METHOD.md "Schedule").

P(t) is the source size before ``start_tokens``, falls linearly to the target size at
``end_tokens`` and stays there. A prune step calls ``Pruner.prune_to(budget(tokens))``, which
removes lowest-density groups until params <= P(t); so after every prune step
P(t) - (largest group) < params <= P(t), unless a floor stops it.

Integer arithmetic only (no float rounding at billions of parameters): P(t) is rounded down, so
it is exactly ``target_params`` from ``end_tokens`` on and never above the line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearBudget:
    source_params: int
    target_params: int
    start_tokens: int
    end_tokens: int

    def __post_init__(self) -> None:
        if self.target_params <= 0:
            raise ValueError(f"target_params must be positive (got {self.target_params})")
        if self.target_params > self.source_params:
            raise ValueError(
                f"target_params ({self.target_params:,}) is larger than source_params ({self.source_params:,}); "
                "pruning only shrinks a model"
            )
        if self.end_tokens < self.start_tokens or self.start_tokens < 0:
            raise ValueError(
                f"need 0 <= start_tokens <= end_tokens (got start {self.start_tokens:,}, end {self.end_tokens:,})"
            )

    def budget(self, tokens: int) -> int:
        """P(tokens): the parameter count allowed after this many training tokens."""
        tokens = int(tokens)
        if tokens >= self.end_tokens:
            return int(self.target_params)
        if tokens <= self.start_tokens:
            return int(self.source_params)
        span = self.end_tokens - self.start_tokens
        drop = self.source_params - self.target_params
        return int(self.source_params - (drop * (tokens - self.start_tokens) + span - 1) // span)

    def __call__(self, tokens: int) -> int:
        return self.budget(tokens)

    def active(self, tokens: int) -> bool:
        """True while the budget is still falling (start <= tokens < end)."""
        return self.start_tokens <= tokens < self.end_tokens

    def done(self, tokens: int) -> bool:
        return tokens >= self.end_tokens


__all__ = ["LinearBudget"]
