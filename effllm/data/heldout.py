"""The held-out split: which text prepare_tokens (data.py) trains on and which it holds out.

Both functions yield the document stream as pieces ``(text or token ids, end_of_document, held_out)``,
the input of shards.Chunk. Held-out text is whole documents, every ``every``-th one, so no document
is split between training and evaluation; a single text file is one document (nanoGPT's input.txt
habit), so for it the held-out split is the end of the file instead, cut after a line break.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from effllm.data.sources import Source, iter_pieces


def every_nth_document(sources: list[Source], text_field: str, split: str, every: int) -> Iterator[tuple]:
    """(piece, end_of_document, held_out): every ``every``-th document is held out, whole."""
    doc_index = 0
    for source in sources:
        for piece, end in iter_pieces(source, text_field, split):
            yield piece, end, (doc_index + 1) % every == 0
            doc_index += end


def end_of_file(path: str, heldout_fraction: float, note: list[str]) -> Iterator[tuple]:
    """One text file is one document: train on its beginning, hold out its last ``heldout_fraction``."""
    size = os.path.getsize(path)
    cut = size - max(1, round(size * heldout_fraction))  # bytes of training text
    seen, held = 0, False
    for piece, end in iter_pieces(Source("text", path)):
        if held:
            yield piece, end, True
            continue
        nbytes = len(piece.encode("utf-8", "replace"))
        if seen + nbytes <= cut and not end:
            seen += nbytes
            yield piece, False, False
            continue
        # this piece holds the cut: split it after a line break near the cut (or exactly at it)
        k = min(len(piece) - 1, max(0, round((cut - seen) * len(piece) / max(nbytes, 1))))
        j = piece.rfind("\n", 0, k) + 1 or k
        head, tail = piece[:j], piece[j:]
        if head or seen:
            yield head, True, False
        held = True
        held_bytes = nbytes - len(head.encode("utf-8", "replace")) + size - seen - nbytes
        note.append(
            f"one text file: holding out its last {held_bytes:,} bytes ({held_bytes / max(size, 1):.1%}) "
            "for evaluation, training on the rest"
        )
        yield tail, end, True

