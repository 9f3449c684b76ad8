"""Checks of model files from elsewhere before any library parses them: safetensors, GGUF, code copies.

A truncated download or a crafted file should stop a command with one line saying which file is bad,
not with a parser's traceback, a huge allocation or a crash inside llama.cpp. safetensors' own
reader checks its header and that the tensors cover the file exactly. A GGUF header is walked
here with every count and length bounded by the bytes left in the file, so a header that claims
2**60 tensors or a string of 2**60 bytes is refused after reading a few bytes.

Standard library (plus safetensors and gguf's constants, imported when used): the torch-free
runtimes check their files with it too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
from pathlib import Path

from effllm.common.errors import EffllmError, first_line

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4  # llama.cpp's limit on a tensor's dimensions
GGUF_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types -> struct format of one scalar; 8 is a string, 9 an array
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
# The modules save_pretrained copies into a model directory; found, not imported (this stays torch-free).
CODE_COPIES = ("effllm.model.configuration_effllm", "effllm.model.modeling_effllm")
_warned: set[Path] = set()


class BadModelFileError(EffllmError):
    """A model file that is truncated, corrupt or not what its name says; the message names it."""


def check_safetensors(path: str | os.PathLike) -> None:
    """BadModelFileError unless ``path`` is a complete safetensors file (header and tensor extents)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        raise BadModelFileError(
            f"{path} is not a readable safetensors file ({first_line(err)}): it is truncated or corrupt; "
            "download or save it again"
        ) from None


def check_weights(model_dir: str | os.PathLike) -> None:
    """Every safetensors file of a model directory (one file, or the shards its index names)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise BadModelFileError(f"{index} is not a valid index ({first_line(err)}); save the model again") from None
        for name in shards:
            if Path(name).name != name:  # a shard is a file beside the index, never a path elsewhere
                raise BadModelFileError(f"{index} names {name!r}, which is not a file in {model_dir}")
            check_safetensors(model_dir / name)
    elif (model_dir / "model.safetensors").is_file():
        check_safetensors(model_dir / "model.safetensors")


def warn_if_code_differs(model_dir: str | os.PathLike) -> None:
    """One stderr line per directory whose code copies differ from the installed ones (they never run)."""
    model_dir = Path(model_dir)
    differing = []
    for module in CODE_COPIES:
        installed = Path(importlib.util.find_spec(module).origin)
        copy = model_dir / installed.name
        if copy.is_file() and copy.read_bytes() != installed.read_bytes():
            differing.append(copy.name)
    if differing and model_dir.resolve() not in _warned:
        _warned.add(model_dir.resolve())
        print(
            f"effllm: warning: {', '.join(differing)} in {model_dir} differ from the installed effllm's; "
            "the installed classes are used (a model directory's code is never run)",
            file=sys.stderr,
        )


class _Reader:
    """Little-endian reads from a file, each checked against the bytes left."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    @property
    def left(self) -> int:
        return self.size - self.f.tell()

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise ValueError(f"{what} needs {n:,} bytes but the file has {self.left:,} left")
        return self.f.read(n)

    def scalar(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, min_bytes_each: int) -> int:
        n = self.scalar("Q", what)
        if n * min_bytes_each > self.left:
            raise ValueError(f"{what} is {n:,}, more than the {self.left:,} bytes left in the file can hold")
        return n

    def string(self, what: str) -> str:
        return self.take(self.count(f"the length of {what}", 1), what).decode("utf-8", "replace")

    def skip_value(self, vtype: int, what: str):
        """Reads a metadata value; returns it when it is a scalar (general.alignment is needed)."""
        if vtype in GGUF_SCALARS:
            return self.scalar(GGUF_SCALARS[vtype], what)
        if vtype == GGUF_STRING:
            return self.string(what)
        if vtype == GGUF_ARRAY:
            etype = self.scalar("I", what)
            if etype in GGUF_SCALARS:
                width = struct.calcsize(GGUF_SCALARS[etype])
                self.take(self.count(f"the length of {what}", width) * width, what)
            elif etype in (GGUF_STRING, GGUF_ARRAY):
                for _ in range(self.count(f"the length of {what}", 8)):
                    self.skip_value(etype, what)
            else:
                raise ValueError(f"{what} is an array of unknown type {etype}")
            return None
        raise ValueError(f"{what} has unknown type {vtype}")


def _tensor_bytes(ggml_type: int, dims: list[int]) -> int | None:
    """Bytes of a tensor's data, or None for a type newer than the gguf package knows."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None
    n = 1
    for d in dims:
        n *= d
    return -(-n // block) * type_size


def gguf_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a complete GGUF file as far as its header tells, else what is wrong (one line)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        r = _Reader(f, size)
        try:
            head = f.read(4)
            if head != GGUF_MAGIC:
                return f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})"
            version = r.scalar("I", "the version")
            if version not in GGUF_VERSIONS:
                return f"{path} is GGUF version {version}; effllm reads versions {GGUF_VERSIONS}"
            # the smallest tensor entry: name length, n_dims, one dim, type, offset; the smallest pair: 8+1+4+1
            n_tensors, n_kv = r.count("the tensor count", 8 + 4 + 8 + 4 + 8), r.count("the metadata count", 14)
            alignment = GGUF_DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                key = r.string("a metadata key")
                value = r.skip_value(r.scalar("I", f"the type of {key}"), key)
                if key == "general.alignment":
                    alignment = value if isinstance(value, int) and value > 0 and not value & (value - 1) else 0
                    if not alignment:
                        return f"{path}: general.alignment is {value!r}, not a power of two"
            extents = []
            for _ in range(n_tensors):
                name = r.string("a tensor name")
                n_dims = r.scalar("I", f"the dimensions of {name}")
                if not 1 <= n_dims <= GGML_MAX_DIMS:
                    return f"{path}: tensor {name} has {n_dims} dimensions (GGUF allows 1 to {GGML_MAX_DIMS})"
                dims = [r.scalar("Q", f"the shape of {name}") for _ in range(n_dims)]
                ggml_type, offset = r.scalar("I", f"the type of {name}"), r.scalar("Q", f"the offset of {name}")
                extents.append((name, offset, _tensor_bytes(ggml_type, dims)))
            data_start = -(-f.tell() // alignment) * alignment
        except ValueError as err:
            return f"{path} is a truncated or corrupt GGUF file ({err})"
    for name, offset, nbytes in extents:
        end = data_start + offset + (nbytes or 1)
        if end > size:
            return (
                f"{path} is a truncated or corrupt GGUF file (tensor {name} ends at byte {end:,}, "
                f"past the file's {size:,})"
            )
    return None


def check_gguf(path: str | os.PathLike) -> None:
    problem = gguf_problem(path)
    if problem:
        raise BadModelFileError(f"{problem}; download or export it again")
