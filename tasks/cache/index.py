"""The cache's compact shard index: one Arrow IPC file per finished cache, memory-mapped by every reader.

    python -c "from raydistill.tasks.cache.shards import open_cache; c = open_cache('runs/tiny/cache'); \
print(len(c.shards()), c.shards('heldout')[0])"

A row per shard (:data:`SCHEMA`, ≈ 140 B on disk with a 40-character name). Writers append rows in record batches
as shards arrive (:class:`IndexWriter`: memory bounded by one batch, whatever the number of shards); the file is
named by its sha256, so a reader on another node keeps a local copy under ``~/.cache/raydistill/index`` and maps it
(a process touches only the columns it reads: a training worker holds the split and key columns, ≈ 9 B/shard, plus
its permutation). Rows come in commit order; :class:`ShardList` presents one split in shard-key order, so every
consumer sees the same order whatever order the shards were computed in.

The cache's one key (:func:`multiset_key`) is a hash of its *set* of shard keys — the count and the sum of their
first 128 bits modulo 2¹²⁸ — so it is computed incrementally, in any order, in O(1) memory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

SPLITS = ("train", "heldout")
SCHEMA = pa.schema([("name", pa.string()), ("split", pa.int8()), ("key", pa.binary(32)), ("key64", pa.uint64()),
                    ("file64", pa.uint64()),
                    ("sha256", pa.binary(32)), ("bytes", pa.int64()), ("tokens", pa.int32()),
                    ("windows", pa.int32()), ("vocab_size", pa.int32()), ("teacher_nll_sum", pa.float64()),
                    ("teacher_top1_correct", pa.int64())])
BATCH_ROWS = 256  # rows buffered before a record batch is written: bounds a writer's memory (~0.3 MB)


def shard_file(name: str, key: str) -> str:
    """Where a shard lives, relative to the cache dir (the pool every cache of the dir shares)."""
    return f"shards/{name}-{key[:16]}.st"


def file64(basename: str) -> int:
    """64-bit id of a shard file's name (``<name>-<key16>.st``): what a listing is matched against, without
    strings (two shards with the same tokens in two streams share a key but not a file name)."""
    return int.from_bytes(hashlib.blake2b(basename.encode(), digest_size=8).digest(), "little")


class MultisetKey:
    """Order-independent digest of a set of hex keys: count and sum of their first 128 bits mod 2¹²⁸."""

    def __init__(self):
        self.count, self.total = 0, 0

    def add(self, key_hex: str) -> None:
        self.count += 1
        self.total = (self.total + int(key_hex[:32], 16)) % (1 << 128)

    def hexdigest(self) -> str | None:
        if not self.count:
            return None
        return hashlib.sha256(f"raydistill-cache:{self.count}:{self.total:032x}".encode()).hexdigest()


def multiset_key(keys) -> str | None:
    """The cache key of shard keys ``keys`` (hex strings), in any order; None for none."""
    m = MultisetKey()
    for k in keys:
        m.add(k)
    return m.hexdigest()


class IndexWriter:
    """Append shard entries to a local Arrow IPC file in batches; :meth:`close` returns (path, sha256, rows)."""

    def __init__(self, directory: str | None = None):
        fd, self.path = tempfile.mkstemp(prefix=".index-", suffix=".arrow", dir=directory)
        self._file = os.fdopen(fd, "wb")
        self._writer = pa.ipc.new_file(self._file, SCHEMA)
        self._rows: list[dict] = []
        self.rows = 0
        self.key = MultisetKey()

    def add(self, entry: dict) -> None:
        self._rows.append(entry)
        self.key.add(entry["key"])
        self.rows += 1
        if len(self._rows) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        cols = {"name": [r["name"] for r in rows], "split": [SPLITS.index(r["split"]) for r in rows],
                "key": [bytes.fromhex(r["key"]) for r in rows],
                "key64": [int(r["key"][:16], 16) for r in rows],
                "file64": [file64(shard_file(r["name"], r["key"]).rsplit("/", 1)[1]) for r in rows],
                "sha256": [bytes.fromhex(r["sha256"]) for r in rows]}
        for f in ("bytes", "tokens", "windows", "vocab_size", "teacher_nll_sum", "teacher_top1_correct"):
            cols[f] = [r[f] for r in rows]
        self._writer.write_batch(pa.record_batch(cols, schema=SCHEMA))

    def close(self) -> tuple[str, str, int]:
        self._flush()
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return self.path, h.hexdigest(), self.rows

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            Path(self.path).unlink(missing_ok=True)


def local_copy(store, rel: str, sha256: str) -> str:
    """A local path holding ``rel`` of ``store``: the file itself for a local store, else a verified copy under
    ``~/.cache/raydistill/index`` (named by its sha256: written once per node, then reused)."""
    if not store.remote:
        return store.path(rel)
    from raydistill.tasks.teacher import raydistill_home

    from raydistill.tasks.fileio import atomic_write_bytes

    target = raydistill_home() / "index" / f"{sha256}.arrow"
    if not target.exists():
        data = store.read(rel)
        if hashlib.sha256(data).hexdigest() != sha256:
            from raydistill.tasks.cache.manifest import CacheCorruptError

            raise CacheCorruptError(f"index {store.url(rel)}: sha256 mismatch (rerun `raydistill cache` to rebuild)")
        atomic_write_bytes(target, data)
    return str(target)


class Index:
    """A memory-mapped index file: columns as (zero-copy where possible) numpy arrays."""

    def __init__(self, path: str | None):
        self.path = path
        if path is None:
            self.table = SCHEMA.empty_table()
        else:
            self.table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
        self._cols: dict[str, np.ndarray] = {}
        lengths = [len(c) for c in self.table.column("name").chunks] if self.table.num_rows else []
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> np.ndarray:
        """Numeric column ``name`` as numpy (cached); fixed-size binary columns as ``[n, 32]`` uint8."""
        if name not in self._cols:
            col = self.table.column(name).combine_chunks()
            if pa.types.is_fixed_size_binary(col.type):
                buf = col.buffers()[1]
                arr = np.frombuffer(buf, dtype=np.uint8)[col.offset * 32:(col.offset + len(col)) * 32]
                self._cols[name] = arr.reshape(len(col), 32)
            else:
                self._cols[name] = col.to_numpy(zero_copy_only=False)
        return self._cols[name]

    def entry(self, row: int) -> dict:
        """The shard entry (``tasks.cache.manifest.ShardEntry``) of ``row``, read from the record batch holding it
        (nothing else of the file is touched)."""
        row = int(row)
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        at = row - int(self._starts[chunk])

        def cell(name: str):
            return self.table.column(name).chunk(chunk)[at].as_py()

        name, key = cell("name"), cell("key").hex()
        return {"name": name, "split": SPLITS[cell("split")], "key": key, "file": shard_file(name, key),
                "sha256": cell("sha256").hex(), "bytes": cell("bytes"), "tokens": cell("tokens"),
                "windows": cell("windows"), "vocab_size": cell("vocab_size"),
                "teacher_nll_sum": cell("teacher_nll_sum"), "teacher_top1_correct": cell("teacher_top1_correct")}

    def rows(self, split: str | None) -> np.ndarray:
        """Row numbers of ``split`` (None: all) in shard-key order."""
        small = np.int32 if len(self) < 2 ** 31 else np.int64  # 4 bytes a shard up to 2·10⁹ shards
        if split is None:
            sel = np.arange(len(self), dtype=small)
        else:
            sel = np.flatnonzero(self.column("split") == SPLITS.index(split)).astype(small)
        return sel[np.argsort(self.column("key64")[sel], kind="stable")]


class ShardList:
    """The shards of one split as a sequence of entry dicts built on access (``len``, ``[i]``, slices, iteration):
    nothing per shard is held beyond the row numbers."""

    def __init__(self, index: Index, rows: np.ndarray):
        self.index, self.rows = index, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ShardList(self.index, self.rows[i])
        if isinstance(i, (list, np.ndarray)):
            return ShardList(self.index, self.rows[np.asarray(i, dtype=np.int64)])
        return self.index.entry(self.rows[i])

    def __iter__(self) -> Iterator[dict]:
        for r in self.rows:
            yield self.index.entry(r)

    def __bool__(self) -> bool:
        return len(self.rows) > 0

    def column(self, name: str) -> np.ndarray:
        """Column ``name`` of these shards, in this list's order."""
        return self.index.column(name)[self.rows]

    def keys(self) -> list[str]:
        return [self.index.entry(r)["key"] for r in self.rows]
