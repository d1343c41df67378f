"""Shared by the tests of tasks/cache: a fake teacher and a one-shard cache built as workflows.cache builds it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from raydistill.tasks.cache.encode import encode_shard
from raydistill.tasks.cache.formats import format_params
from raydistill.tasks.cache.manifest import add_entry, new_manifest, shard_key, write_manifest
from raydistill.tasks.cache.shards import commit_shard, open_cache
from raydistill.tasks.config import CacheConfig, CorpusConfig, TeacherConfig
from raydistill.tasks.corpus import content_hash

V, L = 40, 6


class FakeTeacher(torch.nn.Module):
    """Deterministic logits [B, L, V] from token ids: a random embedding → vocabulary map."""

    def __init__(self, vocab=V, scale=3.0):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.table = torch.randn(vocab, vocab, generator=g) * scale

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids] + 0.1 * torch.arange(input_ids.shape[1])[:, None])


def tokens_of(seed=0, windows=5):
    return np.random.default_rng(seed).integers(0, V, size=(windows, L + 1)).astype(np.int32)


def logits_of(tokens):
    return FakeTeacher()(torch.tensor(tokens[:, :-1], dtype=torch.long)).logits


def make_cache(tmp_path, fmt="sampled", split="heldout", temperature=1.0, **cache_kw):
    """A one-shard cache built the way workflows.cache builds it (minus Ray)."""
    teacher = TeacherConfig(source="tiny")
    cache_kw.setdefault("sampled_logprobs", True)  # the tests re-temper: they need the stored log-probs
    cache_cfg = CacheConfig(format=fmt, temperature=temperature, num_samples=cache_kw.pop("num_samples", 50),
                            **cache_kw)
    params = format_params(cache_cfg)
    corpus = CorpusConfig(seq_len=L)
    tokens = tokens_of()
    identity, tok_hash = {"source": "t", "kind": "tiny", "weights_sha256": "w", "architecture": {},
                          "dtype": "float32"}, "tokhash"
    key = shard_key(identity, tok_hash, content_hash(tokens), params, temperature)
    fields, stats, forwards = encode_shard(FakeTeacher(), tokens, split, params, temperature, 2, key)
    assert forwards == 3  # 5 windows, batches of 2
    manifest = new_manifest(identity, tok_hash, cache_cfg, corpus)
    entry = commit_shard(str(tmp_path), "heldout-doc-00000", split, key, tokens, fields, stats, params)
    add_entry(manifest, entry)
    manifest["complete"] = True
    write_manifest(str(tmp_path), manifest)
    return open_cache(str(tmp_path), manifest["id"]), tokens, teacher, cache_cfg, corpus


def as_dense(sparse, vocab=V):
    """SparseTargets → dense probabilities [..., V] (tail dropped)."""
    out = torch.zeros(*sparse.ids.shape[:-1], vocab)
    return out.scatter_add(-1, sparse.ids, sparse.probs)
