"""Atomic training checkpoints with everything an exact resume needs.

Layout of <out>/checkpoint/: model/ (an HF model directory at the current, possibly pruned,
shapes), state.pt (optimizer, pruner EMAs, RNG states), trainer.json (step, tokens, data position,
run bookkeeping). A new checkpoint is written beside the old one and swapped in by rename, so a
crash at any moment leaves one complete checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from effllm.common.errors import EffllmError
from effllm.common.fileio import staged_dir, write_json_atomic


class CheckpointError(EffllmError):
    """A checkpoint that cannot be resumed from; the message says what is wrong."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model, tokenizer, optimizer, pruner, trainer_state: dict) -> None:
    with staged_dir(path) as tmp:
        model.save_pretrained(tmp / "model")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "pruner": pruner.state_dict() if pruner is not None else None,
                "rng": rng_state(),
            },
            tmp / "state.pt",
        )
        write_json_atomic(tmp / "trainer.json", trainer_state)


def latest_checkpoint(out: Path) -> Path | None:
    """``out/checkpoint``; or ``out/checkpoint.old`` when a kill landed between the two renames that
    swap a new checkpoint in (the old one moved aside, the new one not yet in place); or None."""
    for name in ("checkpoint", "checkpoint.old"):
        if (out / name / "trainer.json").is_file():
            return out / name
    return None


def load_checkpoint(path: Path) -> tuple[Path, dict, dict]:
    """(model directory, tensors from state.pt, trainer.json), or CheckpointError naming the problem."""
    if not (path / "trainer.json").is_file():
        raise CheckpointError(f"no checkpoint in {path}; start without --resume (or with --overwrite)")
    try:
        trainer_state = json.loads((path / "trainer.json").read_text())
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        if not (path / "model" / "config.json").is_file():
            raise FileNotFoundError("model/config.json missing")
        for key in ("optimizer", "rng"):
            if key not in state:
                raise KeyError(key)
    except Exception as err:  # any way of being unreadable is the same problem for the user
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"delete it and restart with --overwrite"
        ) from None
    return path / "model", state, trainer_state
