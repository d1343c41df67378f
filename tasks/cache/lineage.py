"""What a registered version was trained on, as digests computed from the cache's index in bounded memory.

    python -c "from raydistill.tasks.cache.shards import open_cache; from raydistill.tasks.cache.lineage import \
index_digests; print(index_digests(open_cache('runs/tiny/cache').index, {}))"

``register`` tags a model version with these digests and logs the cache's index file itself (one row per shard:
name, split, key, file sha256, size) as the version's shard list; ``raydistill lineage`` recomputes the digests from
that file and checks them against the tags. Both walk the index in shard-key order a chunk of rows at a time, so at
10⁶–10⁷ shards they hold one chunk and the row order (4 B a shard), never a list of entries.

- ``shards_sha256``: sha256 of ``json.dumps(sorted(shard keys))`` (the definition the tag has always had: a version
  registered before the index was logged verifies the same way), fed one key at a time;
- ``corpus_sha256``: sha256 of the corpus settings, then of (name, split, windows, tokens) per shard in key order:
  which parts of which corpus files, at what sizes (the tokens themselves are pinned by the shard keys);
- ``shards``, ``train``, ``heldout``: counts.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from raydistill.tasks.cache.index import SPLITS, Index

CHUNK_ROWS = 65_536  # rows hashed at a time: ≈ 2 MB of keys, whatever the number of shards


def corpus_settings(head: dict) -> dict:
    """The part of a cache head that says how its corpus was read (the first input of ``corpus_sha256``)."""
    return {"corpus": head.get("corpus"), "seq_len": head.get("seq_len"), "tokenizer_hash": head.get("tokenizer_hash")}


def index_digests(index: Index, corpus: dict | None) -> dict:
    """The lineage digests of every shard of ``index`` (see the module doc); ``corpus``: the cache's corpus
    settings (its head's ``corpus``, ``seq_len`` and ``tokenizer_hash``), or None to skip ``corpus_sha256`` (a
    reader checking only the shard keys reads no name column)."""
    order = _key_order(index)
    keys_h = hashlib.sha256(b"[")
    corpus_h = None if corpus is None else hashlib.sha256(json.dumps(corpus, sort_keys=True, default=str).encode())
    split_col = index.column("split") if len(index) else np.zeros(0, np.int8)
    for start in range(0, len(order), CHUNK_ROWS):
        rows = order[start:start + CHUNK_ROWS]
        keys = index.column("key")[rows]
        text = ", ".join(f'"{bytes(k).hex()}"' for k in keys)
        keys_h.update(((", " if start else "") + text).encode())
        if corpus_h is None:
            continue
        names = index.table.column("name").take(pa.array(rows)).to_pylist()
        sizes = zip(names, split_col[rows].tolist(), index.column("windows")[rows].tolist(),
                    index.column("tokens")[rows].tolist())
        corpus_h.update("".join(f"{n}\x00{SPLITS[s]}\x00{w}\x00{t}\n" for n, s, w, t in sizes).encode())
    keys_h.update(b"]")
    counts = {s: int(np.count_nonzero(split_col == i)) for i, s in enumerate(SPLITS)}
    return {"shards": len(order), **counts, "shards_sha256": keys_h.hexdigest(),
            "corpus_sha256": None if corpus_h is None else corpus_h.hexdigest()}


def _key_order(index: Index) -> np.ndarray:
    """Row numbers in the order of the shards' full keys (the first 64 bits sort all but ties; ties, which two
    shards of the same tokens in two files make, are ordered by the full key)."""
    if not len(index):
        return np.zeros(0, np.int64)
    order = index.rows(None)
    key64 = index.column("key64")[order]
    tied = np.flatnonzero(key64[1:] == key64[:-1])
    for i in tied[::-1]:  # rare: fix each tied pair (and runs) by the full key
        lo = i
        hi = i + 2
        while hi < len(order) and key64[hi] == key64[lo]:
            hi += 1
        block = order[lo:hi]
        order[lo:hi] = block[np.argsort([bytes(index.column("key")[r]) for r in block], kind="stable")]
    return order
