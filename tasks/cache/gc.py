"""``raydistill cache gc``: remove shard files no cache references, past a grace period, never under a live lease.

    raydistill cache gc --config tiny --dry-run      # say what would go
    raydistill cache gc --config tiny                # remove it

References are every cache of the dir (``caches/*``: its finished index and its log segments) and an old-layout
``manifest.json``; a shard file none of them names is removed only when it is older than ``cache.gc_grace_hours``
(a running writer commits a file a few seconds before it logs it) and only while no writer holds a live lease
(:class:`tasks.cache.resume.Lease`). Old index files and the log segments of finished caches go too, under the same
grace. Memory: 8 bytes per referenced shard; the listing is streamed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from raydistill.tasks.cache.index import Index, file64, local_copy, shard_file
from raydistill.tasks.cache.manifest import CACHES, LEGACY_MANIFEST, SHARD_DIR, list_cache_ids, read_head, read_log
from raydistill.tasks.cache.resume import contains, live_leases
from raydistill.tasks.cache.store import TEMP_MARK, Store
from raydistill.tasks.errors import DataError


class CacheBusyError(DataError):
    """A cache run holds a live lease on the dir: garbage collection would race it."""


@dataclass
class GcPlan:
    """What gc found: files to remove (``(rel, bytes)``), and how many it keeps and why."""

    remove: list[tuple[str, int]] = field(default_factory=list)
    referenced: int = 0
    too_young: int = 0
    caches: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.remove)


def _references(store: Store, cids: list[str]) -> np.ndarray:
    ids = []
    for cid in cids:
        head = read_head(store, cid)
        if head and head.get("index"):
            ids.append(Index(local_copy(store, head["index"], head["index_sha256"])).column("file64"))
        ids.append(np.asarray([file64(shard_file(e["name"], e["key"]).rsplit("/", 1)[1])
                               for e in read_log(store, cid)], dtype=np.uint64))
    if store.exists(LEGACY_MANIFEST):  # an old-layout cache: a rerun adopts its shards, so they are not garbage
        legacy = json.loads(store.read(LEGACY_MANIFEST)).get("shards") or []
        ids.append(np.asarray([file64(e["file"].rsplit("/", 1)[1]) for e in legacy], dtype=np.uint64))
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.uint64)


def plan_gc(store: Store, grace_s: float, now: float | None = None) -> GcPlan:
    """What :func:`collect` would remove now (reads heads, indexes and logs; no shard bytes)."""
    now = time.time() if now is None else now
    cids = list_cache_ids(store)
    busy = live_leases(store, cids, now)
    if busy:
        b = busy[0]
        raise CacheBusyError(f"cache {b['cache']} in {store.url()} is being written (run {b['run']} on {b['host']}, "
                             f"lease renewed {now - b['renewed_at']:.0f} s ago): gc would race it; run gc when no "
                             f"`raydistill cache` writes this dir")
    plan, refs = GcPlan(caches=cids), _references(store, cids)
    old = now - grace_s
    for info in store.iter_files(SHARD_DIR):
        if not info.name.endswith(".st") or TEMP_MARK in info.name:
            continue
        if contains(refs, [file64(info.name)])[0]:
            plan.referenced += 1
        elif info.mtime > old:
            plan.too_young += 1
        else:
            plan.remove.append((f"{SHARD_DIR}/{info.name}", info.size))
    for cid in cids:
        head = read_head(store, cid) or {}
        for info in store.iter_files(f"{CACHES}/{cid}"):
            rel = f"{CACHES}/{cid}/{info.name}"
            if info.name.startswith("index-") and rel != head.get("index") and info.mtime <= old:
                plan.remove.append((rel, info.size))
        if head.get("complete"):
            for info in store.iter_files(f"{CACHES}/{cid}/log"):
                if info.mtime <= old:
                    plan.remove.append((f"{CACHES}/{cid}/log/{info.name}", info.size))
    return plan


def collect(store: Store, grace_s: float, dry_run: bool) -> GcPlan:
    """Remove what :func:`plan_gc` found (nothing with ``dry_run``); returns the plan."""
    plan = plan_gc(store, grace_s)
    if not dry_run:
        for rel, _ in plan.remove:
            try:
                store.remove(rel)
            except FileNotFoundError:
                pass
    return plan
