"""tasks/cache/formats and targets: encode, decode, re-tempering, vocabulary restriction of every format."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cachefakes import L, V, FakeTeacher, as_dense, logits_of, make_cache, tokens_of
from raydistill.tasks.cache import formats
from raydistill.tasks.cache.encode import encode_shard, encode_targets, window_generator
from raydistill.tasks.cache.formats import format_params, get_format, sampled, topk
from raydistill.tasks.cache.sampledpack import LOGP_STEP
from raydistill.tasks.cache.targets import at_temperature, cat_targets, select_windows
from raydistill.tasks.config import CacheConfig

FORMAT_API = ("Params", "encode", "to_disk", "from_disk", "entries", "decode", "at_temperature", "restrict_vocab")


def test_every_format_module_has_the_same_functions_and_is_reachable_by_its_name():
    """A fifth format is one new module in tasks/cache/formats/: it must provide what the others provide."""
    import pkgutil

    modules = sorted(m.name for m in pkgutil.iter_modules(formats.__path__))
    assert sorted(formats.FORMATS) == modules == ["full", "hidden", "sampled", "topk"]
    for name in modules:
        module = get_format(name)
        assert module.Params.format == name
        missing = [f for f in FORMAT_API if not hasattr(module, f)]
        assert missing == [], f"formats/{name}.py lacks {missing}"
        for f in FORMAT_API[1:]:
            assert inspect.signature(getattr(module, f)).parameters.keys() == \
                inspect.signature(getattr(formats.sampled, f)).parameters.keys(), f"{name}.{f}"
    with pytest.raises(ValueError, match="unknown cache format 'dense'.*'sampled', 'topk', 'full', 'hidden'"):
        get_format("dense")


def test_every_format_takes_its_parameters_from_the_cache_config():
    cfg = CacheConfig(num_samples=20, seed=3, top_k=9, sampled_logprobs=True)
    assert format_params(cfg) == sampled.Params(num_samples=20, seed=3, logprobs=True)
    budget = format_params(CacheConfig(bytes_per_token=30))  # no fixed N: the budget picks per row, up to 255
    assert budget == sampled.Params(num_samples=255, seed=0, logprobs=False, bytes_per_token=30.0)
    assert budget.sampler == "inverse_cdf_f32"
    assert format_params(CacheConfig(format="topk", top_k=9)) == topk.Params(top_k=9)
    assert format_params(CacheConfig(format="full")) == formats.full.Params()


def test_row_j_is_the_distribution_over_token_j_plus_1(tmp_path):
    cache, tokens, *_ = make_cache(tmp_path, fmt="full")
    shard = cache.read(cache.shards("heldout")[0])
    assert torch.equal(shard.tokens, torch.tensor(tokens, dtype=torch.long))
    logits = logits_of(tokens)
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, shard.tokens[:, 1:, None]).squeeze(-1)
    assert torch.allclose(shard.teacher_nll, nll, atol=1e-5)
    assert torch.equal(shard.teacher_top1, logits.argmax(-1))
    e = cache.shards()[0]
    assert e["tokens"] == 5 * L and math.isclose(e["teacher_nll_sum"], float(nll.sum()), rel_tol=1e-5)
    assert math.isclose(cache.totals["teacher_heldout_top1_acc"],
                        (logits.argmax(-1) == shard.tokens[:, 1:]).double().mean().item())


def test_alignment_on_a_stream_the_teacher_predicts_perfectly(tmp_path):
    """Tokens generated greedily by the teacher: row j's argmax must equal token j+1 everywhere."""
    teacher, tokens = FakeTeacher(), np.zeros((3, L + 1), np.int32)
    tokens[:, 0] = [1, 2, 3]
    for j in range(L):
        tokens[:, j + 1] = teacher(torch.tensor(tokens[:, : j + 1], dtype=torch.long)).logits[:, j].argmax(-1)
    fields, stats, _ = encode_shard(teacher, tokens, "heldout", topk.Params(top_k=3), 1.0, 2, "k")
    assert stats["teacher_top1_correct"] == 3 * L
    assert np.array_equal(fields["ids"][:, 0], tokens[:, 1:].reshape(-1))
    assert np.array_equal(fields["teacher_top1"], tokens[:, 1:].reshape(-1))


@pytest.mark.parametrize("fmt", ["sampled", "topk", "full"])
def test_round_trip(tmp_path, fmt):
    cache, tokens, *_ = make_cache(tmp_path, fmt=fmt, top_k=7)
    shard = cache.read(cache.shards()[0])
    t = shard.targets()
    lp = torch.log_softmax(logits_of(tokens), -1)
    if fmt == "full":
        assert torch.allclose(t.logprobs, lp.half().float())
    elif fmt == "topk":
        vals, ids = lp.topk(7, -1)
        assert torch.equal(t.ids, ids) and torch.allclose(t.logprobs, vals.half().float())
        assert torch.allclose(t.tail_logmass, topk.tail_logmass(vals, V), atol=1e-6)
    else:
        valid = t.counts > 0
        assert torch.all(t.counts.sum(-1) == 50)
        err = (t.logprobs[valid] - lp.gather(-1, t.ids)[valid]).abs().max()
        assert err <= LOGP_STEP / 2 + 1e-5  # quantised to LOGP_STEP
        assert torch.all(valid[..., :-1] | ~valid[..., 1:])  # padding only at the end
        assert all(len(set(row[m].tolist())) == int(m.sum()) for row, m in zip(t.ids.view(-1, t.ids.shape[-1]),
                                                                         valid.view(-1, valid.shape[-1])))
    part = shard.targets(slice(1, 3))
    assert torch.equal(part.logprobs, t.logprobs[1:3, :, : part.logprobs.shape[-1]])
    assert shard.teacher_nll.shape == (5, L)


def test_sampled_reruns_draw_the_same_and_are_unbiased():
    # seeded: with the global RNG, a 5-sigma bound over every entry of 3 x V estimates failed for some test orders
    logits = torch.randn(1, 3, V, generator=torch.Generator().manual_seed(0)) * 2
    p = torch.softmax(logits[0], -1)
    a = sampled.encode(logits, sampled.Params(16), 1.0, [window_generator("k", 0)])
    b = sampled.encode(logits, sampled.Params(16), 1.0, [window_generator("k", 0)])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    reps = 800  # mean of counts/N over independent draws → teacher distribution
    fields = sampled.encode(logits.expand(reps, -1, -1), sampled.Params(64), 1.0, [window_generator("k", i) for i in range(reps)])
    rows = np.repeat(np.arange(reps * 3), fields["row_len"].astype(np.int64)) % 3
    est = np.zeros((3, V))
    np.add.at(est, (rows, fields["ids"]), fields["counts"] / 64 / reps)
    sigma = np.sqrt(p.numpy() * (1 - p.numpy()) / (64 * reps))
    assert np.all(np.abs(est - p.numpy()) <= 5 * sigma + 1e-9)


def test_sampled_retempering():
    """At T_c the sparse targets are exactly count/N; at T≠T_c the self-normalised importance weights
    count·p^(1/T − 1/T_c), averaged over independent draws, approach softmax(z/T) (bias O(1/N))."""
    logits = torch.randn(1, 2, V) * 1.5
    reps, n = 800, 64
    fields = sampled.encode(logits.expand(reps, -1, -1), sampled.Params(n), 1.0, [window_generator("r", i) for i in range(reps)])
    cached = sampled.decode(fields, slice(0, reps * 2), 2, sampled.Params(n), 1.0, None)
    same = at_temperature(cached, 1.0)
    assert torch.equal(same.probs, cached.counts / n) and torch.all(same.tail == 0)
    for T in (0.5, 2.0):
        est = as_dense(at_temperature(cached, T)).mean(0)  # [2, V]
        target = torch.softmax(logits[0] / T, -1)
        assert torch.allclose(est.sum(-1), torch.ones(2))
        assert (est - target).abs().sum(-1).max() < 0.08
        assert (est - target).abs().sum(-1).max() < (as_dense(same).mean(0) - target).abs().sum(-1).max() / 3


def test_sampled_without_logprobs_gives_targets_only_at_the_cache_temperature(tmp_path):
    with_lp, *_ = make_cache(tmp_path / "a", num_samples=50)
    without, *_ = make_cache(tmp_path / "b", num_samples=50, sampled_logprobs=False)
    assert without.manifest["params"]["logprobs"] is False
    assert without.shards()[0]["bytes"] < with_lp.shards()[0]["bytes"]
    t = without.read(without.shards()[0]).targets()
    assert t.logprobs is None and torch.equal(at_temperature(t, 1.0).probs, t.counts / 50)
    with pytest.raises(ValueError, match="stores no log-probs"):
        at_temperature(t, 2.0)


@pytest.mark.parametrize("cache_t", [1.0, 2.0])
def test_topk_with_k_equal_v_is_full_and_full_retempers_exactly(tmp_path, cache_t):
    full_cache, tokens, *_ = make_cache(tmp_path / "f", fmt="full", temperature=cache_t)
    topk_cache, *_ = make_cache(tmp_path / "k", fmt="topk", top_k=V, temperature=cache_t)
    tf, tk = full_cache.read(full_cache.shards()[0]).targets(), topk_cache.read(topk_cache.shards()[0]).targets()
    for T in (cache_t, 0.5, 1.0, 3.0):
        dense, sparse = at_temperature(tf, T), at_temperature(tk, T)
        assert torch.all(sparse.tail == 0)
        assert torch.allclose(as_dense(sparse), dense.logprobs.exp(), atol=1e-6)
        assert torch.allclose(dense.logprobs.exp(), torch.softmax(logits_of(tokens) / T, -1), atol=2e-3)
    assert torch.allclose(at_temperature(tf, cache_t).logprobs, tf.logprobs, atol=1e-3)  # identity at T_c


def test_topk_tail_mass_is_exact_and_retempering_is_identity_at_cache_temperature(tmp_path):
    cache, tokens, *_ = make_cache(tmp_path, fmt="topk", top_k=5, temperature=1.5)
    t = cache.read(cache.shards()[0]).targets()
    p = torch.softmax(logits_of(tokens).double() / 1.5, -1)
    top = p.topk(5, -1).values.sum(-1)
    assert torch.allclose(t.tail_logmass.double().exp(), 1 - top, rtol=1e-5)
    same = at_temperature(t, 1.5)
    assert torch.allclose(same.probs, t.logprobs.exp(), atol=2e-3)
    assert torch.allclose(same.tail, t.tail_logmass.exp(), atol=2e-3)
    assert torch.allclose(same.probs.sum(-1) + same.tail, torch.ones(5, L), atol=1e-6)
    lse = torch.tensor([[-1e-9, 0.0, 1e-7]]).log_softmax(-1) * 0  # logsumexp ≈ 0 must not produce NaN
    assert not torch.isnan(topk.tail_logmass(lse, 10)).any()


@pytest.mark.parametrize("T", [0.5, 2.0, 4.0])
def test_topk_retempered_tail_lies_between_its_bounds(tmp_path, T):
    """True tail mass at T is bracketed by 'tail tokens as likely as the k-th' and 'tail spread evenly'."""
    cache, tokens, *_ = make_cache(tmp_path, fmt="topk", top_k=5)
    t = cache.read(cache.shards()[0]).targets()
    assert t.vocab_size == V
    tail = at_temperature(t, T).tail
    p = torch.softmax(logits_of(tokens) / T, -1)
    true = 1 - p.gather(-1, t.ids).sum(-1)

    def bound(cls_tail):
        return torch.softmax(torch.cat([t.logprobs / T, cls_tail.unsqueeze(-1)], -1), -1)[..., -1]

    near = bound(t.tail_logmass + (1 / T - 1) * t.logprobs[..., -1])
    spread = bound(t.tail_logmass / T + (1 - 1 / T) * math.log(V - 5))
    lo, hi = torch.minimum(near, spread), torch.maximum(near, spread)
    assert torch.all((lo - 1e-6 <= tail) & (tail <= hi + 1e-6))
    assert torch.all((lo - 2e-3 <= true) & (true <= hi + 2e-3))  # the bounds really bound the truth


def test_cat_targets_pads_to_the_largest_k(tmp_path):
    cache, *_ = make_cache(tmp_path)
    t = cache.read(cache.shards()[0]).targets()
    a, b = cache.read(cache.shards()[0]).targets(slice(0, 1)), cache.read(cache.shards()[0]).targets(slice(1, 5))
    both = cat_targets([a, b])
    assert both.ids.shape[:2] == (5, L) and both.ids.shape[2] == t.ids.shape[2]
    assert torch.allclose(at_temperature(both, 1.0).probs.sum(-1), torch.ones(5, L))
    assert torch.allclose(as_dense(at_temperature(both, 2.0)), as_dense(at_temperature(t, 2.0)))


@pytest.mark.parametrize("fmt", ["sampled", "topk", "full"])
def test_encode_targets_gives_what_the_cache_gives_back(tmp_path, fmt):
    """The in-memory round trip the benchmarks use equals a stored shard's targets (sampled log-probs: the
    shard keeps them to LOGP_STEP/2), window by window."""
    cache, tokens, *_ = make_cache(tmp_path, fmt=fmt, top_k=7)
    entry = cache.shards()[0]
    stored = cache.read(entry).targets()
    gens = [window_generator(entry["key"], w) for w in range(tokens.shape[0])]
    params = format_params(CacheConfig(format=fmt, num_samples=50, top_k=7, sampled_logprobs=True))
    mine = encode_targets(logits_of(tokens), params, generators=gens)
    assert mine.format == fmt and mine.vocab_size == V and mine.cache_temperature == 1.0
    if fmt == "sampled":
        assert mine.num_samples == 50
        assert torch.equal(mine.counts.sum(-1), stored.counts.sum(-1))
        # stored rows list ids in rank order, encode_targets by id: compare as dense counts and log-probs
        dense = [torch.zeros(*t.ids.shape[:-1], V).scatter_add(-1, t.ids, t.counts) for t in (mine, stored)]
        assert torch.equal(*dense)
        lp = [torch.zeros(*t.ids.shape[:-1], V).scatter(-1, t.ids, torch.where(t.counts > 0, t.logprobs, 0.0))
              for t in (mine, stored)]
        assert (lp[0] - lp[1]).abs().max() <= LOGP_STEP / 2 + 1e-5
    elif fmt == "topk":
        assert torch.equal(mine.ids, stored.ids) and torch.equal(mine.logprobs, stored.logprobs)
        assert torch.equal(mine.tail_logmass, stored.tail_logmass)
    else:
        assert torch.equal(mine.logprobs, stored.logprobs)
    one = select_windows(mine, 3)
    assert torch.equal(one.logprobs, mine.logprobs[3:4]) and one.format == fmt and one.vocab_size == V


def test_encode_targets_rejects_bad_input():
    logits = logits_of(tokens_of())
    with pytest.raises(ValueError, match="unknown cache format 'dense'"):
        encode_targets(logits, SimpleNamespace(format="dense"))
    with pytest.raises(TypeError, match="num_samples"):  # the typed parameters need their fields
        encode_targets(logits, sampled.Params())
    with pytest.raises(TypeError, match="top_k"):
        encode_targets(logits, topk.Params())
    with pytest.raises(ValueError, match="2 generators for 5 windows"):
        encode_targets(logits, sampled.Params(8), generators=[window_generator("k", 0)] * 2)


def test_encode_shard_refuses_an_unknown_format_before_any_forward():
    class Refuses(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            raise AssertionError("the teacher ran")

    with pytest.raises(ValueError, match="unknown cache format 'dense'"):
        encode_shard(Refuses(), tokens_of(), "train", SimpleNamespace(format="dense"), 1.0, 2, "k")
