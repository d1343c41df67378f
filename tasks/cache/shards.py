"""Shard files: atomic commit of encoded targets, and verified reads back into :class:`CachedTargets`.

    python -c "from raydistill.tasks.cache.shards import open_cache; print(open_cache('runs/tiny/cache').totals)"

Reads verify the index's sha256 and the shard key before decoding. Training codes against: ``open_cache`` /
``find_cache``, ``Cache.shards/read/manifest``, ``Shard.tokens/targets/teacher_top1/teacher_nll``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import torch

from raydistill.tasks.cache.formats import get_format
from raydistill.tasks.cache.head import load_head, write_once
from raydistill.tasks.cache.container import pack, unpack
from raydistill.tasks.cache.index import Index, ShardList, local_copy
from raydistill.tasks.cache.masked import expand, expand_rows, format_tokens
from raydistill.tasks.cache.manifest import (CACHES, LEGACY_MANIFEST, CacheCorruptError, CacheMismatchError,
                                             CacheMissingError, Manifest, ShardEntry, difference, expected_heads,
                                             list_cache_ids, matching_want, read_head, shard_file)
from raydistill.tasks.cache.store import Store
from raydistill.tasks.cache.targets import CachedTargets


def commit_shard(cache_dir: str, name: str, split: str, key: str, tokens: np.ndarray,
                 fields: dict[str, np.ndarray], stats: dict, params, mask: np.ndarray | None = None) -> ShardEntry:
    """Write one shard file atomically (never replacing a committed one) and return its index entry.

    tokens: int32 ``[W, L+1]``; fields: the encoder arrays of the format of ``params`` (its ``Params``; the
    format's ``to_disk`` lays them out); stats: vocab_size, teacher_nll_sum, teacher_top1_correct. If another
    writer committed the same shard first, its file is kept and its entry returned. mask: uint8 ``[W, L]`` of a
    chat shard (``fields`` then cover its masked-in rows only, :mod:`tasks.cache.masked`): stored as the shard's
    ``mask`` array; the entry's ``tokens`` counts the masked-in rows.
    """
    return write_shard(cache_dir, name, split, key, tokens, fields, stats, params, mask)[0]


def write_shard(cache_dir: str, name: str, split: str, key: str, tokens: np.ndarray,
                fields: dict[str, np.ndarray], stats: dict, params,
                mask: np.ndarray | None = None) -> tuple[ShardEntry, bool]:
    """:func:`commit_shard`, and whether this call created the file (False: another writer's was adopted)."""
    store, rel = Store(cache_dir), shard_file(name, key)
    W, L1 = tokens.shape
    rows = W * (L1 - 1) if mask is None else int(np.count_nonzero(mask))
    header = {"name": name, "split": split, "key": key, "format": params.format, "windows": W, "seq_len": L1 - 1,
              "tokens": rows, "masked": mask is not None, **stats}
    stored, extra, raw = get_format(params.format).to_disk(fields, format_tokens(tokens, mask), stats["vocab_size"],
                                                           params)
    if "head" in extra:  # hidden: the teacher's output head, one content-addressed file per cache dir
        write_once(store, extra["head"]["file"], fields["head"])
    masks = {} if mask is None else {"mask": np.asarray(mask, dtype=np.uint8)}
    data = pack({"tokens": tokens.astype(np.int32), **masks, **stored}, {**header, **extra}, raw=raw)
    if not store.create(rel, data):
        return entry_from_file(cache_dir, rel, key), False
    return _entry(header, rel, data), True


def _entry(header: dict, rel: str, data: bytes) -> ShardEntry:
    return {"name": header["name"], "split": header["split"], "key": header["key"], "file": rel,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "tokens": header["tokens"],
            "windows": header["windows"], "vocab_size": header["vocab_size"],
            "teacher_nll_sum": header["teacher_nll_sum"], "teacher_top1_correct": header["teacher_top1_correct"]}


def entry_from_file(cache_dir: str, rel: str, key: str) -> ShardEntry:
    """Index entry of a committed shard file (after a crash between commit and log, or written by another run)."""
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
    mask: torch.Tensor | None = None
    """Bool ``[W, L]``: the rows whose label carries loss (a chat shard); None: every row does."""

    def targets(self, window_slice: slice = slice(None)) -> CachedTargets:
        """The stored targets of windows ``window_slice`` (contiguous), ``[w, L, ...]`` (a masked shard: the
        masked-out rows hold filler, :func:`tasks.cache.masked.expand`)."""
        start, stop, step = window_slice.indices(self.tokens.shape[0])
        if step != 1:
            raise ValueError("Shard.targets: window_slice must be contiguous (step 1)")
        L, fmt = self.tokens.shape[1] - 1, get_format(self.format)
        if self.mask is None:
            return fmt.decode(self._fields, slice(start * L, max(start, stop) * L), L, self.params,
                              self.cache_temperature, self.vocab_size)
        before, rows = int(self.mask[:start].sum()), self.mask[start:max(start, stop)]
        n = int(rows.sum())
        if n == 0:  # no row of these windows carries loss: filler from the shard's first row
            before, n = 0, 1
        compact = fmt.decode(self._fields, slice(before, before + n), n, self.params, self.cache_temperature,
                             self.vocab_size)
        return expand(compact, rows)


class Cache:
    """An opened cache: its head (``manifest``), its compact index and verified shard reads."""

    def __init__(self, cache_dir: str, manifest: Manifest, index: Index):
        self.dir, self.manifest, self.index = str(cache_dir), manifest, index
        self._store = Store(cache_dir)
        self.where = self._store.url(f"{CACHES}/{manifest['id']}")
        """Where the cache lives, for messages (credentials masked)."""
        base, sep, query = self.dir.partition("?")
        self.location = f"{base.rstrip('/')}/{CACHES}/{manifest['id']}{sep}{query}"
        """Where the cache lives, as :func:`open_cache` takes it (credentials kept: not for messages)."""

    @property
    def totals(self) -> dict:
        return self.manifest["totals"]

    @property
    def key(self) -> str | None:
        return self.manifest.get("key")

    def shards(self, split: str | None = None) -> ShardList:
        """Entries of ``split`` ("train"/"heldout"; None = all) in shard-key order (a view: entries are built on
        access)."""
        if split not in (None, "train", "heldout"):
            raise ValueError(f"split must be 'train', 'heldout' or None, got {split!r}")
        return ShardList(self.index, self.index.rows(split))

    def read(self, entry: ShardEntry) -> Shard:
        """Read and verify one shard; :class:`CacheCorruptError` names the shard on any mismatch."""
        name = entry["name"]
        try:
            data = self._store.read(entry["file"])
        except FileNotFoundError:
            raise CacheCorruptError(f"shard {name}: file {entry['file']} is missing from {self._store.url()}") \
                from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CacheCorruptError(f"shard {name}: sha256 mismatch in {entry['file']} (file corrupted; delete "
                                    "it and rerun `raydistill cache` to recompute it)")
        fields, header = unpack(data)
        if header["key"] != entry["key"]:
            raise CacheCorruptError(f"shard {name}: file key {header['key']} != index key {entry['key']}")
        tokens, m = fields.pop("tokens"), self.manifest
        mask = torch.from_numpy(np.array(fields.pop("mask"), dtype=bool)) if "mask" in fields else None
        held = {k: torch.from_numpy(fields.pop(k)) for k in ("teacher_top1", "teacher_nll") if k in fields}
        held = {k: v.reshape(header["windows"], header["seq_len"]) if mask is None else expand_rows(v, mask)
                for k, v in held.items()}
        fmt = get_format(m["format"])
        params = fmt.Params(**m["params"])
        if "head" in header:
            try:
                fields["head"] = load_head(self._store, header["head"])
            except FileNotFoundError:
                raise CacheCorruptError(f"shard {name}: the teacher head {header['head']['file']} is missing from "
                                        f"{self._store.url()}; delete this cache's shard files and rerun "
                                        "`raydistill cache`") from None
            except ValueError as e:
                raise CacheCorruptError(f"shard {name}: {e}") from None
        try:
            fields = fmt.from_disk(fields, format_tokens(tokens, None if mask is None else mask.numpy()),
                                   header["vocab_size"], params, header)
        except (ValueError, KeyError, IndexError) as e:
            raise CacheCorruptError(f"shard {name}: {m['format']} targets do not decode ({e})") from None
        top1 = held.get("teacher_top1")
        return Shard(name, header["split"], m["format"], m["temperature"], params,
                     torch.from_numpy(tokens).long(), None if top1 is None else top1.long(),
                     held.get("teacher_nll"), fields, header["vocab_size"], mask)

    def verify(self) -> list[str]:
        """Read every shard (checksums, keys, decode); returns the names checked, raises on the first bad one."""
        names = []
        for e in self.shards():
            self.read(e)
            names.append(e["name"])
        return names


def _split_location(where: str) -> tuple[str, str | None]:
    """``(cache dir, cache id)`` of ``where``: a cache dir, or one cache's own ``<cache dir>/caches/<id>``."""
    base, sep, query = str(where).partition("?")
    parts = base.rstrip("/").rsplit("/", 2)
    if len(parts) == 3 and parts[1] == CACHES:
        return parts[0] + (sep + query if sep else ""), parts[2]
    return str(where), None


def open_cache(where: str, cid: str | None = None) -> Cache:
    """Open a cache: ``where`` is a cache dir (with ``cid``, or holding exactly one cache) or ``<dir>/caches/<id>``.
    :class:`CacheMissingError` says what is there instead and how to pick."""
    root, found = _split_location(where)
    cid = cid or found
    store = Store(root)
    if cid is None:
        ids = list_cache_ids(store)
        if len(ids) > 1:
            raise CacheMismatchError(f"{store.url()} holds {len(ids)} caches ({', '.join(ids)}); open one by its "
                                     f"config (the verbs do), or give {store.url(CACHES)}/<id>")
        if not ids:
            raise _missing(store)
        cid = ids[0]
    head = read_head(store, cid)
    if head is None:
        raise _missing(store, cid)
    return Cache(root, head, _index(store, head))


def _index(store: Store, head: Manifest) -> Index:
    if not head.get("index"):
        return Index(None)
    try:
        return Index(local_copy(store, head["index"], head["index_sha256"]))
    except FileNotFoundError:
        raise CacheCorruptError(f"cache {store.url(head['index'])}: the index file is missing; rerun "
                                "`raydistill cache` to rebuild it (no shard is recomputed)") from None


def _missing(store: Store, cid: str | None = None, closest: str = "") -> CacheMissingError:
    if store.exists(LEGACY_MANIFEST):
        return CacheMissingError(f"the cache at {store.url()} was written by an older raydistill (one "
                                 f"{LEGACY_MANIFEST} per dir); rerun `raydistill cache`: its shard files are "
                                 "adopted where their keys still match, not recomputed")
    what = f"no teacher cache {cid} at {store.url()}" if cid else f"no teacher cache at {store.url()}"
    return CacheMissingError(f"{what}{closest}; run `raydistill cache` (with this config) first")


def find_cache(cache_dir: str, teacher, cache_cfg, corpus) -> Cache:
    """The cache in ``cache_dir`` that this config's cache stage writes (:class:`CacheMissingError` naming the
    closest other cache there and the field that differs)."""
    store = Store(cache_dir)
    wants = expected_heads(teacher, cache_cfg, corpus)
    for want in wants:
        head = read_head(store, want["id"])
        if head is not None:
            return Cache(cache_dir, head, _index(store, head))
    others = []
    for cid in list_cache_ids(store)[:20]:
        head = read_head(store, cid)
        if head is not None:
            others.append((cid, difference(head, matching_want(head, wants))))
    closest = "".join(f"; cache {cid} there differs in {diff}" for cid, diff in others[:3] if diff)
    raise _missing(store, wants[0]["id"], closest)


def config_cache(cfg) -> Cache:
    """The cache a :class:`~tasks.config.PipelineConfig`'s cache stage writes (``cache.dir``, this config's id)."""
    return find_cache(cfg.cache_dir, cfg.teacher, cfg.cache, cfg.corpus)
