"""Where training text comes from: files, directories, Hugging Face datasets, the embedded corpus.

``resolve_sources`` turns the user's ``data`` argument into a list of ``Source`` objects, checking
up front what can be checked without reading everything (paths exist, directories hold supported
files, Parquet schemas hold the text field). Each source yields *pieces* ``(text, end_of_document)``:
a long document arrives as several pieces (cut after a newline), so a few-hundred-MB text file is
never one string. ``fingerprint`` identifies the sources cheaply (path, size and mtime for files).

A ``data`` string that is not an existing path is a Hugging Face dataset id, ``owner/name`` or
``owner/name:config``; the prefix ``hf:`` forces that reading (``hf:/local/dataset_repo`` loads a
local directory through ``datasets.load_dataset``). A directory written by ``Dataset.save_to_disk``
is read with ``datasets.load_from_disk``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from effllm.common.errors import EffllmError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
SUPPORTED_TEXT = ".txt/.md/.text, .jsonl/.json (one object per line) or .parquet"
# A longer document is encoded in pieces of about this size, cut after a newline (or before a space):
# transformers' tokenizer call slows down on long sequences, and batches of pieces run in parallel.
PIECE_CHARS = 1 << 12
# A JSONL line is read whole before json parses it; past this a line is refused, not read on into memory.
MAX_LINE_BYTES = 64 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


class DataError(EffllmError):
    """Bad data input; the message is one line naming the problem and the fix."""


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def split_pieces(text: str, limit: int | None = None) -> Iterator[tuple[str, bool]]:
    """``text`` as pieces of about ``limit`` (PIECE_CHARS) characters, cut after a newline where there is one."""
    limit, start = limit or PIECE_CHARS, 0
    while len(text) - start > limit:
        cut = text.rfind("\n", start, start + limit) + 1 or text.rfind(" ", start + 1, start + limit)
        cut = cut if cut > start else start + limit
        yield text[start:cut], False
        start = cut
    yield text[start:], True


@dataclass(frozen=True)
class Source:
    kind: str  # "corpus", "text", "jsonl", "parquet", "hub", "disk", "tokens" (shards of prepare_tokens)
    name: str  # a path, or a dataset id
    config: str | None = None

    def describe(self) -> str:
        return f"{self.kind}:{self.name}" + (f":{self.config}" if self.config else "")


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSON_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _is_token_dir(path: Path) -> bool:
    """A directory of token shards written by data.prepare_tokens (its meta.json lists them)."""
    try:
        return "shards" in json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False


def _walk(root: Path, exclude: Path | None) -> list[Path]:
    """Supported files under ``root``, recursively, sorted by relative path; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (exclude is None or (here / d).resolve() != exclude)
        )
        found += [here / f for f in filenames if not f.startswith(".") and _kind(Path(f))]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _hub_source(item: str) -> Source:
    name = item[3:] if item.startswith("hf:") else item
    config = None
    head, sep, tail = name.rpartition(":")
    if sep and head and "/" not in tail and "\\" not in tail:
        name, config = head, tail
    return Source("hub", name, config)


def resolve_sources(data, text_field: str = "text", exclude: str | os.PathLike | None = None) -> list[Source]:
    """The sources named by ``data`` (None, a str, or a list of str), in order; raises DataError."""
    if data is None:
        return [Source("corpus", "python_docs_corpus")]
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise DataError("no data given: pass a file, a directory or a dataset id, or omit data for the embedded corpus")
    excluded = Path(exclude).resolve() if exclude is not None else None
    sources: list[Source] = []
    for item in items:
        item = os.fspath(item)
        path = Path(item).expanduser()
        if item.startswith("hf:"):
            sources.append(_hub_source(item))
        elif path.is_dir():
            if _is_saved_dataset(path):
                sources.append(Source("disk", str(path.resolve())))
                continue
            if _is_token_dir(path):
                sources.append(Source("tokens", str(path.resolve())))
                continue
            files = _walk(path, excluded)
            if not files:
                raise DataError(
                    f"directory '{item}' holds no {SUPPORTED_TEXT} files: add some, or point to another one"
                )
            sources += [Source(_kind(f), str(f.resolve())) for f in files]
        elif path.is_file():
            if _kind(path) is None:
                raise DataError(f"unsupported data file '{item}': use {SUPPORTED_TEXT}")
            sources.append(Source(_kind(path), str(path.resolve())))
        elif _HUB_ID.match(item) and _kind(path) is None:
            sources.append(_hub_source(item))
        else:
            raise DataError(
                f"data path '{item}' does not exist: pass an existing file or directory, or a Hugging Face dataset id"
            )
    for source in sources:
        if source.kind == "parquet":
            _check_parquet(source.name, text_field)
    return sources


def _missing_field(where: str, field: str, fields) -> DataError:
    names = ", ".join(repr(str(f)) for f in fields) or "none"
    return DataError(f"{where} has no field '{field}' (its fields: {names}): choose one of those as the text field")


def _check_parquet(path: str, field: str) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # corrupt or not Parquet at all
        raise DataError(f"cannot read Parquet file '{path}' ({one_line(exc)}): check the file") from None
    if field not in names:
        raise _missing_field(f"Parquet file '{path}'", field, names)


def _record_text(value, where: str, field: str) -> str | list[int]:
    """The text of one record, or its token ids when the field holds a list of integers (``input_ids``)."""
    if value is None:
        return ""
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy / arrow arrays
        value = value.tolist()
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field '{field}' is {type(value).__name__}, not text or token ids: "
            "pass a text_field holding text (or a list of token ids)"
        )
    return value


def _not_text(path: str, err: UnicodeDecodeError | None = None) -> DataError:
    what = f"not UTF-8 text (byte {err.object[err.start]:#04x} cannot start a character)" if err else "binary"
    return DataError(f"'{path}' is {what}: give text files in UTF-8 (convert it, or leave it out of the data)")


def _checked_text(path: str, text: str) -> str:
    if "\x00" in text:  # valid UTF-8, but no text file holds NUL characters: a binary file
        raise _not_text(path)
    return text


def _read_pieces(f, path: str) -> Iterator[str]:
    rest = ""
    try:
        while chunk := f.read(PIECE_CHARS * 64):
            *done, (rest, _) = split_pieces(rest + _checked_text(path, chunk))
            yield from (text for text, _ in done)
    except UnicodeDecodeError as err:
        raise _not_text(path, err) from None
    if rest:
        yield rest


def _text_file(path: str) -> Iterator[tuple[str, bool]]:
    """The whole file is one document, read in pieces (see split_pieces); UTF-8 only."""
    with open(path, encoding="utf-8", newline="") as f:
        pieces = _read_pieces(f, path)
        piece, more = next(pieces, ""), next(pieces, None)
        if more is None and not piece.strip():
            return  # an empty (or blank) file is no document
        while more is not None:
            yield piece, False
            piece, more = more, next(pieces, None)
        yield piece, True


def _jsonl_file(path: str, field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip()
        f.seek(0)
        if head.startswith(b"["):  # a .json file holding one array of objects
            try:
                rows = json.loads(_checked_text(path, f.read().decode("utf-8")))
            except UnicodeDecodeError as err:
                raise _not_text(path, err) from None
            except json.JSONDecodeError as exc:
                raise DataError(f"'{path}' is not valid JSON ({one_line(exc)}): fix the file") from None
            lines = ((i + 1, row) for i, row in enumerate(rows))
        else:
            lines = _json_lines(f, path)
        for lineno, row in lines:
            where = f"'{path}' line {lineno}"
            if not isinstance(row, dict):
                raise DataError(f"{where} is not a JSON object: write one object per line, with a '{field}' field")
            if field not in row:
                raise _missing_field(where, field, row.keys())
            yield _record_text(row[field], where, field)


def _json_lines(f, path: str):
    """(line number, object) of a binary file object, each line read with at most MAX_LINE_BYTES."""
    lineno = 0
    while line := f.readline(MAX_LINE_BYTES + 1):
        lineno += 1
        if len(line) > MAX_LINE_BYTES:
            raise DataError(
                f"'{path}' line {lineno} is longer than {MAX_LINE_BYTES >> 20} MB, the most effllm reads as one JSON "
                "line: split that document, or give it as a text file"
            )
        try:
            text = _checked_text(path, line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise _not_text(path, err) from None
        if text.strip():
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"'{path}' line {lineno} is not valid JSON ({one_line(exc)}): fix that line") from None


def _parquet_file(path: str, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield _record_text(value, f"Parquet file '{path}'", field)


def _hub_dataset(source: Source, field: str, split: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(source.name, source.config, split=split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"'{source.name}' is not an existing path, and loading it as a Hugging Face dataset "
            f"(split '{split}'{', config ' + repr(source.config) if source.config else ''}) failed: "
            f"{one_line(exc)}: check the path, the dataset id, split and network (or log in for gated data)"
        ) from None
    if first is None:
        return
    if field not in first:
        raise _missing_field(f"dataset '{source.name}'", field, first.keys())
    where = f"dataset '{source.name}'"
    yield _record_text(first[field], where, field)
    try:
        for row in rows:
            yield _record_text(row.get(field), where, field)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"reading dataset '{source.name}' failed: {one_line(exc)}: check the network and retry"
        ) from None


def _saved_dataset(source: Source, field: str, split: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(source.name)
    except Exception as exc:
        raise DataError(f"cannot load saved dataset '{source.name}' ({one_line(exc)}): check the directory") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"saved dataset '{source.name}' has no split '{split}' (splits: {', '.join(ds)}): pass one")
        ds = ds[split]
    if field not in ds.column_names:
        raise _missing_field(f"saved dataset '{source.name}'", field, ds.column_names)
    for batch in ds.select_columns([field]).iter(batch_size=1024):
        for value in batch[field]:
            yield _record_text(value, f"saved dataset '{source.name}'", field)


def iter_pieces(source: Source, text_field: str = "text", split: str = "train") -> Iterator[tuple[str, bool]]:
    """``(text, end_of_document)`` pieces of ``source``'s documents in order; blank documents are skipped."""
    if source.kind == "text":
        yield from _text_file(source.name)
        return
    if source.kind == "corpus":
        from effllm.data.corpus import python_docs_corpus

        texts = python_docs_corpus()
    elif source.kind == "jsonl":
        texts = _jsonl_file(source.name, text_field)
    elif source.kind == "parquet":
        texts = _parquet_file(source.name, text_field)
    elif source.kind == "disk":
        texts = _saved_dataset(source, text_field, split)
    else:
        texts = _hub_dataset(source, text_field, split)
    for text in texts:
        if isinstance(text, list):  # pre-tokenized: one row is one document
            if text:
                yield text, True
        elif text.strip():
            yield from split_pieces(text)


def fingerprint(sources: list[Source], text_field: str, split: str) -> str:
    """Identifies the sources' content cheaply: files by path, size and mtime; the corpus by its text."""
    h = hashlib.sha256()
    for source in sources:
        h.update(source.describe().encode() + b"\0")
        if source.kind in ("text", "jsonl", "parquet"):
            st = os.stat(source.name)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(text_field.encode() if source.kind != "text" else b"")
        elif source.kind == "corpus":
            from effllm.data.corpus import python_docs_corpus

            for doc in python_docs_corpus():
                h.update(doc.encode("utf-8", "replace") + b"\0")
        elif source.kind in ("disk", "tokens"):
            for f in sorted(Path(source.name).rglob("*")):
                if f.is_file():
                    st = f.stat()
                    h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(f"{text_field}:{split}".encode())
        else:
            h.update(f"{text_field}:{split}".encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's model (vocab, merges), normalizer, pre-tokenizer and added tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for key in ("truncation", "padding"):  # runtime call settings, not the vocabulary
            spec.pop(key, None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    text += f"|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
