"""Streaming train shards: disjoint per worker, batches across shard boundaries, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydistill.tasks.config import CacheConfig, CorpusConfig
from raydistill.tasks.data import DataPosition, epoch_shards, heldout_shards, train_batches
from raydistill.tasks.cache.formats import sampled
from raydistill.tasks.cache.manifest import add_entry, new_manifest, write_manifest
from raydistill.tasks.cache.shards import commit_shard, open_cache
from raydistill.tasks.cache.targets import SparseTargets, heldout_stats

V, L, W = 40, 4, 3  # vocab, seq_len, windows per shard


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A real (small) sampled cache: 5 train shards + 2 held-out; token [w, 0] is the global window number."""
    d = str(tmp_path_factory.mktemp("cache"))
    teacher = {"kind": "test", "weights_sha256": "0", "architecture": {}, "dtype": "float32"}
    manifest = new_manifest(teacher, "tok", CacheConfig(num_samples=8, sampled_logprobs=True), CorpusConfig(seq_len=L))
    g = torch.Generator().manual_seed(0)
    for s in range(7):
        split = "train" if s < 5 else "heldout"
        tokens = torch.randint(0, V, (W, L + 1), generator=g)
        tokens[:, 0] = torch.arange(s * W, (s + 1) * W)
        logits = torch.randn(W, L, V, generator=g)
        params = sampled.Params(num_samples=8)
        fields = sampled.encode(logits, params, 1.0, [torch.Generator().manual_seed(s * 10 + w) for w in range(W)])
        fields.update(heldout_stats(logits, tokens[:, 1:]) if split == "heldout" else {})
        stats = {"vocab_size": V, "teacher_nll_sum": 0.0, "teacher_top1_correct": 0}
        add_entry(manifest, commit_shard(d, f"s{s}", split, f"{s:064x}", tokens.numpy().astype(np.int32), fields,
                                         stats, params))
    manifest["complete"] = True
    write_manifest(d, manifest)
    return open_cache(d)


def _windows(batch):
    return batch.input_ids[:, 0].tolist()


def test_workers_get_disjoint_shards_covering_the_epoch():
    entries = list(range(7))
    for epoch in range(3):
        parts = [epoch_shards(entries, epoch, r, 3, seed=1) for r in range(3)]
        assert sorted(sum(parts, [])) == entries
    assert epoch_shards(entries, 0, 0, 1, 1) != epoch_shards(entries, 1, 0, 1, 1)  # reshuffled per epoch
    assert epoch_shards(entries, 0, 0, 1, 1) == epoch_shards(entries, 0, 0, 1, 1)  # deterministic
    with pytest.raises(ValueError, match="rank"):
        epoch_shards(entries, 0, 3, 3, 0)


def test_stream_follows_the_epoch_order_across_shard_boundaries(cache):
    stream = train_batches(cache, rank=0, world_size=1, micro_batch_size=2, temperature=2.0, seed=3)
    order = [int(e["name"][1:]) for e in epoch_shards(cache.shards("train"), 0, 0, 1, 3)]
    want = [s * W + w for s in order for w in range(W)]  # 15 windows: 7 batches, the 8th straddles epochs
    got = []
    for _ in range(7):
        batch, pos = next(stream)
        got += _windows(batch)
    assert got == want[:14]
    batch, pos = next(stream)
    assert _windows(batch)[0] == want[14] and pos.epoch == 1
    assert batch.input_ids.shape == batch.labels.shape == (2, L)
    assert torch.equal(batch.input_ids[:, 1:], batch.labels[:, :-1])


def test_targets_are_a_distribution_at_the_training_temperature(cache):
    batch, _ = next(train_batches(cache, rank=0, world_size=1, micro_batch_size=4, temperature=2.0))
    t = batch.targets
    assert isinstance(t, SparseTargets) and t.ids.shape[:2] == (4, L) and t.probs.shape == t.ids.shape
    assert torch.allclose(t.probs.sum(-1) + t.tail, torch.ones(4, L), atol=1e-5)
    t1, _ = next(train_batches(cache, rank=0, world_size=1, micro_batch_size=4, temperature=1.0))
    assert not torch.allclose(t.probs, t1.targets.probs)  # re-tempered, not just count/N


def test_resume_from_a_position_continues_exactly(cache):
    kw = dict(rank=1, world_size=2, micro_batch_size=2, temperature=1.0, seed=5)
    full = train_batches(cache, **kw)
    reference = [next(full) for _ in range(9)]
    _, pos = reference[3]
    assert pos != DataPosition()
    restored = DataPosition.from_dict(pos.to_dict())
    resumed = train_batches(cache, **kw, start=restored)
    for batch, after in reference[4:]:
        again, again_after = next(resumed)
        assert torch.equal(again.input_ids, batch.input_ids) and again_after == after
        assert torch.equal(again.targets.probs, batch.targets.probs)


def test_ranks_read_different_windows(cache):
    a, _ = next(train_batches(cache, rank=0, world_size=2, micro_batch_size=3, temperature=1.0))
    b, _ = next(train_batches(cache, rank=1, world_size=2, micro_batch_size=3, temperature=1.0))
    assert not set(_windows(a)) & set(_windows(b))


def test_too_few_shards_for_the_workers_is_a_clear_error(cache):
    with pytest.raises(ValueError, match="5 train shards but training uses 8 workers"):
        next(train_batches(cache, rank=0, world_size=8, micro_batch_size=2, temperature=1.0))


def test_heldout_shards_are_split_between_ranks(cache):
    names = [[s.name for s in heldout_shards(cache, rank=r, world_size=2)] for r in range(2)]
    assert names == [["s5"], ["s6"]]
    assert all(s.teacher_top1 is not None for s in heldout_shards(cache))


def test_prefetch_yields_in_order_ahead_of_the_consumer_and_raises_where_the_failure_was():
    from raydistill.tasks.data import Prefetch

    seen = []

    def read(i):
        seen.append(i)
        if i == 5:
            raise OSError("shard 5 unreadable")
        return i * 10

    it = iter(Prefetch(range(8), read, depth=2))
    assert [next(it) for _ in range(3)] == [0, 10, 20]
    with pytest.raises(OSError, match="shard 5"):
        list(it)
    assert seen == [0, 1, 2, 3, 4, 5]  # read ahead, never past the failure


def test_epoch_order_is_the_same_for_a_list_and_an_index_view_of_the_shards(cache):
    view = cache.shards("train")
    as_list = list(view)
    for epoch in range(2):
        assert list(epoch_shards(view, epoch, 1, 2, seed=4)) == epoch_shards(as_list, epoch, 1, 2, seed=4)


def test_a_capped_heldout_read_stops_at_the_shards_that_cover_the_cap(cache):
    from raydistill.tasks.data import HeldoutSet, heldout_entries

    assert len(heldout_entries(cache, None)) == 2 and len(heldout_entries(cache, 1)) == 1
    assert len(heldout_entries(cache, W)) == 1 and len(heldout_entries(cache, W + 1)) == 2
    capped = HeldoutSet(cache, 2)
    assert [s.name for s in capped] == [s.name for s in capped] == [heldout_entries(cache, 2)[0]["name"]]
