"""The held-out split: which text prepare_tokens (data.py) trains on and which it holds out.

Both functions yield the document stream as pieces ``(text or token ids, end_of_document, held_out)``,
the input of shards.Chunk. Held-out text is whole documents, every ``every``-th one, so that short
documents are never split between training and evaluation. Where documents are few and long, whole
documents cannot reach the asked fraction (99 long documents, every 50th held out: one document of 491
tokens where 2% asked for ~7,000), so the split is topped up by tokens: once the held-out share falls
behind the asked fraction by more than TOP_UP_SLACK characters, the next pieces of the current (long)
document are held out until the share is reached again; the training and the held-out part each end
there as documents of their own. A single text file is one document (nanoGPT's input.txt habit), so for
it the held-out split is the end of the file instead, cut after a line break.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from effllm.data.sources import PIECE_CHARS, Source, iter_pieces

# How far (characters) the held-out share may fall behind the asked fraction before the pieces of a long
# document are held out: two pieces (~2K tokens), so documents of one or two pieces always stay whole.
TOP_UP_SLACK = 2 * PIECE_CHARS


def every_nth_document(sources: list[Source], text_field: str, split: str, every: int,
                       fraction: float) -> Iterator[tuple]:  # fmt: skip
    """(piece, end_of_document, held_out): every ``every``-th document is held out whole, topped up by the
    pieces of long documents wherever whole documents leave the held-out share below ``fraction``."""
    doc_index, seen, held_chars, in_doc = 0, 0, 0, 0
    topping_up = False  # holding out pieces of the current document, which is not an every-nth one
    for source in sources:
        for piece, end in iter_pieces(source, text_field, split):
            whole = (doc_index + 1) % every == 0
            behind = fraction * seen - held_chars
            if not whole and not topping_up and behind > TOP_UP_SLACK:
                topping_up = True
                if in_doc:
                    yield piece[:0], True, False  # the document's training part ends here, as a document
            elif topping_up and behind <= 0:
                topping_up = False
                yield piece[:0], True, True  # the held-out part ends; the rest trains as a document of its own
            held = whole or topping_up
            yield piece, end, held
            size = len(piece)
            seen, in_doc = seen + size, in_doc + size
            held_chars += size if held else 0
            if end:
                doc_index, in_doc = doc_index + 1, 0
                topping_up = False


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

