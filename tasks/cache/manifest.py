"""What a cache holds and what it is: the manifest, the shard keys and the cache's one ``key``.

Layout (see docs/cache-format.md): ``<cache_dir>/manifest.json`` and ``<cache_dir>/shards/<name>-<key16>.st``.
A shard's key hashes everything its content depends on (teacher weights, tokenizer, tokens, format and
params, temperature, FORMAT_VERSION); the key is part of the file name, so a changed config never touches
an existing file. The cache's :func:`cache_key` hashes its shard keys in corpus order: the cache stage records
it, training checks against the manifest's identity fields, the registry tags model versions with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, TypedDict

from raydistill.tasks.cache.formats import format_params
from raydistill.tasks.cache.store import Store
from raydistill.tasks.config import CacheConfig, ConfigError, CorpusConfig, TeacherConfig
from raydistill.tasks.errors import DataError, StageMissingError
from raydistill.tasks.teacher import identity_key_fields, load_tokenizer, teacher_identity, tokenizer_hash

FORMAT_VERSION = 2  # 2: sampled entries entropy-coded (tasks/cache/sampledpack.py); 1 is refused
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
CORPUS_FIELDS = ("path", "text_field", "max_tokens", "heldout_fraction", "windows_per_shard")
REQUIRED = ("format_version", "format", "params", "temperature", "teacher", "tokenizer_hash", "seq_len", "shards",
            "totals")


class CacheCorruptError(DataError, RuntimeError):
    """A shard (or the manifest) fails verification; the message names it (the CLI exits 1 with it)."""


class CacheMissingError(StageMissingError, FileNotFoundError):
    """No cache at the configured place: the cache stage has not run there (a FileNotFoundError too, for callers
    that treat a missing cache as "nothing here yet")."""


class CacheMismatchError(ConfigError):
    """The cache was built for another config; the message names the differing field."""


class ShardEntry(TypedDict):
    """One committed shard, as the manifest lists it."""

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
    """``manifest.json`` (a JSON object on disk; this type names its fields)."""

    format_version: int  # FORMAT_VERSION of the writer
    format: str  # a name in tasks.cache.formats.FORMATS
    params: dict[str, Any]  # dataclasses.asdict of the format's Params
    temperature: float  # T_c
    teacher: dict[str, Any]  # tasks.teacher.teacher_identity
    tokenizer_hash: str
    vocab_size: int | None  # teacher vocabulary (None until a shard is committed)
    seq_len: int
    corpus: dict[str, Any]  # the CORPUS_FIELDS of the corpus config
    shards: list[ShardEntry]  # in corpus order once complete
    planned_shards: int | None
    complete: bool  # every planned shard committed
    totals: dict[str, Any]  # see add_entry
    teacher_tokens_per_s: float | None  # written by the cache stage


def shard_key(teacher: dict, tok_hash: str, content_hash: str, params, temperature: float) -> str:
    """sha256 over everything a shard's bytes depend on (teacher identity incl. weights, tokenizer, tokens,
    format + ``params`` (a format's ``Params``), temperature, FORMAT_VERSION)."""
    payload = {"teacher": identity_key_fields(teacher), "tokenizer": tok_hash, "content": content_hash,
               "format": params.format, "params": dataclasses.asdict(params), "temperature": float(temperature),
               "version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def shard_file(name: str, key: str) -> str:
    return f"{SHARD_DIR}/{name}-{key[:16]}.st"


def cache_key(manifest: Manifest) -> str | None:
    """The cache's identity: sha256 of its shard keys in corpus order (None while it lists no shards)."""
    keys = [e.get("key") for e in manifest.get("shards") or []]
    if not keys or not all(keys):
        return None
    return hashlib.sha256("".join(keys).encode()).hexdigest()


def new_manifest(teacher: dict, tok_hash: str, cache: CacheConfig, corpus: CorpusConfig) -> Manifest:
    """An empty manifest describing what this cache holds (shards are added by :func:`add_entry`)."""
    return {"format_version": FORMAT_VERSION, "format": cache.format,
            "params": dataclasses.asdict(format_params(cache)), "temperature": cache.temperature,
            "teacher": teacher, "tokenizer_hash": tok_hash, "vocab_size": None, "seq_len": corpus.seq_len,
            "corpus": {k: getattr(corpus, k) for k in CORPUS_FIELDS},
            "shards": [], "planned_shards": None, "complete": False, "totals": {}}


def add_entry(manifest: Manifest, entry: ShardEntry) -> None:
    """Record a committed shard and refresh the totals."""
    if manifest["vocab_size"] not in (None, entry["vocab_size"]):
        raise CacheCorruptError(f"shard {entry['name']}: vocab size {entry['vocab_size']} != "
                                f"{manifest['vocab_size']} of the other shards")
    manifest["vocab_size"] = entry["vocab_size"]
    manifest["shards"] = [e for e in manifest["shards"] if e["name"] != entry["name"]] + [entry]
    shards = manifest["shards"]
    held = [e for e in shards if e["split"] == "heldout"]
    held_tokens = sum(e["tokens"] for e in held)
    tokens, nbytes = sum(e["tokens"] for e in shards), sum(e["bytes"] for e in shards)
    manifest["totals"] = {
        "shards": len(shards), "tokens": tokens, "bytes": nbytes,
        "bytes_per_token": nbytes / tokens if tokens else None,
        "train_tokens": tokens - held_tokens, "heldout_tokens": held_tokens,
        "teacher_heldout_nll": sum(e["teacher_nll_sum"] for e in held) / held_tokens if held_tokens else None,
        "teacher_heldout_top1_acc": sum(e["teacher_top1_correct"] for e in held) / held_tokens
        if held_tokens else None}


def write_manifest(cache_dir: str, manifest: Manifest) -> None:
    """Atomically replace the manifest (temp + fsync + rename)."""
    Store(cache_dir).replace(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def read_manifest(cache_dir: str) -> Manifest:
    """Load and validate ``<cache_dir>/manifest.json`` (FileNotFoundError, CacheCorruptError, CacheMismatchError)."""
    store = Store(cache_dir)
    if not store.exists(MANIFEST):
        raise CacheMissingError(f"no teacher cache at {cache_dir} (no {MANIFEST}); run `raydistill cache` first")
    try:
        manifest = json.loads(store.read(MANIFEST))
    except json.JSONDecodeError as e:
        raise CacheCorruptError(f"{cache_dir}/{MANIFEST}: not valid JSON ({e})") from None
    missing = set(REQUIRED) - set(manifest)
    if missing:
        raise CacheCorruptError(f"{cache_dir}/{MANIFEST}: missing fields {sorted(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CacheMismatchError(f"cache {cache_dir} has format_version {manifest['format_version']}, this "
                                 f"raydistill reads {FORMAT_VERSION}; rerun `raydistill cache`")
    return manifest


def _first_difference(a, b, prefix: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        first = ("weights_sha256", "kind", "dtype")  # the decisive fields before the descriptive ones
        for k in [*first, *sorted(set(a) | set(b) - set(first))]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
    return f"{prefix} (cache: {a!r}, config: {b!r})"


def check_compatible(cache, teacher: TeacherConfig, cache_cfg: CacheConfig, corpus: CorpusConfig) -> str:
    """Raise :class:`CacheMismatchError` naming the first field where the manifest of ``cache`` (an opened
    :class:`~tasks.cache.shards.Cache`) differs from what the cache stage would write for this config
    (:func:`new_manifest`); returns the cache's :func:`cache_key`."""
    m, cache_dir = cache.manifest, cache.dir
    want = identity_key_fields(teacher_identity(teacher))
    have = identity_key_fields(m["teacher"])
    if teacher.dtype == "auto" and have["dtype"] in ("float32", "bfloat16"):  # what auto resolved to where it ran
        want["dtype"] = have["dtype"]
    if have != want:
        raise CacheMismatchError(f"cache {cache_dir} was built for another teacher: "
                                 f"{_first_difference(have, want, 'teacher')}")
    checks = [("tokenizer", m["tokenizer_hash"], lambda: tokenizer_hash(load_tokenizer(teacher))),
              ("format", m["format"], lambda: cache_cfg.format),
              ("temperature", m["temperature"], lambda: cache_cfg.temperature),
              ("seq_len", m["seq_len"], lambda: corpus.seq_len)]
    # a format parameter is compared only after the format matched (another format has other parameters)
    checks += [(k, v, lambda k=k: dataclasses.asdict(format_params(cache_cfg))[k]) for k, v in m["params"].items()]
    checks += [(f"corpus.{k}", m["corpus"].get(k), lambda k=k: getattr(corpus, k)) for k in CORPUS_FIELDS]
    for field, have, want_fn in checks:
        want = want_fn()
        if have != want:
            raise CacheMismatchError(f"cache {cache_dir} does not match the config: {field} is {have!r} in the "
                                     f"cache but {want!r} in the config; rerun `raydistill cache`")
    if not m.get("complete"):
        raise CacheMismatchError(f"cache {cache_dir} is incomplete ({len(m['shards'])}/{m.get('planned_shards')}"
                                 " shards; field 'complete'); rerun `raydistill cache` to finish it")
    return cache_key(m)
