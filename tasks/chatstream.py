"""Chat corpus files as masked token streams: what the planner (:mod:`tasks.plan`) packs instead of plain tokens.

    python -m pytest tests/unit/test_chatstream.py

A ``.jsonl`` or ``.parquet`` corpus file is a *chat file* when its first record is a chat record
(:func:`tasks.chat.chat_messages`: a ``messages`` list or a ``prompt``/``completion`` pair; a Parquet file: a
``messages`` column, or ``prompt`` and ``completion`` columns) — no setting needed. Every record of a chat file
must then be one (a text record there is an error naming its line: keep text and chat in separate files).

A chat stream (:class:`tasks.corpus.Stream`, a segment of the file) is read record by record, each rendered with
the teacher's chat template and its assistant mask (:func:`tasks.chat.render`, ``corpus.chat_mask``), fitted to
the windows (:func:`tasks.chat.fit`, ``corpus.chat_overflow``) and packed (:func:`tasks.chat.pack_iter`) into
``(ids, mask)`` chunks of bounded size: the stream is never held whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from raydistill.tasks.chat import ChatError, chat_messages, chat_template, fit, pack_iter, render
from raydistill.tasks.config import CorpusConfig
from raydistill.tasks.corpus import CorpusError, CorpusFile, Stream, bounded_lines

CHAT_COLUMNS = (("messages",), ("prompt", "completion"))


def _first_record(path: str, limit: int):
    with open(path, "rb") as f:
        for _, raw in bounded_lines(f, limit, path):
            line = raw.strip()
            if line:
                try:
                    return json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return None  # not JSON: the text reader reports it
    return None


def is_chat_file(file: CorpusFile, cfg: CorpusConfig) -> bool:
    """Whether ``file`` holds chat records (see the module doc); reads one line (or a Parquet schema)."""
    if file.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            names = set(pq.read_schema(file.path).names)
        except OSError:
            return False  # the text reader reports an unreadable file
        return any(set(cols) <= names for cols in CHAT_COLUMNS)
    if file.kind != "jsonl":
        return False
    record = _first_record(file.path, cfg.max_record_bytes)
    try:
        return chat_messages(record, file.path) is not None
    except ChatError:
        return True  # chat-shaped but malformed: reported with its line when the stream is read


def chat_settings(cfg: CorpusConfig) -> dict:
    """What the masks depend on besides the tokens and the tokenizer: part of plan keys and the cache id."""
    template = None
    if cfg.chat_template:
        p = Path(cfg.chat_template).expanduser()
        template = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else cfg.chat_template
    return {"chat_mask": cfg.chat_mask, "chat_overflow": cfg.chat_overflow, "chat_template": template}


def _records(stream: Stream, cfg: CorpusConfig) -> Iterator[tuple[str, dict]]:
    path = stream.file.path
    if stream.file.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        columns = next(list(c) for c in CHAT_COLUMNS if set(c) <= set(pf.schema_arrow.names))
        row = 0
        for batch in pf.iter_batches(columns=columns, batch_size=256):
            for record in batch.to_pylist():
                yield f"{path}: row {row}", record
                row += 1
        return
    with open(path, "rb") as f:
        f.seek(stream.start)
        offset = stream.start
        for lineno, raw in bounded_lines(f, cfg.max_record_bytes, path, stream.end):
            where = f"{path}:{lineno}" if stream.index == 0 else f"{path} (byte {offset})"
            offset += len(raw)
            line = raw.strip()
            if not line:
                continue
            try:
                yield where, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CorpusError(f"{where}: not valid JSON ({getattr(e, 'msg', e)})") from None


def chat_chunks(stream: Stream, cfg: CorpusConfig, tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids int32, mask uint8)`` chunks of the packed stream of ``stream``'s conversations (module doc); their
    concatenation is :func:`tasks.chat.masked_stream` of the same records. Padding is EOS, at mask 0."""
    if tokenizer.eos_token_id is None:
        raise CorpusError("the tokenizer has no EOS token; cannot pad chat windows")
    template = chat_template(tokenizer, cfg.chat_template)

    def pieces():
        for where, record in _records(stream, cfg):
            messages = chat_messages(record, where)
            if messages is None:
                raise ChatError(f"{where}: not a chat record (no 'messages' list, no 'prompt'/'completion' pair) "
                                f"in the chat file {stream.file.rel!r}; keep text and chat records in separate "
                                "files")
            conv = render(tokenizer, messages, template=template, mask=cfg.chat_mask, where=where)
            yield from fit(conv, cfg.seq_len + 1, cfg.chat_overflow, where)

    yield from pack_iter(pieces(), cfg.seq_len, tokenizer.eos_token_id)
