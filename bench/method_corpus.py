"""The method study's default corpus: the Linux kernel's documentation, English prose, offline.

Debian ships it as a package (GPL-2.0, like the kernel): one command installs it,

    apt-get install linux-doc-6.1        # ~37 MB download, ~24 MB of reStructuredText

Every .rst file under Documentation/ (minus translations/, which is not English) is one document,
about 2,800 documents and ~6M tokens with the study's 1,024-token BPE: enough for a source
pretrained on a few million tokens that does not repeat its data, and 100K+ held-out tokens of
whole documents. Any other corpus works through ``bench/method.py --data``.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from effllm.common.errors import EffllmError

DOC_ROOTS = sorted(Path("/usr/share/doc").glob("linux-doc-*/Documentation"))
INSTALL_HINT = "apt-get install linux-doc-6.1"

# General English from another source, for the real-source study's second held-out kind (what a model
# trained on kernel documentation must not forget): Debian's fortune-mod collection (BSD), one quotation,
# anecdote, poem or joke a document. Only its prose files: not the computing ones (close to the training
# domain), ASCII art, or collections that are mostly names and jargon.
FORTUNES_ROOT = Path("/usr/share/games/fortunes")
FORTUNES_HINT = "apt-get install fortunes"
FORTUNE_FILES = (
    "art", "education", "food", "fortunes", "humorists", "kids", "law", "literature", "love", "medicine",
    "men-women", "miscellaneous", "news", "people", "pets", "platitudes", "politics", "science", "sports",
    "wisdom", "work",
)  # fmt: skip


def linux_doc_files() -> list[Path]:
    """The English .rst(.gz) documents of the newest installed linux-doc package, in a stable order."""
    if not DOC_ROOTS:
        raise EffllmError(
            f"the study corpus is not installed: run `{INSTALL_HINT}` (Debian), or pass your own text with --data"
        )
    root = DOC_ROOTS[-1]
    files = [p for p in root.rglob("*.rst*") if "translations" not in p.relative_to(root).parts]
    return sorted(files)


def read_document(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def linux_doc_documents():
    """The corpus's documents, in a stable order, without stubs and index pages (they carry no prose)."""
    texts = (read_document(path).strip() for path in linux_doc_files())
    return (t for t in texts if len(t) >= 200)


def write_corpus_jsonl(out: Path) -> Path:
    """Write the corpus as JSONL (one document a line) once; reused while it exists."""
    if out.is_file():
        return out
    return write_documents_jsonl(linux_doc_documents(), out)


def fortune_documents() -> list[str]:
    """The fortunes of FORTUNE_FILES in a stable order (files sorted, each file's own order)."""
    missing = [name for name in FORTUNE_FILES if not (FORTUNES_ROOT / name).is_file()]
    if missing:
        raise EffllmError(
            f"the general-English held-out text is not installed ({FORTUNES_ROOT / missing[0]} is missing): "
            f"run `{FORTUNES_HINT}` (Debian), or pass your own text with --general"
        )
    docs = []
    for name in sorted(FORTUNE_FILES):
        text = (FORTUNES_ROOT / name).read_text(encoding="utf-8", errors="replace")
        docs += [d.strip() for d in text.split("\n%\n") if len(d.strip()) >= 40]  # "%" lines separate them
    return docs


def write_documents_jsonl(docs, out: Path) -> Path:
    """Documents as JSONL (one a line), written to a temporary file and renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, out)
    return out
