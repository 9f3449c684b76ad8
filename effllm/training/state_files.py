"""A nested training state as two data files: its tensors in safetensors, everything else in JSON.

What a checkpoint keeps beside the model (optimizer state, pruner state, RNG states) is a tree of
dicts, lists and tuples around tensors, numbers, strings and numpy arrays. A pickle of it would run
code when loaded; these two files hold data only. ``flatten`` replaces every tensor by a reference
into the safetensors file and tags what JSON cannot say by itself (tuples, dicts with non-string
keys, numpy arrays), so ``unflatten`` gives back an equal tree: the same types, and tensors equal bit
for bit (floats go through JSON as their shortest round-trip repr, which is exact).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TENSOR, TUPLE, DICT, NDARRAY = "__tensor__", "__tuple__", "__dict__", "__ndarray__"
TAGS = (TENSOR, TUPLE, DICT, NDARRAY)
NDARRAY_KINDS = "biuf"  # numbers only: an object array would be a way back to arbitrary objects


def flatten(tree, tensors: dict[str, torch.Tensor]):
    """``tree`` as JSON-able data; its tensors go into ``tensors`` (on the CPU, contiguous)."""
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, torch.Tensor):
        name = f"t{len(tensors)}"
        t = tree.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory; a copy keeps each entry independent
        if any(t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in tensors.values()):
            t = t.clone()
        tensors[name] = t
        return {TENSOR: name}
    if isinstance(tree, np.ndarray):
        if tree.dtype.kind not in NDARRAY_KINDS:
            raise TypeError(f"cannot store a numpy array of dtype {tree.dtype}")
        return {NDARRAY: {"dtype": tree.dtype.str, "shape": list(tree.shape), "data": tree.ravel().tolist()}}
    if isinstance(tree, np.generic):
        return tree.item()
    if isinstance(tree, list):
        return [flatten(v, tensors) for v in tree]
    if isinstance(tree, tuple):
        return {TUPLE: [flatten(v, tensors) for v in tree]}
    if isinstance(tree, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in tree):
            return {k: flatten(v, tensors) for k, v in tree.items()}
        return {DICT: [[flatten(k, tensors), flatten(v, tensors)] for k, v in tree.items()]}
    raise TypeError(f"cannot store a {type(tree).__name__} in a checkpoint")


def unflatten(data, tensors: dict[str, torch.Tensor]):
    """The tree ``flatten`` was given; KeyError / ValueError / TypeError on data it cannot have written."""
    if isinstance(data, list):
        return [unflatten(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1 and next(iter(data)) in TAGS:
        tag, value = next(iter(data.items()))
        if tag == TENSOR:
            return tensors[value]
        if tag == TUPLE:
            return tuple(unflatten(v, tensors) for v in value)
        if tag == DICT:
            return {_hashable(unflatten(k, tensors)): unflatten(v, tensors) for k, v in value}
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in NDARRAY_KINDS:
            raise ValueError(f"numpy dtype {dtype} is not a number type")
        return np.array(value["data"], dtype=dtype).reshape(value["shape"])
    return {k: unflatten(v, tensors) for k, v in data.items()}


def _hashable(key):
    if isinstance(key, (list, dict)):
        raise TypeError(f"a {type(key).__name__} cannot be a dict key")
    return key


def save_state(tree, directory: Path, stem: str) -> None:
    """``directory/stem.safetensors`` (the tensors) and ``directory/stem.json`` (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten(tree, tensors)
    save_file(tensors, directory / f"{stem}.safetensors")
    (directory / f"{stem}.json").write_text(json.dumps(structure) + "\n")


def load_state(directory: Path, stem: str):
    """The tree ``save_state`` wrote; safetensors' or json's errors, or KeyError/ValueError/TypeError, when
    the files are not what it writes."""
    tensors = load_file(directory / f"{stem}.safetensors")
    return unflatten(json.loads((directory / f"{stem}.json").read_text()), tensors)
