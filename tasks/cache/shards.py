"""Shard files: atomic commit of encoded targets, and verified reads back into :class:`CachedTargets`.

    python -c "from raydistill.tasks.cache.shards import open_cache; print(open_cache('runs/tiny/cache').totals)"

Reads verify the manifest's sha256 and the shard key before decoding. Training codes against: ``open_cache``,
``Cache.shards/read/manifest``, ``Shard.tokens/targets/teacher_top1/teacher_nll``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import torch

from raydistill.tasks.cache.formats import get_format
from raydistill.tasks.cache.manifest import CacheCorruptError, Manifest, ShardEntry, read_manifest, shard_file
from raydistill.tasks.cache.store import Store, pack, unpack
from raydistill.tasks.cache.targets import CachedTargets


def commit_shard(cache_dir: str, name: str, split: str, key: str, tokens: np.ndarray,
                 fields: dict[str, np.ndarray], stats: dict, params) -> ShardEntry:
    """Write one shard file atomically (never replacing a committed one) and return its manifest entry.

    tokens: int32 ``[W, L+1]``; fields: the encoder arrays of the format of ``params`` (its ``Params``; the
    format's ``to_disk`` lays them out); stats: vocab_size, teacher_nll_sum, teacher_top1_correct. If another
    writer committed the same shard first, its file is kept and its entry returned.
    """
    store, rel = Store(cache_dir), shard_file(name, key)
    W, L1 = tokens.shape
    header = {"name": name, "split": split, "key": key, "format": params.format, "windows": W, "seq_len": L1 - 1,
              "tokens": W * (L1 - 1), **stats}
    stored, extra, raw = get_format(params.format).to_disk(fields, tokens, stats["vocab_size"], params)
    data = pack({"tokens": tokens.astype(np.int32), **stored}, {**header, **extra}, raw=raw)
    if not store.create(rel, data):
        return entry_from_file(cache_dir, rel, key)
    return _entry(header, rel, data)


def _entry(header: dict, rel: str, data: bytes) -> ShardEntry:
    return {"name": header["name"], "split": header["split"], "key": header["key"], "file": rel,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "tokens": header["tokens"],
            "windows": header["windows"], "vocab_size": header["vocab_size"],
            "teacher_nll_sum": header["teacher_nll_sum"], "teacher_top1_correct": header["teacher_top1_correct"]}


def entry_from_file(cache_dir: str, rel: str, key: str) -> ShardEntry:
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
    """A verified shard."""

    name: str
    split: str
    """"train" or "heldout"."""
    format: str
    """Name of the cache's format."""
    cache_temperature: float
    params: object
    """The format's ``Params``."""
    tokens: torch.Tensor
    """Long ``[W, L+1]``."""
    teacher_top1: torch.Tensor | None
    """Long ``[W, L]`` on held-out shards (None on train shards)."""
    teacher_nll: torch.Tensor | None
    """float ``[W, L]`` on held-out shards (None on train shards)."""
    _fields: dict
    vocab_size: int | None = None

    def targets(self, window_slice: slice = slice(None)) -> CachedTargets:
        """The stored targets of windows ``window_slice`` (contiguous), ``[w, L, ...]``."""
        start, stop, step = window_slice.indices(self.tokens.shape[0])
        if step != 1:
            raise ValueError("Shard.targets: window_slice must be contiguous (step 1)")
        L = self.tokens.shape[1] - 1
        return get_format(self.format).decode(self._fields, slice(start * L, max(start, stop) * L), L, self.params,
                                              self.cache_temperature, self.vocab_size)


class Cache:
    """An opened cache: the validated manifest plus verified shard reads."""

    def __init__(self, cache_dir: str, manifest: Manifest):
        self.dir, self.manifest, self._store = str(cache_dir), manifest, Store(cache_dir)

    @property
    def totals(self) -> dict:
        return self.manifest["totals"]

    def shards(self, split: str | None = None) -> list[ShardEntry]:
        """Manifest entries (in corpus order) of ``split`` ("train"/"heldout"; None = all)."""
        if split not in (None, "train", "heldout"):
            raise ValueError(f"split must be 'train', 'heldout' or None, got {split!r}")
        return [e for e in self.manifest["shards"] if split is None or e["split"] == split]

    def read(self, entry: ShardEntry) -> Shard:
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
        fmt = get_format(m["format"])
        params = fmt.Params(**m["params"])
        try:
            fields = fmt.from_disk(fields, tokens, header["vocab_size"], params, header)
        except (ValueError, KeyError, IndexError) as e:
            raise CacheCorruptError(f"shard {name}: {m['format']} targets do not decode ({e})") from None
        top1 = held.get("teacher_top1")
        return Shard(name, header["split"], m["format"], m["temperature"], params,
                     torch.from_numpy(tokens).long(), None if top1 is None else top1.long(),
                     held.get("teacher_nll"), fields, header["vocab_size"])

    def verify(self) -> list[str]:
        """Read every shard (checksums, keys, decode); returns the names checked, raises on the first bad one."""
        for e in self.shards():
            self.read(e)
        return [e["name"] for e in self.shards()]


def open_cache(cache_dir: str) -> Cache:
    """Load and validate ``<cache_dir>/manifest.json``."""
    return Cache(cache_dir, read_manifest(cache_dir))
