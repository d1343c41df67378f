"""tasks/cache/draws: the device sampler's draws do not depend on batching, match the teacher's softmax (a test
that fails on a biased sampler), and a byte budget picks per-row draws without biasing them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cachefakes import L, V, FakeTeacher, make_cache, tokens_of
from raydistill.tasks.cache import draws
from raydistill.tasks.cache.encode import encode_shard, window_generator
from raydistill.tasks.cache.formats import sampled
from raydistill.tasks.device import cpu_has_bf16, resolve_dtype


def _chi2_z(observed: np.ndarray, p: np.ndarray) -> float:
    """Goodness of fit of pooled draw counts to probabilities ``p`` (bins with expectation < 5 merged): the
    Wilson–Hilferty normal score of Pearson's χ² (≈ N(0, 1) under the null; large when the draws are biased)."""
    expected = p * observed.sum()
    order = np.argsort(expected)
    obs, exp = observed[order], expected[order]
    small = np.cumsum(exp) < 5.0  # the rarest bins, merged into one
    obs = np.concatenate([[obs[small].sum()], obs[~small]]) if small.any() else obs
    exp = np.concatenate([[exp[small].sum()], exp[~small]]) if small.any() else exp
    x2, df = float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1
    return ((x2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def _pooled(ids: torch.Tensor, vocab: int) -> np.ndarray:
    return np.bincount(ids[ids < vocab].reshape(-1).numpy(), minlength=vocab).astype(np.float64)


def _first_of_sorted(cdf: torch.Tensor, n: int, gens) -> torch.Tensor:
    """A biased sampler (the mistake the budget path must not make): the smallest n of 255 sorted uniforms."""
    u, _ = draws.window_uniforms(gens, cdf.shape[1], draws.MAX_DRAWS)
    return draws.lookup(cdf, u.sort(-1).values[..., :n])


def test_the_draws_match_the_softmax_and_the_test_catches_a_biased_sampler():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, 300, generator=g) * 2.5  # one row, a spread-out distribution
    p = torch.softmax(logits[0, 0].double(), -1).numpy()
    windows, n = 400, 16
    x = logits.expand(windows, 1, 300).contiguous()
    w, _, _ = draws.row_weights(x.clone(), 1.0)
    cdf = torch.cumsum(w, -1)
    gens = [window_generator("chi2", i) for i in range(windows)]
    u, _ = draws.window_uniforms(gens, 1, n)
    ours = _pooled(draws.lookup(cdf, u.sort(-1).values), 300)
    assert abs(_chi2_z(ours, p)) < 4.0
    biased = _pooled(_first_of_sorted(cdf, n, [window_generator("chi2", i) for i in range(windows)]), 300)
    assert _chi2_z(biased, p) > 20.0
    squared = _pooled(draws.lookup(torch.cumsum(w * w, -1), u.sort(-1).values), 300)  # softmax(2x), not softmax(x)
    assert _chi2_z(squared, p) > 20.0
    # at T = 2 the draws follow softmax(x / 2)
    w2, _, _ = draws.row_weights(x.clone(), 2.0)
    p2 = torch.softmax(logits[0, 0].double() / 2, -1).numpy()
    assert abs(_chi2_z(_pooled(draws.lookup(torch.cumsum(w2, -1), u.sort(-1).values), 300), p2)) < 4.0


@pytest.mark.parametrize("budget", [None, 14.0])
def test_the_same_draws_for_any_batch_size(budget):
    params = sampled.Params(num_samples=32, logprobs=True) if budget is None else \
        sampled.Params(num_samples=255, logprobs=True, bytes_per_token=budget)
    tokens = tokens_of(seed=3, windows=5)
    runs = [encode_shard(FakeTeacher(), tokens, "heldout", params, 1.0, b, "key")[0] for b in (1, 2, 5)]
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for k in runs[0]:
            assert np.array_equal(runs[0][k], other[k]), k
    if budget is not None:
        assert set(np.unique(runs[0]["n_draws"])) <= set(draws.N_GRID)
        assert len(np.unique(runs[0]["n_draws"])) > 1  # rows differ in what their draws cost


def test_a_budget_keeps_the_counts_unbiased_and_gives_a_sure_row_one_draw():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 4, V, generator=g) * torch.tensor([0.5, 1.5, 3.0, 0.0])[None, :, None]
    logits[0, 3, 7] = 80.0  # the teacher is sure: one id whatever the draws, its variance is 0
    params = sampled.Params(num_samples=255, logprobs=False, bytes_per_token=draws.FIXED_BYTES + 6.0)
    reps = 600
    fields = sampled.encode(logits.expand(reps, -1, -1), params, 1.0, [window_generator("b", i) for i in range(reps)])
    n = fields["n_draws"].astype(np.int64).reshape(reps, 4)
    assert np.all(n[:, 3] == 1) and n[:, :3].min() > 1
    rows = np.repeat(np.arange(reps * 4), fields["row_len"].astype(np.int64))
    share = fields["counts"] / n.reshape(-1)[rows]
    est = np.zeros((4, V))
    np.add.at(est, (rows % 4, fields["ids"]), share / reps)
    p = torch.softmax(logits[0].double(), -1).numpy()
    # count/n_r has variance ≤ p(1−p)/n_min per window
    sigma = np.sqrt(p * (1 - p) / (n.min() * reps))
    assert np.all(np.abs(est - p) <= 5 * sigma + 1e-9)


def test_budget_draws_meet_the_modelled_budget_per_window():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 64, 500, generator=g) * torch.linspace(0.2, 4.0, 64)[None, :, None]
    w, _, _ = draws.row_weights(logits.clone(), 1.0)
    var = 1.0 - draws.collision(w)
    _, pilot = draws.window_uniforms([window_generator("p", i) for i in range(3)], 64, 1, draws.PILOT)
    distinct = draws.distinct_prefix(draws.lookup(torch.cumsum(w, -1), pilot))
    assert torch.equal(distinct[..., -1], torch.tensor([[len(set(r.tolist())) for r in win]
                                                        for win in draws.lookup(torch.cumsum(w, -1), pilot)]))
    for budget in (3.0, 10.0, 40.0):
        n = draws.budget_draws(var, distinct, budget)
        spent = (distinct.gather(-1, n.unsqueeze(-1) - 1).squeeze(-1).float() * draws.ENTRY_BYTES).sum(-1)
        assert torch.equal(n, draws.budget_draws(var, distinct, budget, torch.full((3,), draws.ENTRY_BYTES)))
        assert torch.all(spent <= budget * 64 + 1e-3)
        assert spent.min() > 0.8 * budget * 64  # the budget is spent, not left unused
    many, few = draws.budget_draws(var, distinct, 40.0), draws.budget_draws(var, distinct, 3.0)
    assert torch.all(many >= few) and many.float().mean() > few.float().mean()


def test_a_budget_cache_round_trips_through_the_store(tmp_path):
    cache, tokens, *_ = make_cache(tmp_path, num_samples=None, bytes_per_token=20.0)
    shard = cache.read(cache.shards()[0])
    t = shard.targets()
    n = t.counts.sum(-1)
    assert set(n.unique().long().tolist()) <= set(draws.N_GRID)
    probs = sampled.at_temperature(t, 1.0).probs
    assert torch.allclose(probs.sum(-1), torch.ones_like(n))


def test_native_bf16_cpus_are_recognised_and_only_the_teacher_gets_bf16_there(monkeypatch):
    assert cpu_has_bf16("processor : 0\nflags : fpu sse avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_bf16("Features : fp asimd bf16 i8mm\n")
    assert not cpu_has_bf16("flags : fpu sse avx2 avx512f\n")
    monkeypatch.setattr("raydistill.tasks.device._CPU_BF16", [True])
    assert resolve_dtype("auto", "cpu", "teacher.dtype", cpu_bf16=True) == "bfloat16"
    assert resolve_dtype("auto", "cpu", "train.dtype") == "float32"  # training keeps fp32 on CPUs
    monkeypatch.setattr("raydistill.tasks.device._CPU_BF16", [False])
    assert resolve_dtype("auto", "cpu", "teacher.dtype", cpu_bf16=True) == "float32"
    assert resolve_dtype("auto", "cuda", "teacher.dtype", cpu_bf16=True) == "bfloat16"


def test_ids_the_coder_ranks_poorly_are_modelled_as_costlier_entries():
    """A window whose rows draw from a few shared ids codes them cheaply; one whose rows each draw other ids does
    not: entry_bytes follows the id entropy of the pilot draws."""
    shared = torch.randint(0, 8, (1, 32, 64), generator=torch.Generator().manual_seed(0))
    spread = torch.arange(32 * 64).reshape(1, 32, 64)  # every draw another id
    cheap, dear = draws.entry_bytes(shared, 4096), draws.entry_bytes(spread, 4096)
    assert cheap.shape == (1,) and float(cheap) < float(dear) <= 2.5
