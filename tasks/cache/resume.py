"""What a rerun already has: the shard files in the store, the entries earlier runs indexed or logged, leases.

    python -m pytest tests/unit/cache/test_cache_resume.py

Nothing here reads a shard file. A rerun lists ``shards/`` once (paged; each name becomes a 64-bit
:func:`~tasks.cache.index.file64`, 8 bytes per shard in a sorted array), maps the previous index, and turns the
log segments of unfinished runs into one more (temporary) index, so that a planned shard whose file is listed and
whose entry is known is carried into the new index with no request at all.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

from raydistill.tasks.cache.index import Index, IndexWriter, file64
from raydistill.tasks.cache.manifest import CACHES, SHARD_DIR, read_log
from raydistill.tasks.cache.store import TEMP_MARK, Store

LEASE_TTL_S = 300.0  # a lease not renewed for this long belongs to a run that is gone
LEASE_RENEW_S = 30.0


def pool_files(store: Store, chunk: int = 65536) -> np.ndarray:
    """Sorted :func:`file64` ids of every committed shard file of the dir (one paged listing; 8 bytes a file: the
    names are folded into numpy chunks as they stream in)."""
    chunks, ids = [], []
    for info in store.iter_files(SHARD_DIR):
        if info.name.endswith(".st") and TEMP_MARK not in info.name:
            ids.append(file64(info.name))
            if len(ids) == chunk:
                chunks.append(np.asarray(ids, dtype=np.uint64))
                ids = []
    chunks.append(np.asarray(ids, dtype=np.uint64))
    return np.unique(np.concatenate(chunks))


def contains(sorted_ids: np.ndarray, ids) -> np.ndarray:
    """Boolean membership of ``ids`` in ``sorted_ids`` (vectorised binary search)."""
    ids = np.asarray(ids, dtype=np.uint64)
    if not len(sorted_ids):
        return np.zeros(len(ids), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


def log_index(store: Store, cid: str) -> Index | None:
    """Entries of cache ``cid``'s log segments as a temporary local index (None when there are none)."""
    writer = None
    for entry in read_log(store, cid):
        writer = writer or IndexWriter()
        writer.add(entry)
    if writer is None:
        return None
    path, _, _ = writer.close()
    index = Index(path)
    os.unlink(path)  # mapped already: the data stays readable until the index is dropped
    return index


class KnownEntries:
    """Entries of shard files by :func:`file64`, from several indexes (the previous finished one, the logs)."""

    def __init__(self, indexes: list[Index]):
        self.indexes = [ix for ix in indexes if ix is not None and len(ix)]
        ids = [ix.column("file64") for ix in self.indexes]
        which = [np.full(len(ix), k, dtype=np.int32) for k, ix in enumerate(self.indexes)]
        rows = [np.arange(len(ix), dtype=np.int64) for ix in self.indexes]
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
        order = np.argsort(self.ids, kind="stable")
        self.ids = self.ids[order]
        self.which = np.concatenate(which)[order] if which else np.zeros(0, np.int32)
        self.rows = np.concatenate(rows)[order] if rows else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, fid: int) -> dict | None:
        if not len(self.ids):
            return None
        pos = int(np.searchsorted(self.ids, np.uint64(fid)))
        if pos >= len(self.ids) or self.ids[pos] != np.uint64(fid):
            return None
        return self.indexes[int(self.which[pos])].entry(int(self.rows[pos]))


# ------------------------------------------------------------------------------------------------------ leases

def lease_dir(cid: str) -> str:
    return f"{CACHES}/{cid}/leases"


class Lease:
    """A running writer's heartbeat, ``caches/<id>/leases/<run>.json``, renewed every :data:`LEASE_RENEW_S` s
    by a daemon thread; ``raydistill cache gc`` deletes nothing while a live one exists."""

    def __init__(self, store: Store, cid: str, run_id: str):
        self.store, self.rel = store, f"{lease_dir(cid)}/{run_id}.json"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="cache-lease")
        self.info = {"run": run_id, "host": os.uname().nodename, "pid": os.getpid(), "started_at": time.time()}

    def _write(self) -> None:
        self.store.replace(self.rel, json.dumps({**self.info, "renewed_at": time.time()}).encode())

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                self._write()
            except Exception as e:  # noqa: BLE001 — a missed heartbeat must not kill the run; gc waits longer
                print(f"cache: could not renew the lease {self.rel} ({type(e).__name__})", flush=True)

    def __enter__(self) -> "Lease":
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.store.remove(self.rel)
        except (FileNotFoundError, OSError):
            pass


def live_leases(store: Store, cids: list[str], now: float | None = None) -> list[dict]:
    """Leases renewed within :data:`LEASE_TTL_S` in any of the caches ``cids``."""
    now = time.time() if now is None else now
    live = []
    for cid in cids:
        for info in store.iter_files(lease_dir(cid)):
            try:
                lease = json.loads(store.read(f"{lease_dir(cid)}/{info.name}"))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if now - float(lease.get("renewed_at", 0)) < LEASE_TTL_S:
                live.append({**lease, "cache": cid})
    return live
