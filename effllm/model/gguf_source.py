"""A GGUF file (what llama.cpp, ollama and LM Studio users have on disk) as a source checkpoint.

transformers' GGUF loader (it needs the ``gguf`` package) reads the file's metadata as a Llama /
Qwen2 / Mistral config, dequantizes its tensors to float and builds the tokenizer from the file's
own vocabulary, so a GGUF source then converts exactly like a Hugging Face directory. The weights
keep whatever the file's quantization left of them (a Q4 file gives weights on a 4-bit grid). Its header
is checked first (file_checks.gguf_problem): transformers' reader trusts the counts it finds there.
"""

from __future__ import annotations

import os
from pathlib import Path


def is_gguf_file(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a local file ending in .gguf (a hub id or a directory is not one)."""
    path = Path(source)
    return path.suffix.lower() == ".gguf" and path.is_file()


def gguf_location(source: str | os.PathLike) -> tuple[str, str]:
    """(directory, file name): how transformers' ``from_pretrained(dir, gguf_file=name)`` is called."""
    path = Path(source).resolve()
    return str(path.parent), path.name
