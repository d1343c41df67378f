"""tasks/cache/gc: only unreferenced files past the grace period go, never under a live lease (no Ray)."""

from __future__ import annotations

import json
import os
import time

import pytest

from cachefakes import make_cache
from raydistill.tasks.cache.gc import CacheBusyError, collect
from raydistill.tasks.cache.resume import Lease
from raydistill.tasks.cache.store import Store


def _age(path, hours: float) -> None:
    t = time.time() - hours * 3600
    os.utime(path, (t, t))


def test_gc_removes_only_old_files_no_cache_references_and_a_dry_run_removes_nothing(tmp_path):
    a, *_ = make_cache(tmp_path)  # two caches side by side in one dir
    b, *_ = make_cache(tmp_path, fmt="topk")
    shards = tmp_path / "shards"
    orphan_old, orphan_new = shards / "train-gone-00000-0123456789abcdef.st", shards / "train-new-00000-fe.st"
    orphan_old.write_bytes(b"an old cache's shard")
    orphan_new.write_bytes(b"a shard a running writer has not logged yet")
    for p in shards.iterdir():
        _age(p, 48)
    _age(orphan_new, 0)
    store = Store(str(tmp_path))
    dry = collect(store, grace_s=24 * 3600, dry_run=True)
    assert [r for r, _ in dry.remove] == ["shards/" + orphan_old.name] and orphan_old.exists()
    assert dry.referenced == 2 and dry.too_young == 1 and sorted(dry.caches) == sorted([a.manifest["id"],
                                                                                      b.manifest["id"]])
    done = collect(store, grace_s=24 * 3600, dry_run=False)
    assert done.remove == dry.remove and not orphan_old.exists() and orphan_new.exists()
    a.verify(), b.verify()  # both caches intact


def test_gc_keeps_the_shards_of_an_old_layout_manifest_and_of_an_unfinished_runs_log(tmp_path):
    cache, *_ = make_cache(tmp_path)
    (entry,) = cache.shards()
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [entry]}))
    cid = cache.manifest["id"]
    head = tmp_path / "caches" / cid / "head.json"
    written = json.loads(head.read_text())
    written.update(index=None, index_sha256=None, complete=False)  # as if a run died before finishing
    head.write_text(json.dumps(written))
    for p in (tmp_path / "shards").iterdir():
        _age(p, 100)
    assert collect(Store(str(tmp_path)), grace_s=3600, dry_run=False).remove == []
    (tmp_path / "manifest.json").unlink()
    log = tmp_path / "caches" / cid / "log"
    log.mkdir()
    (log / "run-000000.jsonl").write_text(json.dumps(entry) + "\n")
    assert collect(Store(str(tmp_path)), grace_s=3600, dry_run=False).remove == []


def test_gc_refuses_while_a_cache_run_holds_a_live_lease(tmp_path):
    cache, *_ = make_cache(tmp_path)
    store = Store(str(tmp_path))
    with Lease(store, cache.manifest["id"], "run-7"):
        with pytest.raises(CacheBusyError, match="run-7.*run gc when no"):
            collect(store, grace_s=0, dry_run=False)
    assert collect(store, grace_s=0, dry_run=True).referenced == 1
