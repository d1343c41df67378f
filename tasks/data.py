"""Per-worker streaming of cache shards into training micro-batches, with a resumable position.

    python -m pytest tests/unit/test_data.py

Each epoch the train shards (in shard-key order) are put in a seeded order (``seed``, ``epoch``); worker ``rank``
of ``world_size`` takes every ``world_size``-th shard of that order, so workers read disjoint shards and every
shard is read once per epoch. A background thread fetches, verifies and decodes the next ``prefetch`` shards
while the step runs (:class:`Prefetch`), so a worker holds at most ``prefetch + 2`` shards, and the order is a
numpy permutation (8 bytes a shard), whatever the cache's size. The stream is endless (epoch after epoch):
training runs for a number of steps, and every worker yields the same number of micro-batches per step, so ranks
never wait on each other for data.

After each micro-batch the stream reports a :class:`DataPosition` (epoch, shard index in this worker's list,
window offset) of the next unread window; starting a new stream at that position continues exactly there.
With ``targets=False`` (online teacher) the same windows come without cached targets.

Chat shards. A shard with a loss mask (a chat corpus, :mod:`tasks.cache.masked`) gives the labels outside the mask
as ``-100``, so CE and KD (and the online teacher's KD) are taken on the assistant's tokens only.

Vocabulary. A student with fewer embedding rows than the teacher (the teacher's extra rows are padding: the
tokenizers agree on every shared id, :func:`tasks.students.check_vocab`) gets the teacher distribution
*conditioned on the ids it has*: :func:`tasks.cache.targets.restrict_vocab` drops the teacher's mass on ids ≥ the
student's rows and renormalises the rest (each format's module says how; ``topk``'s tail bucket keeps whatever
padding mass it held: it cannot be split).
A student with more rows than the teacher needs nothing here: its extra rows get teacher mass 0 in the loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from raydistill.tasks.cache.targets import CachedTargets, at_temperature, cat_targets, restrict_vocab

IGNORE_INDEX = -100  # the losses' ignore_index (tasks.losses.distillation_loss)


@dataclass(frozen=True)
class DataPosition:
    """Where a worker's stream continues: ``epoch``, ``shard`` (index into that epoch's worker list), ``window``."""

    epoch: int = 0
    shard: int = 0
    window: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DataPosition":
        return cls(**{k: int(v) for k, v in (d or {}).items()})


@dataclass
class Batch:
    """One micro-batch: ``input_ids``/``labels`` Long ``[B, L]``; ``targets`` the teacher distribution over
    ``labels`` at the training temperature (``SparseTargets`` ``[B, L, K]`` or ``DenseTargets`` ``[B, L, V]``).
    A label outside a chat shard's loss mask is ``IGNORE_INDEX`` (-100): the losses skip it."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    targets: Any

    @property
    def tokens(self) -> int:
        """Labels that carry loss."""
        return int((self.labels != IGNORE_INDEX).sum())


def epoch_shards(entries, epoch: int, rank: int, world_size: int, seed: int):
    """This worker's shards for ``epoch``: every ``world_size``-th of a seeded permutation of ``entries`` (a
    sequence; a :class:`~tasks.cache.index.ShardList` stays a view)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    seed64 = int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little")
    order = np.random.default_rng(seed64).permutation(len(entries))[rank::world_size].astype(np.int32)
    return entries[order] if hasattr(entries, "rows") else [entries[i] for i in order]


class Prefetch:
    """``fn(item)`` of each of ``items``, in order, computed ``depth`` ahead on a daemon thread (shard reads:
    I/O, sha256 and LZMA release the GIL, so they overlap the training step). An exception in ``fn`` is raised
    where its result would have been yielded."""

    def __init__(self, items: Iterable, fn: Callable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(items), fn), daemon=True, name="prefetch")
        self._thread.start()

    def _run(self, items: Iterator, fn: Callable) -> None:
        try:
            for item in items:
                result = (True, fn(item))
                while not self._stop.is_set():
                    try:
                        self._queue.put(result, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put((False, StopIteration()))
        except BaseException as e:  # noqa: BLE001 — handed to the consumer
            self._queue.put((False, e))

    def __iter__(self):
        while True:
            ok, value = self._queue.get()
            if ok:
                yield value
            elif isinstance(value, StopIteration):
                return
            else:
                raise value

    def close(self) -> None:
        self._stop.set()


def _make_batch(pieces: list[tuple[Any, int, int]], temperature: float, targets: bool,
                vocab_size: int | None) -> Batch:
    tokens = torch.cat([shard.tokens[a:b] for shard, a, b in pieces])
    labels = tokens[:, 1:].clone()
    for (shard, a, b), rows in zip(pieces, torch.split(labels, [b - a for _, a, b in pieces])):
        mask = getattr(shard, "mask", None)
        if mask is not None:  # a chat shard: no loss (CE or KD) where the label is not the assistant's
            rows.masked_fill_(~mask[a:b], IGNORE_INDEX)
    out = None
    if targets:
        cached = [shard.targets(slice(a, b)) for shard, a, b in pieces]
        cached = cached[0] if len(cached) == 1 else cat_targets(cached)
        out = at_temperature(cached if vocab_size is None else restrict_vocab(cached, vocab_size), temperature)
    return Batch(tokens[:, :-1].contiguous(), labels, out)


def train_batches(cache, *, rank: int, world_size: int, micro_batch_size: int, temperature: float,
                  seed: int = 0, start: DataPosition = DataPosition(), targets: bool = True,
                  vocab_size: int | None = None, prefetch: int = 2) -> Iterator[tuple[Batch, DataPosition]]:
    """Endless ``(batch, position_after)`` pairs from this worker's train shards (see the module doc).

    Args:
        cache: an opened cache (``tasks.cache.shards.Cache``): ``shards("train")`` entries and ``read(entry)``.
        rank, world_size: this worker and the number of workers.
        micro_batch_size: windows per batch; a batch may take windows from two consecutive shards.
        temperature: training temperature T the targets are converted to.
        seed: seed of the per-epoch shard order (same on every worker).
        start: position to continue from (``DataPosition()`` = the beginning).
        targets: decode the cached targets (False: ``Batch.targets`` is None, for an online teacher).
        vocab_size: the student's vocabulary (logit rows); targets on more ids are :func:`restrict_vocab`-ed.
        prefetch: shards read ahead on a background thread (0: read in the step).
    """
    entries = cache.shards("train")
    if len(entries) < world_size:
        raise ValueError(f"the cache has {len(entries)} train shards but training uses {world_size} workers; "
                         "every worker needs at least one shard (use fewer workers, smaller "
                         "corpus.windows_per_shard or a larger corpus)")
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
    epoch, index, window = start.epoch, start.shard, start.window
    pieces, have = [], 0
    while True:
        shards = epoch_shards(entries, epoch, rank, world_size, seed)
        todo = (shards[i] for i in range(index, len(shards)))
        reader = Prefetch(todo, cache.read, prefetch) if prefetch else map(cache.read, todo)
        try:
            for shard in reader:
                n = shard.tokens.shape[0]
                while window < n:
                    take = min(micro_batch_size - have, n - window)
                    pieces.append((shard, window, window + take))
                    have, window = have + take, window + take
                    if have == micro_batch_size:
                        after = DataPosition(epoch, index, window) if window < n else \
                            DataPosition(epoch, index + 1, 0)
                        yield _make_batch(pieces, temperature, targets, vocab_size), after
                        pieces, have = [], 0
                index, window = index + 1, 0
        finally:
            if prefetch:
                reader.close()
        epoch, index = epoch + 1, 0


class _VocabView:
    """A read shard whose ``targets(window_slice)`` are :func:`restrict_vocab`-ed; other fields pass through."""

    def __init__(self, shard, vocab_size: int):
        self._shard, self._vocab_size = shard, vocab_size

    def __getattr__(self, name):
        return getattr(self._shard, name)

    def targets(self, window_slice: slice = slice(None)) -> CachedTargets:
        return restrict_vocab(self._shard.targets(window_slice), self._vocab_size)


def heldout_entries(cache, max_windows: int | None = None):
    """The held-out entries an evaluation capped at ``max_windows`` reads: the first ones in shard-key order whose
    windows reach the cap (all of them without one). Its keys name the evaluated set: held-out shards added later
    change it only when their keys sort before its end."""
    entries = cache.shards("heldout")
    if max_windows is None or not len(entries):
        return entries
    reach = np.cumsum(entries.column("windows"))
    return entries[: int(np.searchsorted(reach, max_windows)) + 1]


def heldout_shards(cache, *, rank: int = 0, world_size: int = 1, vocab_size: int | None = None,
                   max_windows: int | None = None) -> Iterator:
    """Read held-out shards, one at a time; worker ``rank`` gets every ``world_size``-th of
    :func:`heldout_entries` (shard-key order), so a capped evaluation reads no shard it does not score.

    With ``vocab_size`` smaller than the cache's, each shard's targets are restricted to it (:func:`restrict_vocab`).
    """
    for entry in heldout_entries(cache, max_windows)[rank::world_size]:
        shard = cache.read(entry)
        yield shard if vocab_size is None or (shard.vocab_size or 0) <= vocab_size else _VocabView(shard, vocab_size)


class HeldoutSet:
    """Re-iterable :func:`heldout_shards` (each pass reads the shards again, one at a time): what quantize and the
    gate evaluate several models on without holding the split in memory."""

    def __init__(self, cache, max_windows: int | None = None, vocab_size: int | None = None):
        self.cache, self.max_windows, self.vocab_size = cache, max_windows, vocab_size
        self.entries = heldout_entries(cache, max_windows)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator:
        return heldout_shards(self.cache, vocab_size=self.vocab_size, max_windows=self.max_windows)
