"""The target types every format decodes into, and the format-independent operations on them.

Rows. A window of ``L+1`` tokens gives ``L`` rows; row ``j`` is the teacher distribution over token ``j+1``
given tokens ``0..j`` (over ``labels[j]``). A shard with ``W`` windows has ``R = W*L`` rows, window-major.

:func:`at_temperature` and :func:`restrict_vocab` hand a :class:`CachedTargets` to the module of its format
(:mod:`tasks.cache.formats`); nothing here knows a format by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class CachedTargets:
    """Decoded targets of some windows, as stored (not yet at a training temperature).

    ``ids``/``counts``/``logprobs``: ``[w, L, K]`` (padding: id 0, count 0, logprob -inf), or ``logprobs``
    ``[w, L, V]`` for ``full``. ``logprobs`` are at T=1 for ``sampled`` and at T_c for ``topk``/``full``.
    ``tail_logmass`` ``[w, L]``: log of the probability (at T_c) not on the top-k ids (``topk`` only).
    ``vocab_size`` lets ``topk`` re-temper its tail (see :func:`at_temperature`).
    """

    format: str
    """Name of the format module (:data:`tasks.cache.formats.FORMATS`) that decoded these targets."""
    cache_temperature: float
    """T_c, the temperature the cache stored."""
    ids: torch.Tensor | None
    """Long ``[w, L, K]`` stored ids (None for ``full``)."""
    logprobs: torch.Tensor | None
    """float ``[w, L, K]`` (or ``[w, L, V]`` for ``full``); None for ``sampled`` without stored log-probs."""
    counts: torch.Tensor | None = None
    """float ``[w, L, K]`` draws per id (``sampled`` only; each row sums to ``num_samples``)."""
    tail_logmass: torch.Tensor | None = None
    """float ``[w, L]`` log-mass on the ids not stored (``topk`` only)."""
    num_samples: int | None = None
    """N, draws per row (``sampled`` only)."""
    vocab_size: int | None = None
    """Teacher vocabulary the targets are over."""
    hidden: torch.Tensor | None = None
    """bf16 ``[w, L, d]`` the teacher's final normalised hidden states (``hidden`` only)."""
    head: Any = None
    """The teacher's :class:`~tasks.cache.head.OutputHead` (``hidden`` only; shared, not copied)."""


@dataclass
class HiddenTargets:
    """The teacher distribution at a temperature, as the hidden states it is rebuilt from: ``log_softmax(h·Wᵀ/T)``
    over the head's rows, computed by the loss chunk by chunk (:meth:`logprobs`)."""

    hidden: torch.Tensor
    """``[..., d]`` (bf16)."""
    head: Any
    """:class:`~tasks.cache.head.OutputHead`."""
    temperature: float

    def logprobs(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``[..., V]`` log-probs of ``hidden`` (default: all of this target's rows)."""
        z = self.head.logits(self.hidden if hidden is None else hidden)
        return torch.log_softmax(z / self.temperature if self.temperature != 1.0 else z, dim=-1)


@dataclass
class SparseTargets:
    """Teacher distribution at a temperature on a few ids: ``ids`` Long ``[..., K]``, ``probs`` float
    ``[..., K]``, ``tail`` float ``[...]`` (mass on no stored id); ``probs.sum(-1) + tail == 1``.
    Padding slots have id 0 and prob 0.

    ``kl_offset`` ``[...]`` (``sampled`` with stored log-probs, else None): ``Σ_k probs_k·(log p_k − log probs_k)``
    with ``p_k`` the teacher's own probability of id k at this temperature. Added to the forward-KL value of
    ``probs`` it turns that value into ``Σ_k probs_k·(log p_k − log q_k)``, an estimate of KL(p‖q) without the
    entropy offset ``H(p) − H(probs)`` of the empirical distribution (unbiased at the cache temperature). It does
    not depend on the student, so it changes the logged value only, never a gradient."""

    ids: torch.Tensor
    """Long ``[..., K]``."""
    probs: torch.Tensor
    """float ``[..., K]``."""
    tail: torch.Tensor
    """float ``[...]``: mass on no stored id."""
    kl_offset: torch.Tensor | None = None
    """float ``[...]`` (see the class doc)."""


@dataclass
class DenseTargets:
    """Teacher distribution at a temperature over the whole vocabulary."""

    logprobs: torch.Tensor
    """float ``[..., V]``."""


def at_temperature(targets: CachedTargets, temperature: float) -> SparseTargets | DenseTargets | HiddenTargets:
    """The teacher distribution at ``temperature`` (T) from targets cached at T_c (the format's own method;
    docs/cache-format.md has the math of each)."""
    from raydistill.tasks.cache.formats import get_format

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return get_format(targets.format).at_temperature(targets, temperature)


def restrict_vocab(cached: CachedTargets, vocab_size: int) -> CachedTargets:
    """The cached teacher distribution conditioned on ids ``< vocab_size`` (a student with fewer embedding rows:
    the teacher's extra rows are padding, see :mod:`tasks.data`). Each format drops the mass on the other ids
    and renormalises what is left (its module says how). Targets whose vocabulary is not larger come back
    unchanged."""
    from raydistill.tasks.cache.formats import get_format

    return get_format(cached.format).restrict_vocab(cached, vocab_size)


def select_windows(targets: CachedTargets, index) -> CachedTargets:
    """The targets of some windows (``index``: an int, slice or index tensor over the first dimension)."""
    if isinstance(index, int):
        index = slice(index, index + 1)

    def pick(t):
        return None if t is None else t[index]

    return CachedTargets(targets.format, targets.cache_temperature, pick(targets.ids), pick(targets.logprobs),
                         pick(targets.counts), pick(targets.tail_logmass), targets.num_samples, targets.vocab_size,
                         pick(targets.hidden), targets.head)


def cat_targets(parts: list[CachedTargets]) -> CachedTargets:
    """Concatenate targets of several shards along windows, padding K (the last dim) to the largest."""
    first = parts[0]

    def cat(name, fill):
        tensors = [getattr(p, name) for p in parts]
        if tensors[0] is None:
            return None
        if name in ("ids", "counts", "logprobs"):  # a dense [.., V] row has the same V in every part: no padding
            K = max(t.shape[-1] for t in tensors)
            tensors = [t if t.shape[-1] == K else torch.nn.functional.pad(t, (0, K - t.shape[-1]), value=fill)
                       for t in tensors]
        return torch.cat(tensors, dim=0)

    if any(p.head is not first.head and p.head.sha256 != first.head.sha256 for p in parts if first.head is not None):
        raise ValueError("cat_targets: hidden targets of two different teacher heads")
    return CachedTargets(first.format, first.cache_temperature, cat("ids", 0), cat("logprobs", -math.inf),
                         cat("counts", 0.0), cat("tail_logmass", 0.0), first.num_samples, first.vocab_size,
                         cat("hidden", 0.0), first.head)


def heldout_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """logits ``[B, L, V]``, labels ``[B, L]`` → ``teacher_top1`` int32 ``[B*L]`` (argmax id) and
    ``teacher_nll`` float32 ``[B*L]`` (teacher cross-entropy of the true next token at T=1)."""
    x = logits.float()
    nll = torch.logsumexp(x, dim=-1) - x.gather(-1, labels.to(x.device).long().unsqueeze(-1)).squeeze(-1)
    return {"teacher_top1": x.argmax(dim=-1).reshape(-1).to(torch.int32).cpu().numpy(),
            "teacher_nll": nll.reshape(-1).cpu().numpy().astype(np.float32)}
