"""What a cache is and what it holds: shard keys, the cache id, its head, its commit log and its compact index.

Layout of a cache directory (docs/cache-format.md) — several caches live side by side in one ``cache.dir``:

    shards/<name>-<key16>.st          every shard of every cache in the dir (a shard's name carries its key)
    plans/<plan key>.json             per corpus stream: the shards it packs into (lets a rerun skip tokenizing)
    caches/<cache id>/head.json       one cache: what it is (teacher, tokenizer, format, corpus), totals, status
    caches/<cache id>/log/<run>-<n>.jsonl   committed entries, in immutable segments of ≤ 256 (append-only)
    caches/<cache id>/index-<sha16>.arrow   the compact index of a finished cache (tasks/cache/index.py)
    caches/<cache id>/leases/<run>.json     heartbeats of runs writing this cache (gc waits for them)

A shard's key hashes everything its bytes depend on (teacher weights, tokenizer, tokens, format and params,
temperature, FORMAT_VERSION); a cache's id hashes what *defines* the cache (:func:`cache_id`: the same minus the
tokens, plus the corpus settings), so two configs get two caches and two runs of one config write the same one. The
cache's content ``key`` is the order-free hash of its shard keys (:func:`tasks.cache.index.multiset_key`): the cache
stage records it, downstream stage keys include it, the registry tags model versions with it.

Committing a shard costs the writer O(1): the shard file (one create), one buffered log line, incremental totals
(:class:`Totals`). Finishing a cache writes its index once and replaces the small head.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from typing import Any, Iterator, TypedDict

from raydistill.tasks.cache.formats import format_params
from raydistill.tasks.cache.index import Index, IndexWriter, local_copy, multiset_key, shard_file  # noqa: F401
from raydistill.tasks.cache.store import Store
from raydistill.tasks.chatstream import chat_settings
from raydistill.tasks.config import CacheConfig, ConfigError, CorpusConfig, TeacherConfig
from raydistill.tasks.errors import DataError, StageMissingError
from raydistill.tasks.teacher import identity_key_fields, load_tokenizer, teacher_identity, tokenizer_hash

FORMAT_VERSION = 3  # 3: draws on the teacher's device (tasks/cache/draws.py), device type in the teacher's identity,
#                      byte budgets, the hidden format; 2 (sampled entries entropy-coded) and 1 are refused
LAYOUT_VERSION = 3  # 3: caches/<id>/head.json + log + index; 2 (one manifest.json per dir) is refused with a fix
LEGACY_MANIFEST = "manifest.json"
SHARD_DIR, PLAN_DIR, CACHES = "shards", "plans", "caches"
HEAD = "head.json"
CORPUS_FIELDS = ("path", "text_field", "max_tokens", "heldout_fraction", "heldout_max_tokens", "windows_per_shard",
                 "segment_bytes")
LOG_SEGMENT = 256  # entries per log segment; a crashed run loses at most this many log lines (files are adopted)
LOG_FLUSH_S = 10.0


class CacheCorruptError(DataError, RuntimeError):
    """A shard (or a head, log or index) fails verification; the message names it (the CLI exits 1 with it)."""


class CacheMissingError(StageMissingError, FileNotFoundError):
    """No cache at the configured place: the cache stage has not run there (a FileNotFoundError too, for callers
    that treat a missing cache as "nothing here yet")."""


class CacheMismatchError(ConfigError):
    """The cache was built for another config; the message names the differing field."""


class ShardEntry(TypedDict):
    """One committed shard, as the index and the log list it."""

    name: str
    split: str  # "train" | "heldout"
    key: str  # shard key (sha256 hex), see shard_key
    file: str  # path relative to the cache dir
    sha256: str  # of the whole file
    bytes: int
    tokens: int  # predicted tokens (rows)
    windows: int
    vocab_size: int
    teacher_nll_sum: float
    teacher_top1_correct: int


class Manifest(TypedDict, total=False):
    """``head.json`` of one cache (a JSON object; this type names its fields). ``shards`` is only in memory, for
    small caches built by hand (:func:`add_entry`); the cache stage streams entries into the log and index."""

    format_version: int  # FORMAT_VERSION of the writer
    layout_version: int  # LAYOUT_VERSION of the writer
    format: str  # a name in tasks.cache.formats.FORMATS
    params: dict[str, Any]  # dataclasses.asdict of the format's Params
    temperature: float  # T_c
    teacher: dict[str, Any]  # tasks.teacher.teacher_identity
    tokenizer_hash: str
    vocab_size: int | None  # teacher vocabulary (None until a shard is committed)
    seq_len: int
    corpus: dict[str, Any]  # the CORPUS_FIELDS of the corpus config
    id: str  # cache_id of the above
    planned_shards: int | None
    complete: bool  # every planned shard committed and indexed
    totals: dict[str, Any]  # see Totals
    key: str | None  # multiset_key of the indexed shard keys
    index: str | None  # index file, relative to the cache dir
    index_sha256: str | None
    fingerprint: str | None  # what the finished cache was planned from (corpus files' sizes/mtimes + settings)
    corpus_usage: dict[str, Any]  # tokens planned vs. the corpus' estimated size (a max_tokens cap says so)
    teacher_tokens_per_s: float | None  # written by the cache stage
    updated_at: float


def shard_key(teacher: dict, tok_hash: str, content_hash: str, params, temperature: float) -> str:
    """sha256 over everything a shard's bytes depend on (teacher identity incl. weights, tokenizer, tokens,
    format + ``params`` (a format's ``Params``), temperature, FORMAT_VERSION)."""
    payload = {"teacher": identity_key_fields(teacher), "tokenizer": tok_hash, "content": content_hash,
               "format": params.format, "params": dataclasses.asdict(params), "temperature": float(temperature),
               "version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _definition(head: dict) -> dict:
    return {"teacher": identity_key_fields(head["teacher"]), "tokenizer": head["tokenizer_hash"],
            "format": head["format"], "params": head["params"], "temperature": float(head["temperature"]),
            "seq_len": head["seq_len"], "corpus": head["corpus"], "version": FORMAT_VERSION,
            "layout": LAYOUT_VERSION}


def cache_id(head: dict) -> str:
    """16 hex digits naming the cache a head describes: same teacher, tokenizer, format, temperature and corpus
    settings ⇔ same id (the shards' tokens are not in it: a grown corpus grows the same cache)."""
    return hashlib.sha256(json.dumps(_definition(head), sort_keys=True).encode()).hexdigest()[:16]


def cache_key(manifest: Manifest) -> str | None:
    """The cache's content key (None while it indexes no shard)."""
    if "shards" in manifest:  # built by hand, in memory
        return multiset_key(e["key"] for e in manifest["shards"])
    return manifest.get("key")


def new_manifest(teacher: dict, tok_hash: str, cache: CacheConfig, corpus: CorpusConfig) -> Manifest:
    """An empty head describing what this cache holds."""
    head: Manifest = {"format_version": FORMAT_VERSION, "layout_version": LAYOUT_VERSION, "format": cache.format,
                      "params": dataclasses.asdict(format_params(cache)), "temperature": cache.temperature,
                      "teacher": teacher, "tokenizer_hash": tok_hash, "vocab_size": None, "seq_len": corpus.seq_len,
                      "corpus": {**{k: getattr(corpus, k) for k in CORPUS_FIELDS}, **chat_settings(corpus)},
                      "planned_shards": None,
                      "complete": False, "totals": Totals().as_dict(), "key": None, "index": None,
                      "index_sha256": None, "fingerprint": None, "corpus_usage": {}}
    head["id"] = cache_id(head)
    return head


class Totals:
    """Running totals over committed entries (O(1) per entry)."""

    def __init__(self):
        self.shards = self.tokens = self.bytes = self.heldout_tokens = self.heldout_top1 = 0
        self.heldout_nll = 0.0
        self.vocab_size = None

    def add(self, entry: dict) -> None:
        if self.vocab_size not in (None, entry["vocab_size"]):
            raise CacheCorruptError(f"shard {entry['name']}: vocab size {entry['vocab_size']} != "
                                    f"{self.vocab_size} of the other shards")
        self.vocab_size = entry["vocab_size"]
        self.shards, self.tokens, self.bytes = self.shards + 1, self.tokens + entry["tokens"], self.bytes + entry["bytes"]
        if entry["split"] == "heldout":
            self.heldout_tokens += entry["tokens"]
            self.heldout_nll += entry["teacher_nll_sum"]
            self.heldout_top1 += entry["teacher_top1_correct"]

    def as_dict(self) -> dict:
        h = self.heldout_tokens
        return {"shards": self.shards, "tokens": self.tokens, "bytes": self.bytes,
                "bytes_per_token": self.bytes / self.tokens if self.tokens else None,
                "train_tokens": self.tokens - h, "heldout_tokens": h,
                "teacher_heldout_nll": self.heldout_nll / h if h else None,
                "teacher_heldout_top1_acc": self.heldout_top1 / h if h else None}


def add_entry(manifest: Manifest, entry: ShardEntry) -> None:
    """Add a committed shard to a head built by hand (in memory; :func:`write_manifest` indexes it). O(1)."""
    manifest.setdefault("shards", []).append(entry)
    totals = manifest.setdefault("_totals", Totals())
    totals.add(entry)
    manifest["vocab_size"], manifest["totals"] = totals.vocab_size, totals.as_dict()


def head_path(cid: str) -> str:
    return f"{CACHES}/{cid}/{HEAD}"


def write_head(store: Store, head: Manifest) -> None:
    head = {k: v for k, v in head.items() if k not in ("shards", "_totals")}
    head["updated_at"] = time.time()
    store.replace(head_path(head["id"]), json.dumps(head, indent=1, sort_keys=True).encode())


def write_manifest(cache_dir: str, manifest: Manifest) -> None:
    """Index and publish a head built by hand with :func:`add_entry` (tests, benchmarks): O(its shards)."""
    store = Store(cache_dir)
    writer = IndexWriter(index_temp_dir(store))
    for entry in manifest.get("shards", []):
        writer.add(entry)
    publish_index(store, manifest, writer)
    manifest["key"] = writer.key.hexdigest()
    write_head(store, manifest)


def index_temp_dir(store: Store) -> str | None:
    """Where an :class:`IndexWriter` for ``store`` writes: inside a local cache dir (published by a link, never
    copied), the system's temp dir for an object store (uploaded from there)."""
    if store.remote:
        return None
    import os

    os.makedirs(store.path(CACHES), exist_ok=True)
    return store.path(CACHES)


def publish_index(store: Store, head: Manifest, writer: IndexWriter) -> None:
    """Close ``writer``, store its file as ``caches/<id>/index-<sha16>.arrow`` (named by its content: written once)
    and point ``head`` at it. The file is linked (local) or streamed (object store), never read into memory."""
    import os

    path, sha, _ = writer.close()
    rel = f"{CACHES}/{head['id']}/index-{sha[:16]}.arrow"
    try:
        store.create_from_file(rel, path)
    finally:
        os.unlink(path)
    head["index"], head["index_sha256"], head["key"] = rel, sha, writer.key.hexdigest()


def read_head(store: Store, cid: str) -> Manifest | None:
    """The head of cache ``cid`` in ``store`` (None if there is none)."""
    try:
        data = store.read(head_path(cid))
    except FileNotFoundError:
        return None
    try:
        head = json.loads(data)
    except json.JSONDecodeError as e:
        raise CacheCorruptError(f"{store.url(head_path(cid))}: not valid JSON ({e})") from None
    if head.get("format_version") != FORMAT_VERSION or head.get("layout_version") != LAYOUT_VERSION:
        raise CacheMismatchError(f"cache {store.url(head_path(cid))} was written by another raydistill (format "
                                 f"{head.get('format_version')}, layout {head.get('layout_version')}; this one "
                                 f"reads {FORMAT_VERSION}/{LAYOUT_VERSION}); rerun `raydistill cache`")
    return head


def list_cache_ids(store: Store) -> list[str]:
    """Ids of the caches in a cache dir (one listing of ``caches/``; a dir holds a handful)."""
    if not store.remote:
        import os

        base = store.path(CACHES)
        return sorted(d for d in (os.listdir(base) if os.path.isdir(base) else []) if not d.startswith("."))
    if store._s3 is None:  # other object stores: pyarrow lists prefixes as directories
        import pyarrow.fs as pafs

        infos = store.fs.get_file_info(pafs.FileSelector(store.path(CACHES), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    prefix = store.path(CACHES).rstrip("/") + "/"
    page = store._retry("list", CACHES, lambda: store._s3.list_objects_v2(Bucket=store.bucket, Prefix=prefix,
                                                                          Delimiter="/"))
    return sorted(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))


# ----------------------------------------------------------------------------------------------- the commit log

class CacheLog:
    """Committed entries of one run, written as immutable segments ``caches/<id>/log/<run>-<n>.jsonl`` every
    :data:`LOG_SEGMENT` entries or :data:`LOG_FLUSH_S` seconds: O(1) store writes per entry, and a crash loses at
    most one segment's lines (their shard files are re-adopted by the next run)."""

    def __init__(self, store: Store, cid: str, run_id: str | None = None):
        self.store, self.cid = store, cid
        self.run_id = run_id or f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.buffer: list[dict] = []
        self.segments: list[str] = []
        self.last_flush = time.monotonic()

    def add(self, entry: dict) -> None:
        self.buffer.append(entry)
        if len(self.buffer) >= LOG_SEGMENT or time.monotonic() - self.last_flush > LOG_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            rel = f"{CACHES}/{self.cid}/log/{self.run_id}-{len(self.segments):06d}.jsonl"
            body = "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.buffer)
            self.store.create(rel, body.encode())
            self.segments.append(rel)
            self.buffer = []
        self.last_flush = time.monotonic()

    def remove_own(self) -> None:
        """Delete this run's segments (called once a finished index holds their entries)."""
        for rel in self.segments:
            try:
                self.store.remove(rel)
            except FileNotFoundError:
                pass


def read_log(store: Store, cid: str) -> Iterator[dict]:
    """Every entry in cache ``cid``'s log segments (any run's), segment by segment."""
    for info in store.iter_files(f"{CACHES}/{cid}/log"):
        if not info.name.endswith(".jsonl") or info.name.startswith("."):
            continue
        try:
            data = store.read(f"{CACHES}/{cid}/log/{info.name}")
        except FileNotFoundError:  # a finishing run removed its segments meanwhile: its index holds them
            continue
        for line in data.decode().splitlines():
            if line.strip():
                yield json.loads(line)


# --------------------------------------------------------------------------------------- config compatibility

def _first_difference(a, b, prefix: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        first = ("weights_sha256", "kind", "dtype")  # the decisive fields before the descriptive ones
        for k in [*first, *sorted(set(a) | set(b) - set(first))]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
    return f"{prefix} (cache: {a!r}, config: {b!r})"


def expected_heads(teacher: TeacherConfig, cache_cfg: CacheConfig, corpus: CorpusConfig) -> list[Manifest]:
    """The heads the cache stage would write for this config: one per device type and dtype ``teacher.dtype=auto``
    can resolve to (the device decides; a consumer does not know which device the cache ran on)."""
    identity = teacher_identity(teacher)
    tok_hash = tokenizer_hash(load_tokenizer(teacher))
    dtypes = ["float32", "bfloat16", "float16"] if teacher.dtype == "auto" else [identity["dtype"]]
    return [new_manifest({**identity, "dtype": d, "device": dev}, tok_hash, cache_cfg, corpus)
            for dev in ("cpu", "cuda") for d in dtypes]


def matching_want(head: dict, wants: list[Manifest]) -> Manifest:
    """The head of ``wants`` (:func:`expected_heads`) computed on the device type and dtype ``head`` was: the one to
    compare it with, so that ``teacher.dtype=auto`` is never reported as the difference."""
    have = (head["teacher"].get("dtype"), head["teacher"].get("device"))
    return next((w for w in wants if (w["teacher"]["dtype"], w["teacher"]["device"]) == have), wants[0])


def difference(head: dict, want: dict) -> str | None:
    """The first field where ``head`` differs from ``want`` (another head), or None."""
    have_t, want_t = identity_key_fields(head["teacher"]), identity_key_fields(want["teacher"])
    if have_t != want_t:
        return _first_difference(have_t, want_t, "teacher")
    for field in ("tokenizer_hash", "format", "temperature", "seq_len"):
        if head[field] != want[field]:
            return f"{field} (cache: {head[field]!r}, config: {want[field]!r})"
    for k in sorted(set(head["params"]) | set(want["params"])):
        if head["params"].get(k) != want["params"].get(k):
            return f"cache.{k} (cache: {head['params'].get(k)!r}, config: {want['params'].get(k)!r})"
    for k in (*CORPUS_FIELDS, "chat_mask", "chat_overflow", "chat_template"):
        if head["corpus"].get(k) != want["corpus"].get(k):
            return f"corpus.{k} (cache: {head['corpus'].get(k)!r}, config: {want['corpus'].get(k)!r})"
    return None


def check_compatible(cache, teacher: TeacherConfig, cache_cfg: CacheConfig, corpus: CorpusConfig) -> str:
    """Raise :class:`CacheMismatchError` naming the first field where the head of ``cache`` (an opened
    :class:`~tasks.cache.shards.Cache`) differs from what the cache stage would write for this config, or when it
    is unfinished; returns the cache's :func:`cache_key`."""
    m = cache.manifest
    wants = expected_heads(teacher, cache_cfg, corpus)
    diff = difference(m, matching_want(m, wants))
    if diff:
        what = "another teacher" if diff.startswith("teacher") else "another config"
        raise CacheMismatchError(f"cache {cache.where} was built for {what}: {diff}; rerun `raydistill cache`")
    if not m.get("complete"):
        raise CacheMismatchError(f"cache {cache.where} is incomplete ({m['totals'].get('shards')}/"
                                 f"{m.get('planned_shards')} shards; field 'complete'); rerun `raydistill cache` "
                                 "to finish it")
    return cache_key(m)
