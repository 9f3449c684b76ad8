"""The embedded default corpus: documentation text that ships with every CPython.

Provenance: ``pydoc_data.topics`` (the Python Language Reference topics used by ``help()``) and
the docstrings of standard-library modules, both part of the CPython distribution under the
PSF License, so every machine that runs effllm has the same text and may redistribute it.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

# Standard-library modules with long, well-written docstrings; imported lazily, skipped if absent.
STDLIB_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "io",
    "itertools",
    "json",
    "logging",
    "math",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "zipfile",
)


def _docstrings(module_name: str) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
    except Exception:  # a stripped-down interpreter may lack a module; the corpus just gets smaller
        return []
    docs = [inspect.getdoc(module) or ""]
    for _, obj in sorted(vars(module).items()):
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == module_name:
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                docs += [inspect.getdoc(m) or "" for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)]
    return [d for d in docs if len(d) > 80]


def python_docs_corpus(include_stdlib: bool = True) -> list[str]:
    """Documents in a fixed order: pydoc topics, then stdlib docstrings. About 0.8 MB of English text."""
    import pydoc_data.topics as topics

    docs = [topics.topics[k] for k in sorted(topics.topics)]
    if include_stdlib:
        for name in STDLIB_MODULES:
            docs += _docstrings(name)
    return docs
