"""The backend contract: what every runtime backend implements and what the generator reads back.

A backend is one model in one runtime, batch 1. It owns its KV cache: ``forward(tokens, start_pos)``
runs ``tokens`` at positions start_pos.. and returns the last position's logits; ``start_pos == 0``
starts a new sequence. ``forward_all`` returns every position's logits (what export verification
compares with torch). The torch, onnxruntime, onnxruntime-genai and ExecuTorch backends implement
it, :class:`effllm.runtime.generate.TextGenerator` drives it, and ``effllm.export`` verification runs
the exported files through it.

numpy and the standard library only (no torch), so the onnxruntime path stays torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from effllm.common.errors import EffllmError


class GenerationError(EffllmError):
    """Input the user must fix (missing files, a prompt too long, options a backend lacks); one line."""


class Backend:
    """One model in one runtime, batch 1. Subclasses set the attributes and implement forward_all."""

    name = "backend"
    path: Path  # the file that runs (model.onnx, model.pte) or the directory (torch, genai)
    max_seq_len: int | None = None  # longest sequence (prompt + new tokens) it serves; None: no limit known
    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    vocab_size: int | None = None

    @classmethod
    def import_runtime(cls, threads: int | None = None) -> None:
        """Import (and set up) the runtime's own libraries, as loading a model would.

        effllm-bench calls it before loading, so a model's memory can be told apart from the runtime's.
        """

    def forward(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        """Run ``tokens`` at positions start_pos.. and return the last position's logits (float32 [vocab]).

        start_pos 0 starts a new sequence; otherwise it must equal the number of positions already run.
        """
        return self.forward_all(tokens, start_pos)[-1]

    def forward_all(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        """As :meth:`forward`, but the logits of every position of ``tokens`` (float32 [len(tokens), vocab])."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the runtime holds (sessions, programs); the default lets the GC do it."""


def check_continues(position: int, start_pos: int) -> None:
    """GenerationError unless start_pos continues a cache that holds ``position`` positions (0 restarts)."""
    if start_pos != 0 and start_pos != position:
        raise GenerationError(f"the cache holds {position} positions; cannot continue at {start_pos}")


@dataclass
class GenerationStats:
    backend: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # the prompt's forward pass
    first_token_s: float = 0.0  # from the start (prompt already tokenized) to the first new token
    decode_s: float = 0.0  # from the first new token to the last
    stop_reason: str = ""  # "eos", "max_new_tokens", "context" (the model's max_seq_len), or "stopped"

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d

    def summary(self) -> str:
        def rate(x):
            return "-" if x != x else f"{x:.1f}"

        return (
            f"[{self.backend}] {self.prompt_tokens} prompt tokens ({rate(self.prefill_tokens_per_s)} tok/s), "
            f"{self.new_tokens} new tokens, first after {1000 * self.first_token_s:.0f} ms, "
            f"decode {rate(self.decode_tokens_per_s)} tok/s, stop: {self.stop_reason}"
        )


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: GenerationStats


def read_json(path: Path) -> dict:
    """The JSON object in ``path``, or {} when it is missing or unreadable (optional metadata files)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def as_id_list(value) -> tuple[int, ...]:
    """A token id, a list of them or None (as configs store EOS ids) -> a tuple of ints."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


__all__ = [
    "Backend",
    "Generation",
    "GenerationError",
    "GenerationStats",
    "as_id_list",
    "check_continues",
    "read_json",
]
