"""tasks/cache/store and shards: atomic commit, checksums, crashed writers, verified reads."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from cachefakes import L, V, make_cache
from raydistill.tasks.cache.formats import topk
from raydistill.tasks.cache.manifest import CacheCorruptError
from raydistill.tasks.cache.shards import commit_shard, entry_from_file, open_cache
from raydistill.tasks.cache.store import Store, pack, unpack


def test_flipped_byte_is_detected_and_names_the_shard(tmp_path):
    cache, *_ = make_cache(tmp_path)
    entry = cache.shards()[0]
    path = tmp_path / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="heldout-doc-00000"):
        cache.read(entry)
    with pytest.raises(CacheCorruptError, match="heldout-doc-00000"):
        cache.verify()


def test_temp_files_of_crashed_writers_are_ignored_and_cleaned(tmp_path):
    cache, *_ = make_cache(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    entry = cache.shards()[0]
    name = entry["file"].split("/")[1]
    tmp = tmp_path / "shards" / f".{name}.tmp-{os.uname().nodename}-{dead.stdout.strip()}-abcd1234"
    tmp.write_bytes(b"half a shard")
    live = tmp_path / "shards" / f".x.st.tmp-{os.uname().nodename}-{os.getpid()}-abcd1234"
    live.write_bytes(b"someone is writing")
    reopened = open_cache(str(tmp_path))
    assert [e["name"] for e in reopened.shards()] == [entry["name"]]
    reopened.read(entry)
    removed = Store(str(tmp_path)).clean_temps(("", "shards"))
    assert removed == [tmp.name] and not tmp.exists() and live.exists()


def test_commit_never_overwrites_and_a_committed_orphan_is_adopted(tmp_path):
    cache, tokens, *_ = make_cache(tmp_path, fmt="topk")
    entry = cache.shards()[0]
    path = tmp_path / entry["file"]
    inode = path.stat().st_ino
    other = {"ids": np.zeros((5 * L, 32), np.int32), "logprobs": np.zeros((5 * L, 32), np.float16),
             "tail": np.zeros(5 * L, np.float32)}
    stats = {"vocab_size": V, "teacher_nll_sum": 0.0, "teacher_top1_correct": 0}
    again = commit_shard(str(tmp_path), entry["name"], "heldout", entry["key"], tokens, other, stats,
                         topk.Params(top_k=32))
    assert again == entry and path.stat().st_ino == inode  # the second writer adopted the first's file
    assert entry_from_file(str(tmp_path), entry["file"], entry["key"]) == entry
    with pytest.raises(CacheCorruptError, match="expected"):
        entry_from_file(str(tmp_path), entry["file"], "another-key")


def test_a_sampled_shard_that_does_not_decode_names_the_shard(tmp_path):
    """Checksums catch flipped bytes; a file whose own metadata disagrees with its streams (a writer bug) must
    still fail loudly, naming the shard."""
    cache, *_ = make_cache(tmp_path)
    entry = cache.shards()[0]
    path = tmp_path / entry["file"]
    fields, header = unpack(path.read_bytes())
    header["sampled"]["groups"]["count"][1] += 1
    data = pack(fields, header, raw=("sampled_bits",))
    path.write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    with pytest.raises(CacheCorruptError, match="heldout-doc-00000.*do not decode"):
        cache.read(entry)


def test_transient_errors_are_retried_with_backoff_and_a_store_that_stays_down_is_named_without_secrets(tmp_path):
    import errno

    from raydistill.tasks.cache.store import StoreUnavailableError

    store, calls = Store(str(tmp_path), retry_s=5), []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.EIO, "I/O error")
        return "ok"

    assert store._retry("put", "shards/x", flaky) == "ok" and len(calls) == 3
    with pytest.raises(FileNotFoundError):  # not transient: never retried
        store._retry("get", "shards/y", lambda: open(tmp_path / "missing", "rb"))
    down = Store("s3://AKIAKEY:S3cretValue99@bucket/prefix?endpoint_override=http://127.0.0.1:9&region=us-east-1",
                 retry_s=1)
    with pytest.raises(StoreUnavailableError) as e:
        down.read("caches/x/head.json")
    message = str(e.value)
    assert "s3://bucket/prefix" in message and "rerun the same command to resume" in message
    assert "S3cretValue99" not in message and "AKIAKEY" not in message
