"""Atomic file output shared by every stage: a crash or a bad input never leaves a half-written file.

Standard library only, so the torch-free ONNX runtime can import it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, data, indent: int = 1) -> None:
    write_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")


def atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written directory into place; the previous one is removed only afterwards."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """An empty directory beside ``final`` to write into; it replaces ``final`` when the block succeeds.

    After a failure ``final`` is untouched and the leftover is cleared by the next attempt.
    """
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    atomic_replace_dir(tmp, final)


def unwritable_reason(out: Path, tool: str) -> str | None:
    """None if ``out`` can be created and written to, else the OS's reason (for a one-line error)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".{tool}-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        return str(err.strerror or err)
    return None
