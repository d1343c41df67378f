"""The lineage digests streamed over a cache index equal the definitions register's tags have always had."""

from __future__ import annotations

import hashlib
import json
import random

from raydistill.tasks.cache import lineage
from raydistill.tasks.cache.index import Index, IndexWriter


def _entry(name: str, split: str, key: str, windows: int) -> dict:
    return {"name": name, "split": split, "key": key, "sha256": hashlib.sha256(name.encode()).hexdigest(),
            "bytes": 100, "tokens": 64 * windows, "windows": windows, "vocab_size": 50, "teacher_nll_sum": 1.0,
            "teacher_top1_correct": 3}


def test_streamed_digests_match_the_sorted_key_list_in_chunks_with_tied_and_repeated_keys(tmp_path, monkeypatch):
    rng = random.Random(0)
    keys = [f"{rng.getrandbits(256):064x}" for _ in range(40)]
    keys[5] = keys[9][:16] + "f" * 48  # the same first 64 bits as another key: ordered by the full key
    keys[7] = keys[3]  # the same tokens in two files: one key, two shards
    entries = [_entry(f"f{i % 4}.txt-{i:05d}", "heldout" if i % 5 == 0 else "train", k, 1 + i % 3)
               for i, k in enumerate(keys)]
    writer = IndexWriter(str(tmp_path))
    for e in entries:
        writer.add(e)
    path, _, _ = writer.close()
    monkeypatch.setattr(lineage, "CHUNK_ROWS", 7)  # several chunks, a tie across none or some of them
    got = lineage.index_digests(Index(path), {"seq_len": 64})
    assert got["shards_sha256"] == hashlib.sha256(json.dumps(sorted(keys)).encode()).hexdigest()
    assert (got["shards"], got["train"], got["heldout"]) == (40, 32, 8)
    # the corpus digest covers every shard's name and size: another size is another digest
    entries[11]["windows"] += 1
    other = IndexWriter(str(tmp_path))
    for e in entries:
        other.add(e)
    assert lineage.index_digests(Index(other.close()[0]), {"seq_len": 64})["corpus_sha256"] != got["corpus_sha256"]
    assert lineage.index_digests(Index(path), {"seq_len": 65})["corpus_sha256"] != got["corpus_sha256"]
    keys_only = lineage.index_digests(Index(path), None)  # what `raydistill lineage` checks: no corpus digest
    assert keys_only["shards_sha256"] == got["shards_sha256"] and keys_only["corpus_sha256"] is None


def test_an_empty_index_has_the_digest_of_an_empty_list():
    got = lineage.index_digests(Index(None), {})
    assert got["shards_sha256"] == hashlib.sha256(b"[]").hexdigest() and got["shards"] == 0
