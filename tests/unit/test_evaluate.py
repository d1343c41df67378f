"""Held-out metrics against hand computations on a bigram model with known logits."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from raydistill.tasks.cache.targets import CachedTargets
from raydistill.tasks.evaluate import evaluate, evaluate_sums, finalize

V, L = 11, 6


class Bigram(torch.nn.Module):
    """logits[b, j] = table[input_ids[b, j]]: every number below can be computed by hand."""

    def __init__(self, seed=0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 2)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def _shard(seed, model, windows=4, teacher_logits=None, fmt="full", temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (windows, L + 1), generator=g)
    t_logits = teacher_logits(tokens[:, :-1]) if teacher_logits else torch.randn(windows, L, V, generator=g)

    def targets(sl):
        lp = F.log_softmax(t_logits[sl] / temperature, -1)
        if fmt == "full":
            return CachedTargets("full", temperature, None, lp)
        vals, ids = lp.topk(3, -1)
        tail = torch.log(-torch.expm1(torch.logsumexp(vals, -1)))
        return CachedTargets("topk", temperature, ids, vals, tail_logmass=tail)

    return SimpleNamespace(tokens=tokens, teacher_top1=t_logits.argmax(-1), targets=targets, t_logits=t_logits)


def test_loss_perplexity_agreement_and_kl_by_hand():
    model = Bigram()
    shards = [_shard(s, model) for s in (1, 2)]
    m = evaluate(model, shards, batch_size=3)
    tokens = torch.cat([s.tokens for s in shards])
    logits = model.table[tokens[:, :-1]].detach()
    ce = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1)).item()
    t_logits = torch.cat([s.t_logits for s in shards])
    agree = (logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                  reduction="none").sum(-1).mean().item()
    assert m["tokens"] == 8 * L
    assert m["heldout_loss"] == pytest.approx(ce, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert m["top1_agreement"] == pytest.approx(agree)
    assert 0.0 < agree < 1.0  # a real check, not a degenerate 0 or 1
    assert m["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    assert m["tokens_per_s"] > 0


def test_student_equal_to_teacher_has_zero_kl_and_full_agreement():
    model = Bigram()
    teacher = lambda ids: model.table[ids].detach()  # noqa: E731
    for fmt, temperature in (("full", 1.0), ("full", 2.0), ("topk", 1.0)):
        m = evaluate(model, [_shard(3, model, teacher_logits=teacher, fmt=fmt, temperature=temperature)])
        assert m["top1_agreement"] == 1.0
        assert m["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5), (fmt, temperature)
    other = evaluate(model, [_shard(3, model, teacher_logits=lambda ids: Bigram(seed=5).table[ids].detach(),
                                    fmt="topk")])
    assert other["kl_to_teacher"] > 0.01


def test_ece_by_hand():
    model = Bigram()
    shard = _shard(4, model, windows=5)
    m = evaluate(model, [shard])
    probs = F.softmax(model.table[shard.tokens[:, :-1]].detach(), -1).reshape(-1, V)
    labels = shard.tokens[:, 1:].reshape(-1)
    conf, pred = probs.max(-1)
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        in_bin = (conf >= lo) & ((conf < hi) if b < 14 else (conf <= hi))
        if in_bin.any():
            ece += in_bin.float().mean() * ((pred[in_bin] == labels[in_bin]).float().mean() - conf[in_bin].mean()).abs()
    assert m["ece"] == pytest.approx(float(ece), abs=1e-6)
    assert m["ece"] > 0.01


def test_max_windows_missing_teacher_fields_and_empty_input():
    model = Bigram()
    bare = SimpleNamespace(tokens=torch.randint(0, V, (7, L + 1)))
    m = evaluate(model, [bare], max_windows=5, batch_size=2)
    assert m["tokens"] == 5 * L
    assert m["top1_agreement"] is None and m["kl_to_teacher"] is None
    no_kl = evaluate(model, [_shard(1, model)], teacher_targets=False)
    assert no_kl["kl_to_teacher"] is None and no_kl["top1_agreement"] is not None
    with pytest.raises(ValueError, match="no held-out windows"):
        evaluate(model, [])


def test_sums_from_disjoint_parts_add_up_to_the_whole():
    model = Bigram()
    shards = [_shard(s, model) for s in (1, 2, 3)]
    whole = evaluate(model, shards)
    parts = finalize(evaluate_sums(model, shards[:1]) + evaluate_sums(model, shards[1:]))
    for k in ("heldout_loss", "top1_agreement", "ece", "kl_to_teacher", "tokens"):
        assert parts[k] == pytest.approx(whole[k], rel=1e-9), k


def test_evaluate_restores_training_mode():
    model = Bigram().train()
    evaluate(model, [_shard(1, model)])
    assert model.training

