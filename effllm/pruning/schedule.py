"""The parameter budget over training: continuous parameter dropping (docs/method.md "Schedule").

P(t) is the source size before ``start_tokens``, falls to the target size at ``end_tokens`` and
stays there. The fall is linear (the paper's Fig. 1c) or cubic, front-loaded as in gradual
magnitude pruning (Zhu & Gupta 2017): P = T + (S - T) * (1 - x)^3 with x the fraction of the
phase done, so most parameters go early while the model is large and the rest slowly. A prune
step calls ``Pruner.prune_to(budget(tokens))``, which removes lowest-density groups until
params <= P(t); so after every prune step
P(t) - (largest group) < params <= P(t), unless a floor stops it. ``stages(K)`` places K one-time
removals on the same curve (the one-shot and staged schedules).

Integer arithmetic only (no float rounding at billions of parameters): P(t) is rounded down, so
it is exactly ``target_params`` from ``end_tokens`` on and never above the line.
"""

from __future__ import annotations

from dataclasses import dataclass

BUDGET_CURVES = ("linear", "cubic")


@dataclass(frozen=True)
class ParameterBudget:
    source_params: int
    target_params: int
    start_tokens: int
    end_tokens: int
    curve: str = "linear"

    def __post_init__(self) -> None:
        if self.curve not in BUDGET_CURVES:
            raise ValueError(f"budget curve must be one of {BUDGET_CURVES} (got {self.curve!r})")
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
        done = tokens - self.start_tokens
        if self.curve == "cubic":  # the part of the drop still to come: (1 - x)^3, rounded down
            return int(self.target_params + (drop * (span - done) ** 3) // span**3)
        return int(self.source_params - (drop * done + span - 1) // span)

    def stages(self, k: int) -> list[tuple[int, int]]:
        """K removals spread evenly over the phase (a staged schedule; K = 1 is one-shot pruning):
        (tokens at which removal i happens, its budget) with removal i at the start of the i-th
        K-th of the phase, pruning to the budget of that K-th's end, so the last one reaches the
        target and is followed by the phase's last K-th and everything after as recovery."""
        if k < 1:
            raise ValueError(f"a staged schedule needs at least one stage (got {k})")
        span = self.end_tokens - self.start_tokens
        return [(self.start_tokens + span * i // k, self.budget(self.start_tokens + span * (i + 1) // k))
                for i in range(k)]  # fmt: skip


__all__ = ["BUDGET_CURVES", "ParameterBudget"]
