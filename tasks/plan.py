"""Packing a stream's tokens into windows and shards (the unit of caching), and the plan records reruns reuse.

    python -c "from raydistill.tasks.config import *; from raydistill.tasks.teacher import load_tokenizer; \
from raydistill.tasks.plan import build_shards; print(len(build_shards(CorpusConfig(max_tokens=8192), \
load_tokenizer(TeacherConfig()))))"

Windows. Window ``k`` of a stream ``S`` (:class:`tasks.corpus.Stream`'s tokens) is ``S[k*L : k*L + L + 1]``
(``L = seq_len``): the model reads ``w[:-1]``, the labels are ``w[1:]``; consecutive windows share one token, so every
stream token after the first is predicted once. A stream's incomplete last window is dropped. Windows cross
document boundaries freely (a JSONL of short records packs like one long text).

Chat files. A ``.jsonl``/``.parquet`` file of chat records (:mod:`tasks.chatstream`) is a stream of rendered
conversations with a loss mask on the assistant's tokens: its windows are cut the same way, each keeps the mask of
its labels (:attr:`ShardSpec.mask`, part of the shard's content hash), and a window with no masked-in label is
left out. The chat settings are part of the plan key.

Split. A window is held out when its :func:`tasks.corpus.window_draw` is below the held-out threshold
(:func:`heldout_threshold`): ``corpus.heldout_fraction``, halved as often as needed to keep the estimated held-out
tokens under ``corpus.heldout_max_tokens``. The threshold moves only in powers of two as the corpus grows, so the
held-out set of a grown corpus is nested in the old one plus new windows, and unchanged until the corpus doubles.

Shards. Each split of a stream is packed into shards of ``corpus.windows_per_shard`` consecutive windows, named
``<split>-<stream slug>-<n>``; only a stream's last shard of each split may be shorter. A shard depends only on its
stream's bytes and these settings: adding files adds only their shards; appending to a file changes at most the
last shards of its last segment.

Plan records. :func:`plan_record` is what a stream packs into without the tokens (names, splits, content hashes,
windows): stored as ``plans/<stat key>.json`` in the cache dir (:func:`stat_key`: the file's name, size and mtime,
its byte range and the settings — nothing read), it lets a rerun that finds every shard of a stream committed skip
tokenizing that stream. A file whose size or mtime changed is re-tokenized and checked by content: its unchanged
shards keep their content hashes, so their keys, so nothing is recomputed for them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from raydistill.tasks.chatstream import chat_chunks, chat_settings, is_chat_file
from raydistill.tasks.config import CorpusConfig
from raydistill.tasks.corpus import (CorpusError, CorpusFile, Stream, content_hash, list_files, streams, token_chunks,
                                     window_draw)

PLAN_VERSION = 1
BYTES_PER_TOKEN_ESTIMATE = 4.0  # English BPE: ~4 bytes/token; only sizes the held-out threshold and progress


@dataclass
class ShardSpec:
    """One shard before the teacher runs: ``tokens`` is int32 ``[W, L+1]``; ``doc_id`` is its stream's id."""

    name: str
    split: str
    tokens: np.ndarray
    content_hash: str
    doc_id: str
    mask: np.ndarray | None = None
    """uint8 ``[W, L]``, a chat stream's loss mask (``mask[w, j]``: the label of row j carries loss); None: all do."""


def estimated_tokens(files: Iterable[CorpusFile], max_tokens: int | None) -> int:
    """The corpus' size in tokens as planned, estimated from file sizes (capped by ``max_tokens``)."""
    est = int(sum(f.size for f in files) / BYTES_PER_TOKEN_ESTIMATE)
    return est if max_tokens is None else min(est, max_tokens)


def heldout_threshold(cfg: CorpusConfig, est_tokens: int) -> float:
    """``heldout_fraction``, or the largest power of two ``2^-k`` below it whose share of ``est_tokens`` fits in
    ``heldout_max_tokens`` (see the module doc)."""
    f = cfg.heldout_fraction
    if cfg.heldout_max_tokens is None or est_tokens * f <= cfg.heldout_max_tokens:
        return f
    return min(f, 2.0 ** -math.ceil(math.log2(est_tokens / cfg.heldout_max_tokens)))


def slug(stream_id: str) -> str:
    """Readable, filesystem-safe and collision-free (hash suffix) shard-name part for a stream."""
    base = re.sub(r"[^a-z0-9]+", "-", stream_id.lower()).strip("-")[-40:].strip("-") or "doc"
    return f"{base}-{hashlib.sha256(stream_id.encode()).hexdigest()[:6]}"


class _Packer:
    """Windows of one split → shards of ``per_shard`` windows."""

    def __init__(self, split: str, stream_id: str, per_shard: int):
        self.split, self.stream_id, self.per_shard = split, stream_id, per_shard
        self.windows: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.count = 0

    def add(self, window: np.ndarray, mask: np.ndarray | None = None) -> ShardSpec | None:
        self.windows.append(window)
        if mask is not None:
            self.masks.append(mask)
        return self.emit() if len(self.windows) == self.per_shard else None

    def emit(self) -> ShardSpec | None:
        if not self.windows:
            return None
        tokens = np.stack(self.windows).astype(np.int32)
        mask = np.stack(self.masks).astype(np.uint8) if self.masks else None
        self.windows, self.masks = [], []
        name = f"{self.split}-{slug(self.stream_id)}-{self.count:05d}"
        self.count += 1
        return ShardSpec(name, self.split, tokens, content_hash(tokens, mask), self.stream_id, mask)


def pack(chunks: Iterable[np.ndarray], cfg: CorpusConfig, stream_id: str, threshold: float,
         max_windows: int | None = None) -> Iterator[ShardSpec]:
    """The shards of one stream's token ``chunks`` (see the module doc), at most ``max_windows`` windows; holds
    one chunk and one shard per split. A chunk is int32 ids, or ``(ids, mask)`` (a chat stream,
    :mod:`tasks.chatstream`): then each window keeps the mask of its labels, and a window with no masked-in label
    is left out (nothing to learn there)."""
    L = cfg.seq_len
    packers = {s: _Packer(s, stream_id, cfg.windows_per_shard) for s in ("train", "heldout")}
    buf, mbuf, n = np.zeros(0, np.int32), None, 0
    for chunk in chunks:
        if isinstance(chunk, tuple):
            mbuf = np.concatenate([np.zeros(0, np.uint8) if mbuf is None else mbuf, chunk[1]])
            chunk = chunk[0]
        buf = np.concatenate([buf, chunk])
        start = 0
        while len(buf) - start >= L + 1 and (max_windows is None or n < max_windows):
            window = buf[start: start + L + 1]
            rows = None if mbuf is None else mbuf[start + 1: start + L + 1]
            start = start + L
            if rows is not None and not rows.any():
                continue
            spec = packers["heldout" if window_draw(window) < threshold else "train"].add(
                window.copy(), None if rows is None else rows.copy())
            n += 1
            if spec is not None:
                yield spec
        buf = buf[start:]
        mbuf = None if mbuf is None else mbuf[start:]
        if max_windows is not None and n >= max_windows:
            break
    for packer in packers.values():
        spec = packer.emit()
        if spec is not None:
            yield spec


def plan_stream(stream: Stream, cfg: CorpusConfig, tokenizer, threshold: float,
                max_windows: int | None = None) -> list[ShardSpec]:
    """Tokenize and pack one stream: its shards, in emission order (memory: the stream's tokens, bounded by
    ``corpus.segment_bytes``). A chat file's stream (:func:`tasks.chatstream.is_chat_file`) is rendered with the
    chat template and its shards carry the loss mask (none with ``corpus.chat_mask=none``)."""
    if not is_chat_file(stream.file, cfg):
        chunks = token_chunks(stream, cfg, tokenizer)
    elif cfg.chat_mask == "none":
        chunks = (ids for ids, _ in chat_chunks(stream, cfg, tokenizer))
    else:
        chunks = chat_chunks(stream, cfg, tokenizer)
    return list(pack(chunks, cfg, stream.id, threshold, max_windows))


def _settings(cfg: CorpusConfig, tok_hash: str, threshold: float, max_windows: int | None) -> dict:
    return {"v": PLAN_VERSION, "tokenizer": tok_hash, "seq_len": cfg.seq_len, "per_shard": cfg.windows_per_shard,
            "threshold": threshold, "text_field": cfg.text_field, "max_windows": max_windows,
            "max_record_bytes": cfg.max_record_bytes, **chat_settings(cfg)}


def stat_key(stream: Stream, cfg: CorpusConfig, tok_hash: str, threshold: float, max_windows: int | None) -> str:
    """A stream's plan key from its file's name, size and mtime and its byte range (no read)."""
    f = stream.file
    payload = {**_settings(cfg, tok_hash, threshold, max_windows), "rel": f.rel, "size": f.size,
               "mtime_ns": f.mtime_ns, "segment": stream.index, "range": [stream.start, stream.end]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_record(specs: list[ShardSpec]) -> list[list]:
    """``[[name, split, content hash, windows], …]``: a stream's plan without its tokens."""
    return [[s.name, s.split, s.content_hash, int(s.tokens.shape[0])] for s in specs]


def fingerprint(files: list[CorpusFile], settings: dict) -> str:
    """What a finished cache was planned from: every file's name, size and mtime, and the plan settings. Equal
    fingerprints let a rerun trust the finished cache's index without reading the corpus."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in files:
        h.update(f"\0{f.rel}\0{f.size}\0{f.mtime_ns}".encode())
    return h.hexdigest()


def all_streams(cfg: CorpusConfig, files: list[CorpusFile] | None = None) -> Iterator[Stream]:
    for file in files if files is not None else list_files(cfg):
        yield from streams(file, cfg.segment_bytes)


def build_shards(cfg: CorpusConfig, tokenizer) -> list[ShardSpec]:
    """Every shard of the corpus, planned serially in this process (tests, benchmarks and small corpora; the cache
    stage plans streams in parallel Ray tasks and never holds them all)."""
    L = cfg.seq_len
    max_windows = None if cfg.max_tokens is None else cfg.max_tokens // L
    if max_windows == 0:
        raise CorpusError(f"corpus.max_tokens={cfg.max_tokens} is less than one window (seq_len={L})")
    files = list_files(cfg)
    threshold = heldout_threshold(cfg, estimated_tokens(files, cfg.max_tokens))
    specs, n_windows, short = [], 0, []
    for stream in all_streams(cfg, files):
        room = None if max_windows is None else max_windows - n_windows
        new = plan_stream(stream, cfg, tokenizer, threshold, room)
        n = sum(s.tokens.shape[0] for s in new)
        specs, n_windows = specs + new, n_windows + n
        if n == 0:
            short.append(stream.id)
        if room is not None and n >= room:
            break
    check_plan(cfg, n_windows, short, {s.split for s in specs})
    return specs


def check_plan(cfg: CorpusConfig, n_windows: int, short: list[str], splits: set[str]) -> None:
    """The corpus gave windows of both splits, or a :class:`CorpusError`/warning saying what to change."""
    L = cfg.seq_len
    if n_windows == 0:
        raise CorpusError(f"corpus {cfg.path!r} is empty or too short: no stream has {L + 1} tokens for one window "
                          f"(windows never cross a file; lower corpus.seq_len or join small files)")
    if short:
        warnings.warn(f"corpus: {len(short)} file(s) shorter than one window ({L + 1} tokens) give no windows "
                      f"(e.g. {short[0]!r}); join small files or lower corpus.seq_len", stacklevel=3)
    for split in ("train", "heldout"):
        if split not in splits:
            warnings.warn(f"corpus: no {split} windows ({n_windows} windows, heldout_fraction="
                          f"{cfg.heldout_fraction}); use more tokens", stacklevel=3)
