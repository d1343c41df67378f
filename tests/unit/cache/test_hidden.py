"""The ``hidden`` format: exact teacher logits rebuilt from stored bf16 hidden states and a head stored once per
cache dir, through the loss (fused and autograd, chunked) and as the oracle the sampled estimator is checked against."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydistill.tasks.cache.encode import encode_shard, window_generator
from raydistill.tasks.cache.formats import hidden, sampled
from raydistill.tasks.cache.head import head_file
from raydistill.tasks.cache.manifest import CacheCorruptError, add_entry, new_manifest, write_manifest
from raydistill.tasks.cache.shards import commit_shard, open_cache
from raydistill.tasks.cache.targets import CachedTargets, DenseTargets, at_temperature, restrict_vocab
from raydistill.tasks.config import CacheConfig, CorpusConfig, TeacherConfig, TinyModelConfig
from raydistill.tasks.data import train_batches
from raydistill.tasks.losses import LOSSES, distillation_loss
from raydistill.tasks.teacher import load_teacher

TINY = TinyModelConfig(num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32, seed=3)
L = 8


@pytest.fixture(scope="module")
def teacher():
    model, _ = load_teacher(TeacherConfig(source="tiny", tiny=TINY, dtype="float32"))
    with torch.no_grad():  # a sharper teacher than the random init: a distribution with a head and a tail
        model.lm_head.weight.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def cached(teacher, tmp_path_factory):
    """A hidden cache of 3 shards (2 train, 1 held-out), committed as the cache stage commits."""
    d = str(tmp_path_factory.mktemp("hidden"))
    cfg = CacheConfig(format="hidden")
    params = hidden.Params.from_config(cfg)
    manifest = new_manifest({"kind": "tiny", "weights_sha256": "w", "architecture": {}, "dtype": "float32",
                             "device": "cpu"}, "tok", cfg, CorpusConfig(seq_len=L))
    g = np.random.default_rng(0)
    shards = {}
    for s, split in enumerate(("train", "train", "heldout")):
        tokens = g.integers(0, 2000, size=(3, L + 1)).astype(np.int32)
        fields, stats, forwards = encode_shard(teacher, tokens, split, params, 1.0, 2, f"{s:064x}")
        assert forwards == 2 and fields["hidden"].shape == (3 * L, TINY.hidden_size)
        add_entry(manifest, commit_shard(d, f"s{s}", split, f"{s:064x}", tokens, fields, stats, params))
        shards[split] = tokens
    manifest["complete"] = True
    write_manifest(d, manifest)
    return open_cache(d), shards


def _teacher_logits(teacher, tokens):
    with torch.no_grad():
        return teacher(input_ids=torch.from_numpy(tokens[:, :-1]).long(), use_cache=False).logits.float()


def test_the_head_is_stored_once_and_the_rebuilt_distribution_is_the_teachers(teacher, cached):
    cache, shards = cached
    import os

    heads = os.listdir(os.path.join(cache.dir, "heads"))
    assert len(heads) == 1 and heads[0].endswith(".safetensors")
    shard = cache.read(cache.shards("heldout")[0])
    t = shard.targets()
    assert t.hidden.dtype == torch.bfloat16 and t.hidden.shape == (3, L, TINY.hidden_size)
    assert head_file(t.head.sha256) == f"heads/{heads[0]}"
    exact = torch.log_softmax(_teacher_logits(teacher, shards["heldout"]), -1)
    rebuilt = at_temperature(t, 1.0).logprobs()
    kl = (exact.exp() * (exact - rebuilt)).sum(-1)
    assert kl.max() < 1e-3  # only the bf16 rounding of h separates them
    assert torch.equal(shard.teacher_top1, exact.argmax(-1))
    nll = -exact.gather(-1, torch.from_numpy(shards["heldout"][:, 1:]).long().unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(shard.teacher_nll, nll, atol=1e-4)
    assert math.isclose(cache.totals["teacher_heldout_nll"], float(nll.mean()), rel_tol=1e-4)
    # any temperature, exactly: log_softmax of the rebuilt logits / T
    z = t.head.logits(t.hidden)
    assert torch.allclose(at_temperature(t, 2.0).logprobs(), torch.log_softmax(z / 2.0, -1), atol=1e-6)
    # restricted to a smaller student vocabulary: the teacher conditioned on the kept ids
    small = at_temperature(restrict_vocab(t, 1000), 1.0).logprobs()
    assert small.shape[-1] == 1000 and torch.allclose(small, torch.log_softmax(z[..., :1000], -1), atol=1e-5)


def test_a_corrupt_or_missing_head_is_refused_naming_the_shard(cached, tmp_path):
    import shutil

    cache, _ = cached
    copy = tmp_path / "copy"
    shutil.copytree(cache.dir, copy)
    (head,) = (copy / "heads").iterdir()
    head.write_bytes(head.read_bytes()[:-1] + b"\0")
    from raydistill.tasks.cache import head as head_module

    head_module._BY_SHA.clear()  # another process: nothing parsed yet
    other = open_cache(str(copy))
    with pytest.raises(CacheCorruptError, match="s0.*sha256 mismatch"):
        other.read(other.shards()[0])
    head.unlink()
    with pytest.raises(CacheCorruptError, match="s0.*teacher head heads/.*missing.*rerun `raydistill cache`"):
        other.read(other.shards()[0])


@pytest.mark.parametrize("loss", LOSSES)
def test_the_loss_on_hidden_targets_equals_the_loss_on_their_dense_log_probs(cached, loss):
    """Rebuilt chunk by chunk inside the loss (fused or autograd path): the same values and gradients as dense
    log-probs materialised up front (the ``full`` path)."""
    cache, _ = cached
    t = cache.read(cache.shards("train")[0]).targets()
    V = t.head.rows + 64  # a student vocabulary padded past the teacher's
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2000, (3, L), generator=g)
    for T in (1.0, 2.0):
        hid = at_temperature(t, T)
        dense = DenseTargets(hid.logprobs())
        outs = []
        for targets in (hid, dense):
            logits = (torch.randn(3, L, V, generator=torch.Generator().manual_seed(2)) * 2).requires_grad_()
            out = distillation_loss(logits, labels, targets, alpha=0.3, temperature=T, loss=loss, chunk_tokens=7)
            out["total"].backward()
            outs.append((out, logits.grad))
        (a, ga), (b, gb) = outs
        assert torch.allclose(a["total"], b["total"], rtol=1e-5) and torch.allclose(a["kd"], b["kd"], rtol=1e-5)
        assert torch.allclose(ga, gb, atol=1e-7)


def test_sampled_targets_are_unbiased_against_the_exact_hidden_cache(cached):
    """The oracle: the KD gradient (and, with stored log-probs, the KL value) of sampled targets, averaged over
    independent draws from the teacher the hidden cache rebuilds, equals the exact one from the hidden cache."""
    cache, _ = cached
    t = cache.read(cache.shards("train")[0]).targets()
    h = t.hidden[:1, :4]  # 4 positions
    z = t.head.logits(h)  # [1, 4, V]: the teacher's exact logits
    V = z.shape[-1]
    labels = torch.zeros(1, 4, dtype=torch.long)
    student = torch.randn(1, 4, V, generator=torch.Generator().manual_seed(3)) * 2

    def kd(targets):
        logits = student.clone().requires_grad_()
        out = distillation_loss(logits, labels, targets, alpha=0.0, temperature=1.0)
        out["total"].backward()
        return float(out["kd"]), logits.grad[0]

    exact_kd, exact_grad = kd(at_temperature(CachedTargets("hidden", 1.0, None, None, hidden=h, head=t.head), 1.0))
    reps, n = 250, 32
    params = sampled.Params(num_samples=n, logprobs=True)
    fields = sampled.encode(z.expand(reps, -1, -1), params, 1.0, [window_generator("oracle", i) for i in range(reps)])
    draws = sampled.decode(fields, slice(0, reps * 4), 4, params, 1.0, V)
    values, grads = [], torch.zeros_like(exact_grad)
    for r in range(reps):
        value, grad = kd(at_temperature(CachedTargets("sampled", 1.0, draws.ids[r:r + 1], draws.logprobs[r:r + 1],
                                                      draws.counts[r:r + 1], num_samples=n, vocab_size=V), 1.0))
        values.append(value)
        grads += grad / reps
    # the gradient w.r.t. the student's logits is (q − p̂)/tokens: its mean error is (p − E p̂)/4 with per-entry
    # sd sqrt(p(1 − p)/(n·reps))/4. Checked on each row's 64 likeliest ids (where the normal bound holds) and on the
    # summed rest (rare ids are Poisson-distributed: one draw is many of their sigmas)
    p = torch.softmax(z[0], -1)
    err = (grads - exact_grad) * 4
    head_ids = p.topk(64, -1).indices
    sigma = (p * (1 - p) / (n * reps)).sqrt()
    assert torch.all(err.gather(-1, head_ids).abs() <= 5 * sigma.gather(-1, head_ids))
    rest = torch.ones_like(p, dtype=torch.bool).scatter_(-1, head_ids, False)
    p_rest = torch.where(rest, p, 0.0).sum(-1)
    assert torch.all(torch.where(rest, err, 0.0).sum(-1).abs() <= 5 * (p_rest * (1 - p_rest) / (n * reps)).sqrt())
    assert abs(np.mean(values) - exact_kd) < 4 * np.std(values) / math.sqrt(reps) + 1e-3
    # the unbiased value needs the stored log-probs: counts alone give KL(p̂‖q), higher by H(p) − H(p̂) on average
    no_lp = at_temperature(CachedTargets("sampled", 1.0, draws.ids[:1], None, draws.counts[:1], num_samples=n,
                                         vocab_size=V), 1.0)
    assert no_lp.kl_offset is None


def test_training_batches_from_a_hidden_cache_carry_the_hidden_states_not_v_sized_targets(cached):
    cache, _ = cached
    batch, _ = next(train_batches(cache, rank=0, world_size=1, micro_batch_size=4, temperature=1.0, prefetch=0))
    assert batch.targets.hidden.shape == (4, L, TINY.hidden_size)
    logits = torch.randn(4, L, batch.targets.head.rows, requires_grad=True)
    out = distillation_loss(logits, batch.labels, batch.targets, alpha=0.5, temperature=1.0)
    out["total"].backward()
    assert torch.isfinite(out["total"]) and logits.grad.abs().sum() > 0
