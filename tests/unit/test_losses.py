"""KD losses against F.kl_div, hand-computed values and each other (dense vs sparse, chunked vs not)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from raydistill.tasks.losses import LOSSES, distillation_loss, divergence, hidden_state_loss, sparse_buckets


def dense(logprobs):
    return SimpleNamespace(logprobs=logprobs)


def sparse(ids, probs, tail):
    return SimpleNamespace(ids=ids, probs=probs, tail=tail)


def _logps(n=6, v=11, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (F.log_softmax(torch.randn(n, v, generator=g) * scale, -1),
            F.log_softmax(torch.randn(n, v, generator=g) * scale, -1))


def _full_as_sparse(log_p, pad_slots=0, seed=0):
    """Every vocabulary id stored (K = V, shuffled), plus ``pad_slots`` zero-probability slots repeating id 0."""
    n, v = log_p.shape
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(v, generator=g) for _ in range(n)])
    probs = log_p.exp().gather(-1, ids)
    if pad_slots:
        ids = torch.cat([ids, torch.zeros(n, pad_slots, dtype=torch.long)], -1)
        probs = torch.cat([probs, torch.zeros(n, pad_slots)], -1)
    return ids, probs, torch.zeros(n)


@pytest.mark.parametrize("loss", LOSSES)
def test_identical_distributions_give_zero(loss):
    log_p, _ = _logps()
    assert torch.allclose(divergence(log_p, log_p, loss), torch.zeros(len(log_p)), atol=1e-6)
    lp_s, lq_s = sparse_buckets(log_p, *_full_as_sparse(log_p, pad_slots=2))
    assert torch.allclose(divergence(lp_s, lq_s, loss), torch.zeros(len(log_p)), atol=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
def test_different_distributions_give_positive(loss):
    log_p, log_q = _logps()
    assert (divergence(log_p, log_q, loss) > 1e-3).all()


def test_forward_and_reverse_kl_match_f_kl_div():
    log_p, log_q = _logps()
    fwd = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    rev = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    assert torch.allclose(divergence(log_p, log_q, "forward_kl"), fwd, atol=1e-6)
    assert torch.allclose(divergence(log_p, log_q, "reverse_kl"), rev, atol=1e-6)
    assert not torch.allclose(fwd, rev, atol=1e-3)  # the two directions really differ on these inputs


def test_jsd_beta_limits_and_symmetry():
    log_p, log_q = _logps()
    fwd, rev = divergence(log_p, log_q, "forward_kl"), divergence(log_p, log_q, "reverse_kl")
    assert torch.allclose(divergence(log_p, log_q, "jsd", beta=0.0), fwd)
    assert torch.allclose(divergence(log_p, log_q, "jsd", beta=1.0), rev)
    eps = 1e-4  # the mixture formula vanishes at the ends; its slopes there are the two KLs
    assert torch.allclose(divergence(log_p, log_q, "jsd", beta=eps) / eps, fwd, rtol=2e-2)
    assert torch.allclose(divergence(log_p, log_q, "jsd", beta=1 - eps) / eps, rev, rtol=2e-2)
    half = divergence(log_p, log_q, "jsd", beta=0.5)
    assert torch.allclose(half, divergence(log_q, log_p, "jsd", beta=0.5), atol=1e-6)
    assert (half <= math.log(2) + 1e-6).all()


def test_hand_computed_values():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    lp, lq = p.log(), q.log()
    m = 0.5 * (p + q)
    jsd = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    m_skew = 0.1 * p + 0.9 * q
    m_rskew = 0.9 * p + 0.1 * q
    expected = {
        "forward_kl": 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1),
        "reverse_kl": 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5),
        "jsd": float(jsd),
        "skew_kl": float((p * (p / m_skew).log()).sum()),
        "skew_reverse_kl": float((q * (q / m_rskew).log()).sum()),
        "tvd": 0.4,
    }
    for loss, value in expected.items():
        got = divergence(lp, lq, loss, beta=0.5, skew=0.1)
        assert got.item() == pytest.approx(value, rel=1e-5), loss


def test_skew_limits():
    log_p, log_q = _logps()
    assert torch.allclose(divergence(log_p, log_q, "skew_kl", skew=0.0), divergence(log_p, log_q, "forward_kl"))
    assert torch.allclose(divergence(log_p, log_q, "skew_reverse_kl", skew=0.0),
                          divergence(log_p, log_q, "reverse_kl"))
    assert torch.allclose(divergence(log_p, log_q, "skew_kl", skew=1.0), torch.zeros(len(log_p)))
    # skewing makes the divergence smaller than the plain KL
    assert (divergence(log_p, log_q, "skew_kl", skew=0.3) < divergence(log_p, log_q, "forward_kl")).all()


@pytest.mark.parametrize("loss", LOSSES)
def test_sparse_with_all_ids_equals_dense(loss):
    log_p, log_q = _logps()
    want = divergence(log_p, log_q, loss, beta=0.3, skew=0.2)
    lp_s, lq_s = sparse_buckets(log_q, *_full_as_sparse(log_p, pad_slots=3))
    assert torch.allclose(divergence(lp_s, lq_s, loss, beta=0.3, skew=0.2), want, atol=1e-5)


def test_sparse_tail_bucket_hand_computed():
    # teacher stores id 0 (p=.5) and puts .5 on the rest; student q = [.2, .3, .5] → coarsened [.2, .8]
    log_q = torch.tensor([[0.2, 0.3, 0.5]]).log()
    log_p, log_q = sparse_buckets(log_q, torch.tensor([[0, 2]]), torch.tensor([[0.5, 0.0]]), torch.tensor([0.5]))
    kl = divergence(log_p, log_q, "forward_kl").item()
    assert kl == pytest.approx(0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8), rel=1e-5)


def test_small_student_tail_is_summed_exactly():
    # the student puts 1e-6 outside the stored ids: 1 − Σ q would lose it to float32 rounding
    q = torch.tensor([[0.6, 0.4 - 1e-6, 0.5e-6, 0.5e-6]], dtype=torch.float64)
    log_p, log_q = sparse_buckets(q.log().float(), torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.4]]),
                                  torch.tensor([0.1]))
    assert log_q[0, -1].exp().item() == pytest.approx(1e-6, rel=1e-3)


def test_sampled_targets_give_unbiased_forward_kl_gradient():
    torch.manual_seed(0)
    v, n_draws, reps = 7, 20, 4000
    p = F.softmax(torch.randn(v) * 1.5, -1)
    logits = torch.randn(1, v, requires_grad=True)
    exact = torch.autograd.grad(divergence(p.log()[None], F.log_softmax(logits, -1)).sum(), logits)[0]
    counts = torch.distributions.Multinomial(n_draws, probs=p).sample((reps,))  # (reps, V)
    ids = torch.arange(v).expand(reps, v)
    lp, lq = sparse_buckets(F.log_softmax(logits, -1).expand(reps, v), ids, counts / n_draws, torch.zeros(reps))
    mean_grad = torch.autograd.grad(divergence(lp, lq).mean(), logits)[0]
    assert torch.allclose(mean_grad, exact, atol=0.01)


def _batch(b=2, l=5, v=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, l, v, generator=g) * 2
    labels = torch.randint(0, v, (b, l), generator=g)
    teacher = F.log_softmax(torch.randn(b, l, v, generator=g) * 2, -1)
    return logits, labels, teacher


def test_temperature_squared_scaling_and_alpha():
    logits, labels, teacher = _batch()
    t = 3.0
    out = distillation_loss(logits, labels, dense(teacher), alpha=0.0, temperature=t)
    kd = F.kl_div(F.log_softmax(logits / t, -1), teacher, reduction="none", log_target=True).sum(-1).mean()
    assert out["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert out["total"].item() == pytest.approx(t * t * kd.item(), rel=1e-5)
    ce_only = distillation_loss(logits, labels, dense(teacher), alpha=1.0, temperature=t)
    assert ce_only["total"].item() == pytest.approx(F.cross_entropy(logits.reshape(-1, 13), labels.reshape(-1)).item(),
                                                    rel=1e-5)
    mix = distillation_loss(logits, labels, dense(teacher), alpha=0.25, temperature=t)
    assert mix["total"].item() == pytest.approx(0.25 * ce_only["ce"].item() + 0.75 * t * t * kd.item(), rel=1e-5)


def test_padding_tokens_are_ignored():
    logits, labels, teacher = _batch()
    labels[0, 3:] = -100
    out = distillation_loss(logits, labels, dense(teacher), alpha=0.5, temperature=2.0)
    assert out["tokens"].item() == 8
    changed = logits.clone()
    changed[0, 3:] = torch.randn_like(changed[0, 3:]) * 10
    again = distillation_loss(changed, labels, dense(teacher), alpha=0.5, temperature=2.0)
    assert again["total"].item() == pytest.approx(out["total"].item(), rel=1e-6)
    keep = labels != -100
    subset = distillation_loss(logits[keep][None], labels[keep][None], dense(teacher[keep][None]), alpha=0.5,
                               temperature=2.0)
    assert subset["total"].item() == pytest.approx(out["total"].item(), rel=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_chunked_equals_unchunked_values_and_gradients(loss):
    logits, labels, teacher = _batch()
    ids, probs, tail = _full_as_sparse(teacher.reshape(-1, 13)[:, :], pad_slots=1)
    probs[:, :4] = 0.0  # drop some ids into the tail bucket
    tail = 1 - probs.sum(-1)
    targets = sparse(ids.reshape(2, 5, -1), probs.reshape(2, 5, -1), tail.reshape(2, 5))
    grads = []
    for chunk in (3, 10_000):
        x = logits.clone().requires_grad_(True)
        out = distillation_loss(x, labels, targets, alpha=0.3, temperature=2.0, loss=loss, chunk_tokens=chunk)
        out["total"].backward()
        assert torch.isfinite(x.grad).all()
        grads.append((out["total"].detach(), x.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_sampled_targets_with_empty_tail_have_finite_reverse_kl_gradients():
    logits, labels, _ = _batch()
    ids = torch.randint(0, 13, (2, 5, 3))
    ids[..., 1] = (ids[..., 0] + 1) % 13
    ids[..., 2] = (ids[..., 0] + 2) % 13
    probs = torch.tensor([0.75, 0.25, 0.0]).expand(2, 5, 3)  # last slot is padding
    for loss in LOSSES:
        x = logits.clone().requires_grad_(True)
        out = distillation_loss(x, labels, sparse(ids, probs, torch.zeros(2, 5)), alpha=0.0, temperature=1.0,
                                loss=loss)
        out["total"].backward()
        assert torch.isfinite(out["total"]) and torch.isfinite(x.grad).all(), loss


def test_teacher_vocabulary_smaller_than_padded_student_vocabulary():
    logits, labels, teacher = _batch()
    short = teacher[..., :11] - torch.logsumexp(teacher[..., :11], -1, keepdim=True)
    padded = torch.cat([short, torch.full((2, 5, 2), -math.inf)], -1)
    a = distillation_loss(logits, labels, dense(short), alpha=0.0, temperature=1.0)
    b = distillation_loss(logits, labels, dense(padded), alpha=0.0, temperature=1.0)
    assert a["total"].item() == pytest.approx(b["total"].item(), rel=1e-6)


def test_bad_input_raises_clear_errors():
    logits, labels, teacher = _batch()
    with pytest.raises(ValueError, match="unknown KD loss"):
        distillation_loss(logits, labels, dense(teacher), alpha=0.5, temperature=1.0, loss="kl")
    with pytest.raises(ValueError, match="larger than the student"):
        distillation_loss(logits[..., :5], labels.clamp(max=4), dense(teacher), alpha=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="ids must be in"):
        distillation_loss(logits, labels, sparse(torch.full((2, 5, 1), 13), torch.ones(2, 5, 1), torch.zeros(2, 5)),
                          alpha=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="disagree"):
        distillation_loss(logits, labels[:, :4], dense(teacher), alpha=0.5, temperature=1.0)
    with pytest.raises(TypeError, match="SparseTargets"):
        distillation_loss(logits, labels, object(), alpha=0.5, temperature=1.0)


def _heads(n, d_in, d_out, identity=True, seed=0):
    torch.manual_seed(seed)
    heads = torch.nn.ModuleList(torch.nn.Linear(d_in, d_out, bias=False) for _ in range(n))
    if identity:
        with torch.no_grad():
            for h in heads:
                h.weight.copy_(torch.eye(d_out, d_in))
    return heads


def test_hidden_mse_is_zero_for_identical_states_and_matches_a_hand_computed_value():
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 5, 8, generator=g) for _ in range(2)]
    assert hidden_state_loss(states, states, _heads(2, 8, 8), "mse").item() == 0.0
    shifted = [s + 0.5 for s in states]  # every element off by 0.5 → MSE 0.25 on each pair
    assert hidden_state_loss(states, shifted, _heads(2, 8, 8), "mse").item() == pytest.approx(0.25, rel=1e-6)
    heads = _heads(2, 8, 8, identity=False)
    want = torch.stack([F.mse_loss(h(s), t) for h, s, t in zip(heads, states, shifted)]).mean()
    assert hidden_state_loss(states, shifted, heads, "mse").item() == pytest.approx(want.item(), rel=1e-6)


def test_hidden_cosine_is_bounded_zero_when_aligned_and_two_when_opposite():
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(3, 4, 6, generator=g)]
    heads = _heads(1, 6, 6)
    assert hidden_state_loss(s, [3.0 * s[0]], heads, "cosine").item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert hidden_state_loss(s, [-s[0]], heads, "cosine").item() == pytest.approx(2.0, abs=1e-6)
    value = hidden_state_loss(s, [torch.randn(3, 4, 6, generator=g)], heads, "cosine").item()
    assert 0.0 < value < 2.0


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_gradient_reaches_the_projection_and_the_student_not_the_teacher(kind):
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, 7, generator=g)
    heads = _heads(1, 4, 7, identity=False)
    hidden_state_loss([student], [teacher], heads, kind).backward()
    assert heads[0].weight.grad is not None and heads[0].weight.grad.abs().sum() > 0
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_hidden_loss_mask_and_bad_input():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(1, 4, 3, generator=g), torch.randn(1, 4, 3, generator=g)
    t_changed = t.clone()
    t_changed[0, 2:] += 100.0  # only masked-out tokens change
    mask = torch.tensor([[True, True, False, False]])
    a = hidden_state_loss([s], [t], _heads(1, 3, 3), "mse", mask=mask)
    b = hidden_state_loss([s], [t_changed], _heads(1, 3, 3), "mse", mask=mask)
    assert a.item() == pytest.approx(b.item()) and a.item() == pytest.approx(F.mse_loss(s[:, :2], t[:, :2]).item())
    with pytest.raises(ValueError, match="unknown hidden-state loss"):
        hidden_state_loss([s], [t], _heads(1, 3, 3), "l1")
    with pytest.raises(ValueError, match="one projection per"):
        hidden_state_loss([s, s], [t], _heads(1, 3, 3), "mse")
    with pytest.raises(ValueError, match="disagree"):
        hidden_state_loss([s], [t[:, :3]], _heads(1, 3, 3), "mse")


def _fused_vs_autograd(logits, labels, targets, **kw):
    out = []
    for fused in (True, False):
        x = logits.clone().requires_grad_(True)
        o = distillation_loss(x, labels, targets, fused=fused, **kw)
        o["total"].backward()
        out.append((o, x.grad))
    (a, ga), (b, gb) = out
    for k in ("total", "ce", "kd"):
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-5, abs=1e-6), k
    assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-4), (ga - gb).abs().max()
    return a, ga


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7, 3.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("chunk", [4, 10_000])
def test_fused_forward_kl_equals_autograd_on_every_target_kind(temperature, alpha, chunk):
    g = torch.Generator().manual_seed(7)
    n, v, k = (3, 7), 50, 6
    logits = torch.randn(*n, v, generator=g) * 3
    labels = torch.randint(0, v, n, generator=g)
    labels[0, :2] = -100                                                   # padding rows count for nothing
    kw = dict(alpha=alpha, temperature=temperature, chunk_tokens=chunk)
    _fused_vs_autograd(logits, labels, dense(F.log_softmax(torch.randn(*n, v, generator=g) * 2, -1)), **kw)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(21)]).reshape(*n, k)
    probs = torch.rand(*n, k, generator=g)
    probs[..., -1] = 0.0                                                   # a padding slot
    probs = probs / probs.sum(-1, keepdim=True)
    _fused_vs_autograd(logits, labels, sparse(ids, probs, torch.zeros(n)), **kw)            # sampled: no tail
    _fused_vs_autograd(logits, labels, sparse(ids, 0.7 * probs, torch.full(n, 0.3)), **kw)   # topk + tail


def test_fused_forward_kl_small_student_tail_has_no_cancellation():
    """The student puts ~all its mass on the stored ids while the teacher's tail is 0.1: the tail is summed over
    the other ids and its gradient applied from that sum (a 1 − Σq tail, or r·q − r·q, would lose it)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 40, generator=g)
    logits[..., :3] += 30.0
    labels = torch.randint(0, 40, (2, 5), generator=g)
    targets = sparse(torch.arange(3).expand(2, 5, 3).clone(), torch.full((2, 5, 3), 0.3), torch.full((2, 5), 0.1))
    for t in (1.0, 2.0):
        out, grad = _fused_vs_autograd(logits, labels, targets, alpha=0.3, temperature=t)
        assert torch.isfinite(grad).all() and out["kd"].item() > 0.5       # ≈ 0.1·log(0.1 / q_tail), q_tail ≪ 1e-3


def test_ce_only_objective_needs_no_targets():
    logits, labels, _ = _batch()
    labels[0, 0] = -100
    out, grad = _fused_vs_autograd(logits, labels, None, alpha=1.0, temperature=2.0)
    ref = F.cross_entropy(logits.reshape(-1, 13), labels.reshape(-1), ignore_index=-100)
    assert out["total"].item() == pytest.approx(ref.item(), rel=1e-6) and out["kd"].item() == 0.0
    with pytest.raises(ValueError, match="only a CE-only objective"):
        distillation_loss(logits, labels, None, alpha=0.5, temperature=1.0)


def test_fused_loss_without_grad_builds_nothing():
    logits, labels, teacher = _batch()
    x = logits.clone().requires_grad_(True)
    with torch.no_grad():
        out = distillation_loss(x, labels, dense(teacher), alpha=0.5, temperature=2.0)
    assert out["total"].grad_fn is None
    ref = distillation_loss(logits, labels, dense(teacher), alpha=0.5, temperature=2.0, fused=False)
    assert out["total"].item() == pytest.approx(ref["total"].item(), rel=1e-6)


def test_fused_loss_logs_ce_and_kd_without_gradients():
    logits, labels, teacher = _batch()
    x = logits.clone().requires_grad_(True)
    out = distillation_loss(x, labels, dense(teacher), alpha=0.5, temperature=2.0)
    assert out["total"].requires_grad and not out["ce"].requires_grad and not out["kd"].requires_grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_kd_value_estimates_the_true_kl_when_log_probs_are_stored(temperature):
    """Over many independent draws the logged forward KL of sampled targets averages to KL(p_T‖q_T) (unbiased at
    the cache temperature, consistent at another T); the plain value of the empirical distribution exceeds it by
    H(p) − H(p̂) (p̂ has less entropy). The offset moves the value only: gradient identical with and without it,
    fused == autograd."""
    from raydistill.tasks.cache.targets import CachedTargets, at_temperature

    g = torch.Generator().manual_seed(11)
    v, n_draws, reps = 60, 255 if temperature != 1.0 else 16, 400
    lp1 = F.log_softmax(torch.randn(v, generator=g) * 2.0, -1)                  # teacher at T = 1 (= T_c)
    z = torch.randn(v, generator=g) * 2.0                                       # student logits
    q_t = F.log_softmax(z / temperature, -1)
    p_t = F.log_softmax(lp1 / temperature, -1)
    true_kl = float((p_t.exp() * (p_t - q_t)).sum())
    x = torch.multinomial(lp1.exp(), reps * n_draws, replacement=True, generator=g).reshape(reps, n_draws)
    counts = torch.zeros(reps, v).scatter_add_(-1, x, torch.ones_like(x, dtype=torch.float))
    ids = torch.arange(v).expand(reps, v)
    cached = CachedTargets("sampled", 1.0, ids.reshape(reps, 1, v), lp1.expand(reps, v).reshape(reps, 1, v),
                           counts.reshape(reps, 1, v), num_samples=n_draws)
    t = at_temperature(cached, temperature)
    assert t.kl_offset is not None and t.kl_offset.shape == (reps, 1)
    logits, labels = z.expand(reps, 1, v).clone(), torch.zeros(reps, 1, dtype=torch.long)
    kw = dict(alpha=0.0, temperature=temperature)
    with_offset, grad = _fused_vs_autograd(logits, labels, t, **kw)
    plain, grad_plain = _fused_vs_autograd(logits, labels, sparse(t.ids, t.probs, t.tail), **kw)
    assert torch.equal(grad, grad_plain)
    assert with_offset["kd"].item() == pytest.approx(true_kl, rel=0.03)
    assert plain["kd"].item() > true_kl + 0.1                                   # without: + H(p) − H(p̂) > 0
    no_logprobs = CachedTargets("sampled", 1.0, cached.ids, None, cached.counts, num_samples=n_draws)
    if temperature == 1.0:
        assert at_temperature(no_logprobs, 1.0).kl_offset is None


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_kd_value_of_a_restricted_vocabulary_estimates_the_conditioned_teachers_kl(temperature):
    """A teacher with padding rows past the student's vocabulary (20 % of its mass there): after
    ``restrict_vocab`` the logged forward KL averages to the KL of the teacher *conditioned* on the kept ids,
    not one off by log(kept mass)."""
    from raydistill.tasks.cache.targets import CachedTargets, at_temperature, restrict_vocab

    g = torch.Generator().manual_seed(12)
    v, pad, n_draws, reps = 60, 8, 255 if temperature != 1.0 else 16, 400
    probs1 = torch.cat([F.softmax(torch.randn(v, generator=g) * 2.0, -1) * 0.8, torch.full((pad,), 0.2 / pad)])
    lp1 = probs1.log()                                                          # teacher at T = 1 (= T_c), V + pad
    z = torch.randn(v, generator=g) * 2.0                                       # student logits, V
    q_t = F.log_softmax(z / temperature, -1)
    p_t = F.log_softmax(lp1[:v] / temperature, -1)                              # conditioned on the kept ids, at T
    true_kl = float((p_t.exp() * (p_t - q_t)).sum())
    x = torch.multinomial(lp1.exp(), reps * n_draws, replacement=True, generator=g).reshape(reps, n_draws)
    counts = torch.zeros(reps, v + pad).scatter_add_(-1, x, torch.ones_like(x, dtype=torch.float))
    ids = torch.arange(v + pad).expand(reps, v + pad)
    cached = CachedTargets("sampled", 1.0, ids.reshape(reps, 1, -1), lp1.expand(reps, -1).reshape(reps, 1, -1),
                           counts.reshape(reps, 1, -1), num_samples=n_draws, vocab_size=v + pad)
    t = at_temperature(restrict_vocab(cached, v), temperature)
    logits, labels = z.expand(reps, 1, v).clone(), torch.zeros(reps, 1, dtype=torch.long)
    out, _ = _fused_vs_autograd(logits, labels, t, alpha=0.0, temperature=temperature)
    # unbiased at T_c; at T = 2 the re-weighting's O(1/N) bias grows as the kept draws shrink (≈ 2 % here); without
    # the kept-mass correction the value is 12 % (T = 1) and 35 % (T = 2) low
    assert out["kd"].item() == pytest.approx(true_kl, rel=0.03 if temperature == 1.0 else 0.05)
