"""The teacher soft-target cache: keys, shard commit, manifest, verified reads, compatibility checks.

    python -c "from tasks.softtargets import open_cache; c = open_cache('runs/tiny/cache'); print(c.totals)"

Layout (see docs/cache-format.md): ``<cache_dir>/manifest.json`` and ``<cache_dir>/shards/<name>-<key16>.st``.
A shard's key hashes everything its content depends on (teacher weights, tokenizer, tokens, format and
params, temperature, FORMAT_VERSION); the key is part of the file name, so a changed config never touches
an existing file. Reads verify the manifest's sha256 before decoding.

Training codes against: ``open_cache``, ``Cache.shards/read/manifest``, ``Shard.tokens/targets/teacher_top1/
teacher_nll``, ``at_temperature``, ``SparseTargets``, ``DenseTargets``, ``check_compatible``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import torch

from raydistill.tasks.cachestore import Store, pack, unpack
from raydistill.tasks.config import CacheConfig, ConfigError, CorpusConfig, TeacherConfig
from raydistill.tasks.sampledpack import compact_sampled, expand_sampled
from raydistill.tasks.targetcodec import (CachedTargets, DenseTargets, SparseTargets, at_temperature,  # noqa: F401
                                          cat_targets, decode_rows)
from raydistill.tasks.teacher import identity_key_fields, load_tokenizer, teacher_identity, tokenizer_hash

FORMAT_VERSION = 2  # 2: sampled entries entropy-coded (tasks/sampledpack.py); 1 is refused
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
CORPUS_FIELDS = ("path", "text_field", "max_tokens", "heldout_fraction", "windows_per_shard")


class CacheCorruptError(RuntimeError):
    """A shard (or the manifest) fails verification; the message names it."""


class CacheMismatchError(ConfigError):
    """The cache was built for another config; the message names the differing field."""


def format_params(cfg: CacheConfig) -> dict:
    """The parameters of ``cfg.format`` that change what is stored."""
    return {"sampled": {"num_samples": cfg.num_samples, "seed": cfg.seed, "logprobs": cfg.sampled_logprobs},
            "topk": {"top_k": cfg.top_k}, "full": {}}[cfg.format]


def shard_key(teacher: dict, tok_hash: str, content_hash: str, fmt: str, params: dict, temperature: float) -> str:
    """sha256 over everything a shard's bytes depend on (teacher identity incl. weights, tokenizer, tokens,
    format + params, temperature, FORMAT_VERSION)."""
    payload = {"teacher": identity_key_fields(teacher), "tokenizer": tok_hash, "content": content_hash,
               "format": fmt, "params": params, "temperature": float(temperature), "version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def shard_file(name: str, key: str) -> str:
    return f"{SHARD_DIR}/{name}-{key[:16]}.st"


def new_manifest(teacher: dict, tok_hash: str, cache: CacheConfig, corpus: CorpusConfig) -> dict:
    """An empty manifest describing what this cache holds (shards are added by :func:`add_entry`)."""
    return {"format_version": FORMAT_VERSION, "format": cache.format, "params": format_params(cache),
            "temperature": cache.temperature, "teacher": teacher, "tokenizer_hash": tok_hash,
            "vocab_size": None, "seq_len": corpus.seq_len,
            "corpus": {k: getattr(corpus, k) for k in CORPUS_FIELDS},
            "shards": [], "planned_shards": None, "complete": False, "totals": {}}


def add_entry(manifest: dict, entry: dict) -> None:
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


def write_manifest(cache_dir: str, manifest: dict) -> None:
    """Atomically replace the manifest (temp + fsync + rename)."""
    Store(cache_dir).replace(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def commit_shard(cache_dir: str, name: str, split: str, key: str, tokens: np.ndarray,
                 fields: dict[str, np.ndarray], stats: dict, fmt: str) -> dict:
    """Write one shard file atomically (never replacing a committed one) and return its manifest entry.

    tokens: int32 ``[W, L+1]``; fields: the encoder arrays of :mod:`tasks.targetcodec` (``sampled`` is
    compacted here; N is the row sum of the counts); stats: vocab_size,
    teacher_nll_sum, teacher_top1_correct. If another writer committed the same shard first, its file is
    kept and its entry returned.
    """
    store, rel = Store(cache_dir), shard_file(name, key)
    W, L1 = tokens.shape
    header = {"name": name, "split": split, "key": key, "format": fmt, "windows": W, "seq_len": L1 - 1,
              "tokens": W * (L1 - 1), **stats}
    if fmt == "sampled":
        n = int(fields["counts"][: int(fields["row_len"][0])].sum())  # every row holds exactly N draws
        held = {k: v for k, v in fields.items() if k.startswith("teacher_")}
        packed, header["sampled"] = compact_sampled(fields, tokens, stats["vocab_size"], n,
                                                    keep_logprobs="logp" in fields)
        fields = {**packed, **held}
    # stored raw: full's log-probs (100s of MB: LZMA would dominate the run time) and sampled's gap bits (uniform)
    data = pack({"tokens": tokens.astype(np.int32), **fields}, header,
                raw=("logprobs",) if fmt == "full" else ("sampled_bits",))
    if not store.create(rel, data):
        return entry_from_file(cache_dir, rel, key)
    return _entry(header, rel, data)


def _entry(header: dict, rel: str, data: bytes) -> dict:
    return {"name": header["name"], "split": header["split"], "key": header["key"], "file": rel,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "tokens": header["tokens"],
            "windows": header["windows"], "vocab_size": header["vocab_size"],
            "teacher_nll_sum": header["teacher_nll_sum"], "teacher_top1_correct": header["teacher_top1_correct"]}


def entry_from_file(cache_dir: str, rel: str, key: str) -> dict:
    """Manifest entry of a committed shard file (after a crash between commit and manifest update)."""
    data = Store(cache_dir).read(rel)
    try:
        _, header = unpack(data)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise CacheCorruptError(f"shard file {rel}: unreadable ({e})") from None
    if header.get("key") != key:
        raise CacheCorruptError(f"shard file {rel}: holds key {header.get('key')}, expected {key}")
    return _entry(header, rel, data)


@dataclasses.dataclass
class Shard:
    """A verified shard. ``tokens``: Long ``[W, L+1]``; ``teacher_top1`` Long / ``teacher_nll`` float ``[W, L]``
    on held-out shards (None on train shards)."""

    name: str
    split: str
    format: str
    cache_temperature: float
    num_samples: int | None
    tokens: torch.Tensor
    teacher_top1: torch.Tensor | None
    teacher_nll: torch.Tensor | None
    _fields: dict
    vocab_size: int | None = None

    def targets(self, window_slice: slice = slice(None)) -> CachedTargets:
        """The stored targets of windows ``window_slice`` (contiguous); rows ``[w, L]`` as in the module doc."""
        start, stop, step = window_slice.indices(self.tokens.shape[0])
        if step != 1:
            raise ValueError("Shard.targets: window_slice must be contiguous (step 1)")
        L = self.tokens.shape[1] - 1
        t = decode_rows(self.format, self._fields, slice(start * L, max(start, stop) * L), L)
        return CachedTargets(self.format, self.cache_temperature, t.get("ids"), t.get("logprobs"), t.get("counts"),
                             t.get("tail_logmass"), self.num_samples, self.vocab_size)


class Cache:
    """An opened cache: the validated manifest plus verified shard reads."""

    def __init__(self, cache_dir: str, manifest: dict):
        self.dir, self.manifest, self._store = str(cache_dir), manifest, Store(cache_dir)

    @property
    def totals(self) -> dict:
        return self.manifest["totals"]

    def shards(self, split: str | None = None) -> list[dict]:
        """Manifest entries (in corpus order) of ``split`` ("train"/"heldout"; None = all)."""
        if split not in (None, "train", "heldout"):
            raise ValueError(f"split must be 'train', 'heldout' or None, got {split!r}")
        return [e for e in self.manifest["shards"] if split is None or e["split"] == split]

    def read(self, entry: dict) -> Shard:
        """Read and verify one shard; :class:`CacheCorruptError` names the shard on any mismatch."""
        name = entry["name"]
        try:
            data = self._store.read(entry["file"])
        except FileNotFoundError:
            raise CacheCorruptError(f"shard {name}: file {entry['file']} is missing from {self.dir}") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CacheCorruptError(f"shard {name}: sha256 mismatch in {entry['file']} (file corrupted; delete "
                                    "it and rerun `raydistill cache` to recompute it)")
        fields, header = unpack(data)
        if header["key"] != entry["key"]:
            raise CacheCorruptError(f"shard {name}: file key {header['key']} != manifest key {entry['key']}")
        held = {k: torch.from_numpy(fields.pop(k)).reshape(header["windows"], header["seq_len"])
                for k in ("teacher_top1", "teacher_nll") if k in fields}
        tokens, m = fields.pop("tokens"), self.manifest
        if header["format"] == "sampled":
            try:
                fields = expand_sampled(fields, tokens, header["vocab_size"], m["params"]["num_samples"],
                                        header["sampled"])
            except (ValueError, KeyError, IndexError) as e:
                raise CacheCorruptError(f"shard {name}: sampled targets do not decode ({e})") from None
        top1 = held.get("teacher_top1")
        return Shard(name, header["split"], m["format"], m["temperature"], m["params"].get("num_samples"),
                     torch.from_numpy(tokens).long(), None if top1 is None else top1.long(),
                     held.get("teacher_nll"), fields, header["vocab_size"])

    def verify(self) -> list[str]:
        """Read every shard (checksums, keys, decode); returns the names checked, raises on the first bad one."""
        for e in self.shards():
            self.read(e)
        return [e["name"] for e in self.shards()]


def open_cache(cache_dir: str) -> Cache:
    """Load and validate ``<cache_dir>/manifest.json``."""
    store = Store(cache_dir)
    if not store.exists(MANIFEST):
        raise FileNotFoundError(f"no teacher cache at {cache_dir} (no {MANIFEST}); run `raydistill cache` first")
    try:
        manifest = json.loads(store.read(MANIFEST))
    except json.JSONDecodeError as e:
        raise CacheCorruptError(f"{cache_dir}/{MANIFEST}: not valid JSON ({e})") from None
    missing = {"format_version", "format", "params", "temperature", "teacher", "tokenizer_hash", "seq_len",
               "shards", "totals"} - set(manifest)
    if missing:
        raise CacheCorruptError(f"{cache_dir}/{MANIFEST}: missing fields {sorted(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CacheMismatchError(f"cache {cache_dir} has format_version {manifest['format_version']}, this "
                                 f"raydistill reads {FORMAT_VERSION}; rerun `raydistill cache`")
    return Cache(cache_dir, manifest)


def _first_difference(a, b, prefix: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        first = ("weights_sha256", "kind", "dtype")  # the decisive fields before the descriptive ones
        for k in [*first, *sorted(set(a) | set(b) - set(first))]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
    return f"{prefix} (cache: {a!r}, config: {b!r})"


def check_compatible(cache: Cache, teacher: TeacherConfig, cache_cfg: CacheConfig, corpus: CorpusConfig) -> None:
    """Raise :class:`CacheMismatchError` naming the first field where the cache differs from the config."""
    m = cache.manifest
    want = identity_key_fields(teacher_identity(teacher))
    have = identity_key_fields(m["teacher"])
    if have != want:
        raise CacheMismatchError(f"cache {cache.dir} was built for another teacher: "
                                 f"{_first_difference(have, want, 'teacher')}")
    checks = [("tokenizer", m["tokenizer_hash"], lambda: tokenizer_hash(load_tokenizer(teacher))),
              ("format", m["format"], lambda: cache_cfg.format),
              ("temperature", m["temperature"], lambda: cache_cfg.temperature),
              ("seq_len", m["seq_len"], lambda: corpus.seq_len)]
    checks += [(k, m["params"][k], lambda k=k: getattr(cache_cfg, k)) for k in ("num_samples", "top_k")
               if k in m["params"]]
    checks += [(f"corpus.{k}", m["corpus"].get(k), lambda k=k: getattr(corpus, k)) for k in CORPUS_FIELDS]
    for field, have, want_fn in checks:
        want = want_fn()
        if have != want:
            raise CacheMismatchError(f"cache {cache.dir} does not match the config: {field} is {have!r} in the "
                                     f"cache but {want!r} in the config; rerun `raydistill cache`")
    if not m.get("complete"):
        raise CacheMismatchError(f"cache {cache.dir} is incomplete ({len(m['shards'])}/{m.get('planned_shards')}"
                                 " shards; field 'complete'); rerun `raydistill cache` to finish it")
