"""Knowledge-distillation losses: small pure functions on tensors (no model, no Ray).

    python -m pytest tests/unit/test_losses.py

Every divergence ``D(p_teacher, q_student)`` is computed over *buckets*:

- dense targets: the buckets are the V vocabulary ids (teacher log-probs ``[N, V]``);
- sparse targets (``sampled`` / ``topk`` caches): the K stored ids plus one *tail bucket* holding the mass on
  every id that is not stored. The teacher's tail is ``tail``; the student's tail is ``1 − Σ_k q(id_k)``
  (float64; summed directly over the other ids where it is small, so there is no cancellation). Padding
  slots (probability 0) are left out of both sides. The coarsened divergence is exact for K = V and, by the
  data-processing inequality, a lower bound of the full one otherwise. With ``sampled`` targets the value
  of forward KL would carry the offset H(p) − H(p̂) (the empirical distribution has lower entropy); when the
  cache stores the drawn ids' log-probs, ``SparseTargets.kl_offset`` removes it from the value (forward KL
  only; the other divergences keep the bucket value). The gradient is unbiased either way.

Divergences (``p`` teacher, ``q`` student, all at temperature T):

- ``forward_kl``: KL(p‖q) = Σ p·(log p − log q) (mass covering; classic Hinton KD).
- ``reverse_kl``: KL(q‖p) (mode seeking). Teacher probabilities are floored at ``PROB_FLOOR`` inside the log,
  because a sparse target gives exact zeros (an empty tail bucket) where reverse KL would be infinite.
- ``jsd``: generalized JSD, TRL's ``generalized_jsd_loss`` convention (GKD, arXiv:2306.13649 eq. 1):
  ``M = β·p + (1−β)·q``, ``JSD_β = β·KL(p‖M) + (1−β)·KL(q‖M)``; like TRL, β = 0 *is* forward KL and β = 1
  *is* reverse KL (the mixture formula itself vanishes at both ends; ``JSD_β / β → KL(p‖q)`` as β → 0).
- ``skew_kl``: DistiLLM skew KL, KL(p ‖ λ·p + (1−λ)·q) (λ = 0: forward KL).
- ``skew_reverse_kl``: DistiLLM skew reverse KL, KL(q ‖ (1−λ)·p + λ·q) (λ = 0: reverse KL).
- ``tvd``: total variation, ½ Σ |p − q|.

Hidden-state matching (:func:`hidden_state_loss`, online teacher only): a learned linear projection of a
student layer's output against a teacher layer's output, ``mse`` (mean over tokens and teacher dims) or
``cosine`` (mean over tokens of 1 − cos, in [0, 2]); averaged over the layer pairs.

The module runs past the ~350-line guideline on purpose: the divergences, the fused forward-KL path (forward
and its hand-written gradient) and the chunked autograd path they are checked against are one family, and
keeping them together keeps the reference next to the fast path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
HIDDEN_LOSSES = ("mse", "cosine")
PROB_FLOOR = 1e-10
"""Smallest teacher probability used inside ``log p`` for reverse KL (sparse targets hold exact zeros)."""
CHUNK_TOKENS = 1024
"""Tokens per chunk of the loss: at most a ``[CHUNK_TOKENS, V]`` float32 softmax is alive at a time."""
EXACT_TAIL = 1e-3
"""Below this student tail mass, ``1 − Σ q(ids)`` is replaced by the direct sum over the other ids."""
_NEG = -1e30
"""Finite stand-in for log 0: ``0 * (log 0 - x)`` terms must not turn into NaN in backward."""


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) per row over buckets; terms with a = 0 are 0.

    Args:
        log_a (torch.Tensor): ``(N, B)`` log-probabilities, finite (log 0 as ``_NEG``).
        log_b (torch.Tensor): ``(N, B)`` log-probabilities, finite.
    Returns:
        torch.Tensor: ``(N,)``.
    """
    a = log_a.exp()
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))
    return terms.sum(-1)


def _mix(log_p: torch.Tensor, log_q: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·p + (1−w)·q), 0 < w < 1, elementwise ``(N, B)``."""
    return torch.logaddexp(log_p + math.log(w), log_q + math.log1p(-w))


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, loss: str = "forward_kl", *, beta: float = 0.5,
               skew: float = 0.1) -> torch.Tensor:
    """Per-row divergence between teacher ``p`` and student ``q`` given as log-probabilities over buckets.

    Args:
        log_p (torch.Tensor): ``(N, B)`` teacher log-probs (constant; ``-inf`` allowed where p = 0).
        log_q (torch.Tensor): ``(N, B)`` student log-probs.
        loss (str): one of :data:`LOSSES`.
        beta (float): JSD interpolation β ∈ [0, 1].
        skew (float): skew λ ∈ [0, 1] of the skew divergences.
    Returns:
        torch.Tensor: ``(N,)`` divergence per row, in nats.
    """
    log_p, log_q = log_p.clamp(min=_NEG), log_q.clamp(min=_NEG)
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0) or (loss == "skew_kl" and skew == 0.0):
        return _kl(log_p, log_q)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1.0) or (loss == "skew_reverse_kl" and skew == 0.0):
        return _kl(log_q, log_p.clamp(min=math.log(PROB_FLOOR)))
    if loss == "jsd":
        log_m = _mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if loss == "skew_kl":
        return _kl(log_p, log_p if skew == 1.0 else _mix(log_p, log_q, skew))
    if loss == "skew_reverse_kl":
        return _kl(log_q, log_q if skew == 1.0 else _mix(log_q, log_p, skew))
    if loss == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"unknown KD loss {loss!r}; choose one of {', '.join(LOSSES)}")


def sparse_buckets(student_logprobs: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor):
    """Teacher and student log-probs over the K stored ids plus the tail bucket.

    The student's tail is ``1 − Σ q(ids)`` in float64; where that leaves less than ``EXACT_TAIL`` (cancellation
    would cost precision) it is instead summed directly over the ids that are not stored.

    Args:
        student_logprobs (torch.Tensor): ``(N, V)`` student log-softmax (at temperature T).
        ids (torch.Tensor): ``(N, K)`` long, teacher token ids; real ids in a row are distinct, padding slots
            (probability 0) may repeat any id.
        probs (torch.Tensor): ``(N, K)`` teacher probabilities on ``ids``.
        tail (torch.Tensor): ``(N,)`` teacher mass on every id not in ``ids``.
    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``log_p, log_q`` of shape ``(N, K + 1)`` (last column: the tail);
        padding slots hold log 0 on both sides so they contribute nothing.
    """
    real = probs > 0
    log_q_ids = student_logprobs.gather(-1, ids)                                       # (N, K)
    q_tail = 1.0 - torch.where(real, log_q_ids.double().exp(), 0.0).sum(-1)             # (N,) float64
    rows = (q_tail < EXACT_TAIL).nonzero().squeeze(-1)
    if rows.numel():
        lp = student_logprobs[rows]                                                    # (n, V)
        stored = torch.zeros_like(lp).scatter_add_(-1, ids[rows], real[rows].to(lp.dtype)) > 0
        q_tail = q_tail.index_put((rows,), lp.exp().masked_fill(stored, 0.0).sum(-1).double())
    log0 = torch.full_like(log_q_ids, _NEG)
    log_q = torch.cat([torch.where(real, log_q_ids, log0),
                       q_tail.clamp(min=1e-30).log().to(log_q_ids.dtype).unsqueeze(-1)], dim=-1)
    log_p = torch.cat([torch.where(real, probs.float().log(), log0),
                       tail.float().clamp(min=0.0).log().unsqueeze(-1)], dim=-1)
    return log_p.clamp(min=_NEG), log_q.clamp(min=_NEG)


def _kd_chunk(logits, labels, target_parts, *, temperature, loss, beta, skew, ignore_index):
    """Sums over one chunk of tokens: ``(ce_sum, kd_sum)``. ``logits`` ``(n, V)``, ``labels`` ``(n,)``."""
    logits = logits.float()
    real = labels != ignore_index
    ce_sum = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if not target_parts:                                                       # CE only
        return ce_sum, ce_sum.new_zeros(())
    log_q = F.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    if len(target_parts) == 1:                                                 # dense teacher log-probs
        log_p = target_parts[0].float()
    else:
        log_p, log_q = sparse_buckets(log_q, *target_parts)
    kd = divergence(log_p, log_q, loss, beta=beta, skew=skew)
    return ce_sum, torch.where(real, kd, torch.zeros_like(kd)).sum()


def _dense_rebuild(targets: Any, vocab: int):
    """For ``HiddenTargets``: the function that turns a chunk of hidden states ``(n, d)`` into the dense teacher
    log-probs ``(n, vocab)`` (padded past the teacher's rows); None for other targets."""
    if not hasattr(targets, "hidden"):
        return None
    rows = targets.head.rows
    if rows > vocab:
        raise ValueError(f"teacher vocabulary ({rows}) is larger than the student's ({vocab}); restrict the targets "
                         "to the student's ids first (tasks.data.restrict_vocab)")

    def rebuild(hidden: torch.Tensor) -> torch.Tensor:
        lp = targets.logprobs(hidden)
        return lp if rows == vocab else F.pad(lp, (0, vocab - rows), value=_NEG)

    return rebuild


def _chunk(parts: tuple, sl: slice, rebuild) -> tuple:
    """The targets of rows ``sl``: slices of ``parts``, or the dense log-probs rebuilt from hidden states."""
    out = tuple(p[sl] for p in parts)
    return out if rebuild is None else (rebuild(out[0]),)


def _target_parts(targets: Any, n: int, vocab: int) -> tuple[torch.Tensor, ...]:
    """Flatten Sparse/Dense/HiddenTargets to ``(N, ·)`` tensors, checking shapes and the vocabulary (hidden: the
    ``(N, d)`` states, rebuilt chunk by chunk by :func:`_dense_rebuild`)."""
    if hasattr(targets, "hidden"):
        return (targets.hidden.reshape(n, -1),)
    if hasattr(targets, "logprobs"):
        lp = targets.logprobs.reshape(n, -1)
        if lp.shape[-1] > vocab:
            raise ValueError(f"teacher vocabulary ({lp.shape[-1]}) is larger than the student's ({vocab}); "
                             "restrict the targets to the student's ids first (tasks.data.restrict_vocab)")
        if lp.shape[-1] < vocab:  # student vocab padded (e.g. to a multiple of 64): teacher mass 0 there
            lp = F.pad(lp, (0, vocab - lp.shape[-1]), value=_NEG)
        return (lp,)
    if not all(hasattr(targets, a) for a in ("ids", "probs", "tail")):
        raise TypeError(f"targets must be SparseTargets(ids, probs, tail) or DenseTargets(logprobs), "
                        f"got {type(targets).__name__}")
    ids = targets.ids.reshape(n, -1).long()
    if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(f"teacher target ids must be in [0, {vocab}) (the student's vocabulary), "
                         f"got range [{int(ids.min())}, {int(ids.max())}] (tasks.data.restrict_vocab drops the "
                         "teacher's extra ids)")
    return ids, targets.probs.reshape(n, -1), targets.tail.reshape(n)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot product of two ``(n, V)`` tensors without an ``(n, V)`` temporary: ``(n,)``."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(-1)).reshape(-1)


def _fused_chunk(z, labels, parts, grad_out, *, ce_w, kd_w, temperature, ignore_index):
    """CE and forward-KL sums of one chunk, and (into ``grad_out``) their gradient w.r.t. the logits.

    ``z`` ``(n, V)`` float32 logits (not modified); ``parts`` as from :func:`_target_parts` (empty: CE only);
    ``grad_out`` ``(n, V)`` float32 buffer or None (no gradient wanted). The gradient written is
    ``ce_w·(softmax(z) − onehot(label)) + kd_w/T·(q_T − p̃)`` on real rows (0 on padding rows), where ``p̃`` is
    the teacher distribution over buckets spread onto ids: a stored id keeps ``p_k``; an id in the tail bucket
    gets ``q_T(id)·p_tail/q_tail`` (the exact gradient of the coarsened forward KL, see :func:`sparse_buckets`).
    Returns ``(ce_sum, kd_sum)`` float64 scalars.
    """
    real = labels != ignore_index
    lab = torch.where(real, labels, torch.zeros_like(labels)).unsqueeze(-1)
    m = z.amax(-1, keepdim=True)
    buf = torch.sub(z, m, out=grad_out) if grad_out is not None else z - m               # z − max
    z_lab = buf.gather(-1, lab).squeeze(-1)
    kd_rows, dense_p = None, None
    inv_t = 1.0 / temperature
    if len(parts) == 1:                                                                 # dense log p
        log_p = parts[0].float().clamp(min=_NEG)
        dense_p = log_p.exp()
        p_sum = dense_p.sum(-1)
        plogp = _row_dot(dense_p, log_p)
        pz = _row_dot(dense_p, buf)
    elif len(parts) == 3:                                                               # sparse buckets
        ids, probs, tail = parts
        probs = probs.float()
        stored = probs > 0
        zi = buf.gather(-1, ids)
    h = torch.mul(buf, inv_t).exp_() if parts and temperature != 1.0 else None            # exp((z − max)/T)
    if h is not None and temperature in (2.0, 3.0, 4.0):
        torch.pow(h, int(temperature), out=buf)                     # exp(z − max) = h^T: a multiply, not an exp
    else:
        buf.exp_()                                                                      # exp(z − max)
    s1 = buf.sum(-1)
    if h is None:
        h, s_t = buf, s1
    else:
        s_t = h.sum(-1)
    log_s_t = s_t.log()
    ce_rows = s1.log() - z_lab
    r = None
    if dense_p is not None:
        kd_rows = plogp - (pz * inv_t - p_sum * log_s_t)
    elif parts:
        log_q_ids = zi * inv_t - log_s_t.unsqueeze(-1)                                  # (n, K)
        log_p_ids = torch.where(stored, probs.clamp(min=1e-45).log(), torch.zeros_like(probs))
        kd_rows = torch.where(stored, probs * (log_p_ids - log_q_ids), torch.zeros_like(probs)).sum(-1)
        tail = tail.float().clamp(min=0.0)
        has_tail = tail > 0
        if bool(has_tail.any()):
            q_ids = torch.where(stored, log_q_ids.double().exp(), 0.0)
            q_tail = 1.0 - q_ids.sum(-1)                                                 # float64
            # Rows whose student tail is small, absolutely (1 − Σq cancels) or against the teacher's (the
            # gradient below would cancel r·q_j against itself): their tail is summed over the other ids directly,
            # and its gradient applied from that sum.
            exact = has_tail & ((q_tail < EXACT_TAIL) | (tail.double() > 8.0 * q_tail))
            rows = exact.nonzero().squeeze(-1)
            if rows.numel():
                h_tail = h[rows]                                               # a copy: stored ids zeroed next
                h_tail.scatter_add_(-1, ids[rows], -(h_tail.gather(-1, ids[rows]) * stored[rows]))
                q_tail = q_tail.index_put((rows,), (h_tail.sum(-1) / s_t[rows]).double())
            q_tail = q_tail.float()
            clamped = q_tail < 1e-30
            kd_rows = kd_rows + torch.where(has_tail, tail * (tail.clamp(min=1e-45).log()
                                                              - q_tail.clamp(min=1e-30).log()), 0.0)
            r = torch.where(has_tail & ~clamped, tail / q_tail.clamp(min=1e-30), 0.0)     # p_tail / q_tail
    ce_sum = torch.where(real, ce_rows, 0.0).double().sum()
    kd_sum = torch.where(real, kd_rows, 0.0).double().sum() if kd_rows is not None else ce_sum.new_zeros(())
    if grad_out is None:
        return ce_sum, kd_sum
    ce_c = torch.where(real, ce_w, 0.0).float()
    kd_c = torch.where(real, kd_w * inv_t, 0.0).float() if parts else torch.zeros_like(ce_c)
    r_main = None if r is None else r.masked_fill(exact, 0.0)         # exact rows: tail gradient from h_tail
    q_scale = kd_c if r_main is None else kd_c * (1.0 - r_main)                          # on q_T(j), every j
    if h is buf:
        buf.mul_(((ce_c + q_scale) / s1).unsqueeze(-1))
    else:
        buf.mul_((ce_c / s1).unsqueeze(-1)).addcmul_(h, (q_scale / s_t).unsqueeze(-1))
    buf.scatter_add_(-1, lab, -ce_c.unsqueeze(-1))
    if dense_p is not None:
        buf.addcmul_(dense_p, -kd_c.unsqueeze(-1))
    elif parts:
        back = probs if r is None else probs - (r_main.unsqueeze(-1) * log_q_ids.exp()).masked_fill(~stored, 0.0)
        buf.scatter_add_(-1, ids, -kd_c.unsqueeze(-1) * back)
        if r is not None and rows.numel():
            buf.index_add_(0, rows, h_tail * (-(kd_c * r)[rows] / s_t[rows]).unsqueeze(-1))
    return ce_sum, kd_sum


class _FusedForwardKL(torch.autograd.Function):
    """``ce_w·ΣCE + kd_w·ΣKL(p‖q_T)`` over ``(N, V)`` logits with the gradient computed in the same pass.

    The autograd version keeps two ``(N, V)`` log-softmax outputs and runs about a dozen elementwise passes over
    them in backward; this one makes a handful of passes per chunk in forward and keeps only the gradient
    (the size of the logits). Outputs ``(total, ce_sum, kd_sum)``; only ``total`` is differentiable.
    """

    @staticmethod
    def forward(ctx, logits, labels, parts, ce_w, kd_w, temperature, ignore_index, chunk_tokens, want_grad,
                rebuild=None):
        grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device) if want_grad else None
        ce_sum = kd_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        for s in range(0, logits.shape[0], chunk_tokens):
            sl = slice(s, s + chunk_tokens)
            ce, kd = _fused_chunk(logits[sl].float(), labels[sl], _chunk(parts, sl, rebuild),
                                  grad[sl] if want_grad else None, ce_w=ce_w, kd_w=kd_w,
                                  temperature=temperature, ignore_index=ignore_index)
            ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
        ctx.save_for_backward(grad if want_grad else None)
        ctx.logits_dtype = logits.dtype
        total = (ce_w * ce_sum + kd_w * kd_sum).float()
        ce_out, kd_out = ce_sum.float(), kd_sum.float()
        ctx.mark_non_differentiable(ce_out, kd_out)
        return total, ce_out, kd_out

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_kd):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return (None,) * 10
        if not (g_total.numel() == 1 and float(g_total) == 1.0):
            grad = grad * g_total
        return (grad.to(ctx.logits_dtype),) + (None,) * 9


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, targets: Any, *, alpha: float,
                      temperature: float, loss: str = "forward_kl", beta: float = 0.5, skew: float = 0.1,
                      ignore_index: int = -100, chunk_tokens: int = CHUNK_TOKENS,
                      fused: bool | None = None) -> dict[str, torch.Tensor]:
    """``α·CE + (1−α)·T²·KD``, each a mean over real tokens (``labels != ignore_index``).

    Args:
        student_logits (torch.Tensor): ``(B, L, V)`` raw student logits (CE uses them as is; KD divides by T).
        labels (torch.Tensor): ``(B, L)`` next-token ids, ``ignore_index`` on padding.
        targets: the teacher distribution over ``labels`` *already at temperature T*:
            ``SparseTargets(ids (B, L, K), probs (B, L, K), tail (B, L))``, ``DenseTargets(logprobs (B, L, V'))``
            or ``HiddenTargets(hidden (B, L, d), head)`` (dense log-probs rebuilt chunk by chunk) with V' ≤ V (a
            student vocabulary padded past the teacher's gets teacher mass 0 there); None for a CE-only objective
            (``alpha`` = 1; ``kd`` is then 0).
        alpha (float): CE weight α ∈ [0, 1].
        temperature (float): T > 0; KD is multiplied by T² so its gradient scale does not depend on T.
        loss (str): KD divergence, one of :data:`LOSSES`.
        chunk_tokens (int): tokens per chunk. With more than one chunk, each chunk's softmax is recomputed in
            backward (activation checkpointing) so only one chunk's ``(chunk_tokens, V)`` float32 blocks are
            kept at a time; a batch that fits in one chunk is not recomputed. (Fused path: the gradient is
            computed chunk by chunk in forward and kept; nothing else of size V per token is.)
        fused (bool | None): compute forward KL (and CE-only) with :class:`_FusedForwardKL`: value and gradient in
            one pass, no autograd graph through the softmax (same numbers as the autograd path, several times
            less work per token). None (default): fused whenever the loss allows it (``forward_kl``, or
            ``targets`` None with ``alpha`` = 1); False: always the autograd path (the reference in tests).
            With the fused path only ``total`` carries a gradient.
    Returns:
        dict: ``total``, ``ce``, ``kd`` (scalars; ``kd`` without the T² and (1−α) factors) and ``tokens``.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown KD loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0 (got alpha={alpha}, T={temperature})")
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and labels {tuple(labels.shape)} "
                         "disagree on (batch, length)")
    vocab = student_logits.shape[-1]
    logits = student_logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    if targets is None and alpha != 1.0:
        raise ValueError(f"no teacher targets given: only a CE-only objective (alpha=1) can do without them "
                         f"(got alpha={alpha})")
    parts = () if targets is None else _target_parts(targets, flat_labels.numel(), vocab)
    rebuild = _dense_rebuild(targets, vocab)
    # sampled targets with stored log-probs: the forward-KL value estimates KL(p‖q), not KL(p̂‖q) (a constant per
    # token, so it enters the values only)
    offset = getattr(targets, "kl_offset", None) if loss == "forward_kl" else None
    offset_sum = 0.0 if offset is None else float(torch.where(flat_labels != ignore_index,
                                                              offset.reshape(-1).double(), 0.0).sum())
    if fused is None:
        fused = loss == "forward_kl" or not parts
    if fused:
        tokens = (flat_labels != ignore_index).sum()
        denom = float(max(int(tokens), 1))
        total, ce_sum, kd_sum = _FusedForwardKL.apply(
            logits, flat_labels, parts, alpha / denom, (1.0 - alpha) * temperature ** 2 / denom, temperature,
            ignore_index, chunk_tokens, torch.is_grad_enabled() and logits.requires_grad, rebuild)
        total = total + (1.0 - alpha) * temperature ** 2 * offset_sum / denom
        return {"total": total, "ce": ce_sum / denom, "kd": (kd_sum + offset_sum) / denom, "tokens": tokens}
    kw = dict(temperature=temperature, loss=loss, beta=beta, skew=skew, ignore_index=ignore_index)
    ce_sum = kd_sum = logits.new_zeros((), dtype=torch.float32)
    n = flat_labels.numel()
    recompute = n > chunk_tokens and torch.is_grad_enabled() and logits.requires_grad
    for s in range(0, n, chunk_tokens):
        sl = slice(s, s + chunk_tokens)
        # hidden targets are rebuilt inside the (checkpointed) chunk: only the (n, d) states are kept for backward
        args = (logits[sl], flat_labels[sl], tuple(p[sl] for p in parts))
        if recompute:
            ce, kd = checkpoint(lambda lg, lb, tp: _kd_chunk(lg, lb, _chunk(tp, slice(None), rebuild), **kw), *args,
                                use_reentrant=False)
        else:
            ce, kd = _kd_chunk(*args[:2], _chunk(args[2], slice(None), rebuild), **kw)
        ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
    tokens = (flat_labels != ignore_index).sum()
    denom = tokens.clamp(min=1).float()
    ce, kd = ce_sum / denom, (kd_sum + offset_sum) / denom
    total = alpha * ce + (1.0 - alpha) * temperature ** 2 * kd
    return {"total": total, "ce": ce, "kd": kd, "tokens": tokens}


def hidden_state_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                      projections: torch.nn.ModuleList | None, kind: str = "mse",
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layer pairs of the distance between projected student and teacher hidden states.

    Args:
        student_states (list[torch.Tensor]): per pair ``(B, L, D_s)`` student layer outputs.
        teacher_states (list[torch.Tensor]): per pair ``(B, L, D_t)`` teacher layer outputs (constant).
        projections (torch.nn.ModuleList | None): per pair a module ``D_s → D_t`` (a ``Linear``), trained with the
            student; None: ``student_states`` are projected already (``(B, L, D_t)``, as
            ``tasks.online.StudentWithHeads`` returns them).
        kind (str): ``mse`` — mean over real tokens and the D_t dims of ``(proj(s) − t)²``; ``cosine`` — mean over
            real tokens of ``1 − cos(proj(s), t)`` (in [0, 2]).
        mask (torch.Tensor | None): ``(B, L)`` bool, True on the tokens that count (default: all).
    Returns:
        torch.Tensor: scalar, float32.
    """
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"unknown hidden-state loss {kind!r}; choose one of {', '.join(HIDDEN_LOSSES)}")
    if projections is None:
        projections = [torch.nn.Identity()] * len(student_states)
    if not len(student_states) == len(teacher_states) == len(projections) > 0:
        raise ValueError(f"need one projection per (student, teacher) state pair, got {len(student_states)} "
                         f"student states, {len(teacher_states)} teacher states, {len(projections)} projections")
    per_pair = []
    for s, t, proj in zip(student_states, teacher_states, projections):
        if s.shape[:-1] != t.shape[:-1]:
            raise ValueError(f"student state {tuple(s.shape)} and teacher state {tuple(t.shape)} disagree on "
                             "(batch, length)")
        p, t = proj(s.float()), t.float()
        if kind == "mse":
            per_token = (p - t).pow(2).mean(-1)                                        # (B, L)
        else:
            per_token = 1.0 - F.cosine_similarity(p, t, dim=-1, eps=1e-8)             # (B, L)
        if mask is None:
            per_pair.append(per_token.mean())
        else:
            m = mask.to(per_token.dtype)
            per_pair.append((per_token * m).sum() / m.sum().clamp(min=1.0))
    return torch.stack(per_pair).mean()
