"""tasks/cache/index, manifest (log, totals) and resume: the compact index, the append-only log, what a rerun
knows without reading a shard (no Ray)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from raydistill.tasks.cache.index import Index, IndexWriter, ShardList, file64, multiset_key, shard_file
from raydistill.tasks.cache.manifest import CacheLog, Totals, read_log
from raydistill.tasks.cache.resume import KnownEntries, Lease, contains, live_leases, log_index, pool_files
from raydistill.tasks.cache.store import Store


def _entry(i: int, split: str = "train") -> dict:
    key = hashlib.sha256(str(i).encode()).hexdigest()
    return {"name": f"{split}-doc-{i:05d}", "split": split, "key": key, "file": shard_file(f"{split}-doc-{i:05d}", key),
            "sha256": hashlib.sha256(f"file{i}".encode()).hexdigest(), "bytes": 100 + i, "tokens": 64,
            "windows": 1 + i % 3, "vocab_size": 97, "teacher_nll_sum": 1.5 * i, "teacher_top1_correct": i}


def _index(entries, tmp_path) -> Index:
    w = IndexWriter(str(tmp_path))
    for e in entries:
        w.add(e)
    path, sha, rows = w.close()
    assert rows == len(entries) and sha == hashlib.sha256(open(path, "rb").read()).hexdigest()
    return Index(path)


def test_the_index_gives_back_every_entry_and_lists_a_split_in_key_order(tmp_path, monkeypatch):
    import raydistill.tasks.cache.index as index_mod

    monkeypatch.setattr(index_mod, "BATCH_ROWS", 7)  # several record batches
    entries = [_entry(i, "heldout" if i % 4 == 0 else "train") for i in range(30)]
    index = _index(entries, tmp_path)
    assert sorted((index.entry(r) for r in range(len(index))), key=lambda e: e["key"]) == \
        sorted(entries, key=lambda e: e["key"])
    held = ShardList(index, index.rows("heldout"))
    assert [e["key"] for e in held] == sorted(e["key"] for e in entries if e["split"] == "heldout")
    assert len(held[1:3]) == 2 and held[0] == min((e for e in entries if e["split"] == "heldout"),
                                                  key=lambda e: e["key"])
    assert list(held.column("windows")) == [e["windows"] for e in sorted(
        (e for e in entries if e["split"] == "heldout"), key=lambda e: e["key"])]


def test_the_cache_key_of_an_index_is_the_set_of_its_shard_keys_whatever_the_commit_order(tmp_path):
    entries = [_entry(i) for i in range(10)]
    a, b = IndexWriter(str(tmp_path)), IndexWriter(str(tmp_path))
    for e in entries:
        a.add(e)
    for e in reversed(entries):
        b.add(e)
    assert a.key.hexdigest() == b.key.hexdigest() == multiset_key(e["key"] for e in entries)
    a.abort(), b.abort()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".index-")]


def test_totals_are_kept_incrementally_and_refuse_a_second_vocabulary():
    t = Totals()
    for e in (_entry(1), _entry(2, "heldout"), _entry(3, "heldout")):
        t.add(e)
    d = t.as_dict()
    assert d["shards"] == 3 and d["tokens"] == 192 and d["heldout_tokens"] == 128 and d["train_tokens"] == 64
    assert d["teacher_heldout_nll"] == pytest.approx((3.0 + 4.5) / 128)
    with pytest.raises(Exception, match="vocab size"):
        t.add({**_entry(4), "vocab_size": 5})


def test_the_log_writes_immutable_segments_and_reads_back_every_entry(tmp_path, monkeypatch):
    import raydistill.tasks.cache.manifest as manifest

    monkeypatch.setattr(manifest, "LOG_SEGMENT", 4)
    store = Store(str(tmp_path))
    log = CacheLog(store, "abc", run_id="run1")
    for i in range(10):
        log.add(_entry(i))
    log.flush()
    assert len(log.segments) == 3 and len(os.listdir(tmp_path / "caches" / "abc" / "log")) == 3
    assert sorted(e["key"] for e in read_log(store, "abc")) == sorted(_entry(i)["key"] for i in range(10))
    other = CacheLog(store, "abc", run_id="run2")  # a concurrent or crashed run's segments are read too
    other.add(_entry(99))
    other.flush()
    known = KnownEntries([log_index(store, "abc")])
    assert len(known) == 11 and known.get(file64(_entry(99)["file"].rsplit("/", 1)[1]))["key"] == _entry(99)["key"]
    assert known.get(12345) is None
    log.remove_own()
    assert [e["key"] for e in read_log(store, "abc")] == [_entry(99)["key"]]


def test_a_listing_becomes_sorted_file_ids_and_membership_is_vectorised(tmp_path):
    store = Store(str(tmp_path))
    names = [_entry(i)["file"] for i in range(5)]
    for rel in names:
        store.create(rel, b"x")
    (tmp_path / "shards" / ".partial.st.tmp-host-1-abcd").write_bytes(b"half")
    present = pool_files(store)
    ids = [file64(n.rsplit("/", 1)[1]) for n in names]
    assert len(present) == 5 and contains(present, ids).all()
    assert not contains(present, [file64(_entry(7)["file"].rsplit("/", 1)[1])]).any()
    assert not contains(np.zeros(0, np.uint64), ids).any()


def test_a_lease_is_live_while_held_and_gone_after(tmp_path):
    store = Store(str(tmp_path))
    with Lease(store, "abc", "run1"):
        (lease,) = live_leases(store, ["abc"])
        assert lease["run"] == "run1" and lease["cache"] == "abc"
        assert live_leases(store, ["abc"], now=lease["renewed_at"] + 10_000) == []  # not renewed: expired
    assert live_leases(store, ["abc"]) == []
