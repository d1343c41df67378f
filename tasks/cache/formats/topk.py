"""``topk``: the k largest log-probs at T_c per row plus the log-mass of everything else (the tail bucket)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np
import torch

from raydistill.tasks.cache.targets import CachedTargets, SparseTargets, heldout_stats
from raydistill.tasks.config import CacheConfig


@dataclasses.dataclass(frozen=True)
class Params:
    """What a ``topk`` cache stores (the manifest's ``params``; part of every shard key)."""

    format: ClassVar[str] = "topk"
    top_k: int
    """k, ids kept per row (``cache.top_k``)."""

    @classmethod
    def from_config(cls, cfg: CacheConfig) -> "Params":
        return cls(top_k=cfg.top_k)


def tail_logmass(top_logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log(1 - Σ exp(top_logprobs)) computed stably as log(-expm1(logsumexp)); -inf when nothing is left.

    top_logprobs: ``[..., k]`` normalised log-probs. Returns ``[...]``.
    """
    if top_logprobs.shape[-1] >= vocab_size:
        return torch.full(top_logprobs.shape[:-1], -math.inf, device=top_logprobs.device)
    lse = torch.logsumexp(top_logprobs.double(), dim=-1).clamp(max=0.0)  # rounding can push it above 0
    return torch.log(-torch.expm1(lse)).float()


def encode(logits: torch.Tensor, params: Params, temperature: float, generators: list[torch.Generator] | None = None,
           labels: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """logits ``[B, L, V]`` → ``ids`` int32 ``[B*L, k]``, ``logprobs`` float16 ``[B*L, k]`` (at T_c, descending),
    ``tail`` float32 ``[B*L]``; with ``labels`` ``[B, L]`` also :func:`~tasks.cache.targets.heldout_stats`.
    ``generators`` is unused (no randomness)."""
    V = logits.shape[-1]
    lp = torch.log_softmax(logits.float().reshape(-1, V) / temperature, dim=-1)
    vals, ids = lp.topk(min(params.top_k, V), dim=-1)
    out = {"ids": ids.to(torch.int32).cpu().numpy(), "logprobs": vals.half().cpu().numpy(),
           "tail": tail_logmass(vals, V).cpu().numpy()}
    return out if labels is None else {**out, **heldout_stats(logits, labels)}


def to_disk(fields: dict[str, np.ndarray], tokens: np.ndarray, vocab_size: int,
            params: Params) -> tuple[dict[str, np.ndarray], dict, tuple[str, ...]]:
    """Stored as encoded (every array LZMA-compressed); no header entries."""
    return fields, {}, ()


def from_disk(stored: dict[str, np.ndarray], tokens: np.ndarray, vocab_size: int, params: Params,
              header: dict) -> dict[str, np.ndarray]:
    return stored


def entries(fields: dict[str, np.ndarray]) -> int:
    """Stored (id, log-prob) entries: k per row."""
    return int(fields["ids"].size)


def decode(fields: dict[str, np.ndarray], row_slice: slice, seq_len: int, params: Params, temperature: float,
           vocab_size: int | None) -> CachedTargets:
    """Arrays of rows ``row_slice`` (window-aligned) → :class:`CachedTargets` ``[w, L, k]``."""
    def rows(name):
        t = torch.from_numpy(fields[name][row_slice])
        return t.reshape(-1, seq_len, *t.shape[1:])

    return CachedTargets("topk", temperature, rows("ids").long(), rows("logprobs").float(), None,
                         rows("tail").float(), None, vocab_size)


def _retemper_tail(tail: torch.Tensor, lp_k: torch.Tensor, r: float, vocab_size: int | None,
                   k: int) -> torch.Tensor:
    """Unnormalised log tail weight Σ_tail p_j^r (r = T_c/T) from the tail mass m and the k-th log-prob.

    Given m and p_j ≤ p_k, Σ p_j^r lies between m·p_k^(r−1) (mass on tokens as likely as the k-th) and
    (V−k)^(1−r)·m^r (mass spread evenly); for r > 1 the two swap. We take their geometric mean — on SmolLM2
    it puts the tail mass at T = 2 within ~0.05 of the truth (each bound alone is off by 0.15–0.35).
    Without ``vocab_size`` only the first bound is available and is used. tail, lp_k: ``[...]``.
    """
    near = tail + (r - 1.0) * lp_k
    if vocab_size is None or vocab_size <= k:
        return near
    spread = r * tail + (1.0 - r) * math.log(vocab_size - k)
    return torch.where(torch.isinf(tail), tail, 0.5 * (near + spread))


def at_temperature(targets: CachedTargets, temperature: float) -> SparseTargets:
    """Top-k weights exp(lp · T_c/T); the tail weight is the geometric mean of its two extremes
    (:func:`_retemper_tail`; exact at T = T_c and when k = V; see docs/cache-format.md)."""
    r = targets.cache_temperature / temperature
    lp, tail = targets.logprobs, targets.tail_logmass
    if r != 1.0:
        tail = _retemper_tail(tail, lp[..., -1], r, targets.vocab_size, lp.shape[-1])
    logw = torch.cat([lp * r, tail.unsqueeze(-1)], dim=-1)
    probs = torch.softmax(logw, dim=-1)  # joint normalisation also absorbs float16 rounding
    return SparseTargets(targets.ids, probs[..., :-1], probs[..., -1])


def restrict_vocab(cached: CachedTargets, vocab_size: int) -> CachedTargets:
    """Ids ≥ ``vocab_size`` get log-prob −inf (their slots move to the front so the last slot stays the smallest
    kept log-prob, which :func:`at_temperature` uses to re-temper the tail); :func:`at_temperature` renormalises
    top-k + tail jointly, and the tail keeps whatever padding mass it held (it cannot be split)."""
    keep = cached.ids < vocab_size
    if bool(keep.all()) and (cached.vocab_size is None or cached.vocab_size <= vocab_size):
        return cached
    ids, lp = torch.where(keep, cached.ids, 0), torch.where(keep, cached.logprobs, -math.inf)
    order = torch.sort(torch.where(keep, lp, math.inf), dim=-1, descending=True, stable=True).indices
    return dataclasses.replace(cached, ids=ids.gather(-1, order), logprobs=lp.gather(-1, order),
                               vocab_size=vocab_size)
