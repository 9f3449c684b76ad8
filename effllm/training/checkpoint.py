"""Atomic training checkpoints with everything an exact resume needs.

Layout of <out>/checkpoint/: model/ (an HF model directory at the current, possibly pruned,
shapes), state.safetensors + state.json (optimizer, pruner EMAs, RNG states: tensors and the rest,
see state_files.py; data only, so loading a checkpoint runs no code), trainer.json (step, tokens,
data position, run bookkeeping). A new checkpoint is written beside the old one and swapped in by
rename, so a crash at any moment leaves one complete checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from effllm.common.errors import EffllmError
from effllm.common.fileio import staged_dir, write_json_atomic
from effllm.training.state_files import load_state, save_state

STATE = "state"  # state.safetensors + state.json
OLD_STATE = "state.pt"  # a pickle, what earlier effllm versions wrote; never loaded


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
        state = {
            "optimizer": optimizer.state_dict(),
            "pruner": pruner.state_dict() if pruner is not None else None,
            "rng": rng_state(),
        }
        save_state(state, tmp, STATE)
        write_json_atomic(tmp / "trainer.json", trainer_state)


def latest_checkpoint(out: Path) -> Path | None:
    """``out/checkpoint``; or ``out/checkpoint.old`` when a kill landed between the two renames that
    swap a new checkpoint in (the old one moved aside, the new one not yet in place); or None."""
    for name in ("checkpoint", "checkpoint.old"):
        if (out / name / "trainer.json").is_file():
            return out / name
    return None


def load_checkpoint(path: Path) -> tuple[Path, dict, dict]:
    """(model directory, the state save_checkpoint wrote, trainer.json), or CheckpointError naming the problem."""
    if not (path / "trainer.json").is_file():
        raise CheckpointError(f"no checkpoint in {path}; start without --resume (or with --overwrite)")
    if (path / OLD_STATE).is_file() and not (path / f"{STATE}.json").is_file():
        raise CheckpointError(
            f"checkpoint {path} is in the old format ({OLD_STATE}, a pickle, which effllm no longer loads because "
            "loading it can run code); restart the run with --overwrite"
        )
    try:
        trainer_state = json.loads((path / "trainer.json").read_text())
        state = load_state(path, STATE)
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
