"""``sampled``: N draws with replacement from softmax(logits/T_c) per row; per row the unique ids (sorted), their
counts, and (optionally) their teacher log-probs at T=1, so training may use another temperature.

On disk the entries are entropy-coded by :mod:`tasks.cache.sampledpack`; docs/cache-format.md has the
re-tempering math.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np
import torch

from raydistill.tasks.cache.draws import (FIXED_BYTES, MAX_DRAWS, PILOT, SAMPLER, budget_draws, entry_bytes,
                                          lookup, pilot_statistics, row_weights, unique_counts, window_uniforms,
                                          work_copy)
from raydistill.tasks.cache.sampledpack import compact_sampled, expand_sampled
from raydistill.tasks.cache.targets import CachedTargets, SparseTargets
from raydistill.tasks.config import CacheConfig


@dataclasses.dataclass(frozen=True)
class Params:
    """What a ``sampled`` cache stores (the manifest's ``params``; part of every shard key)."""

    format: ClassVar[str] = "sampled"
    num_samples: int
    """N, draws per row (``cache.num_samples``); under a byte budget 255, the most a row can get."""
    seed: int = 0
    """Seed of the draws, mixed with the shard key per window (``cache.seed``)."""
    logprobs: bool = True
    """Whether each drawn id's T=1 log-prob is stored (``cache.sampled_logprobs``): needed to re-temper."""
    bytes_per_token: float | None = None
    """Byte budget (``cache.bytes_per_token``, when ``cache.num_samples`` is null): each row gets the draws
    :func:`~tasks.cache.draws.budget_draws` picks for it (stored per row); None: every row gets ``num_samples``."""
    sampler: str = SAMPLER
    """The sampler that drew the targets (:data:`tasks.cache.draws.SAMPLER`)."""

    @classmethod
    def from_config(cls, cfg: CacheConfig) -> "Params":
        if cfg.num_samples is not None:
            return cls(num_samples=cfg.num_samples, seed=cfg.seed, logprobs=cfg.sampled_logprobs)
        return cls(num_samples=MAX_DRAWS, seed=cfg.seed, logprobs=cfg.sampled_logprobs,
                   bytes_per_token=float(cfg.bytes_per_token))


def encode(logits: torch.Tensor, params: Params, temperature: float, generators: list[torch.Generator],
           labels: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Draw ids per row on the logits' device (:mod:`tasks.cache.draws`) and keep unique ids + counts (+ T=1
    log-probs); only these leave the device.

    logits: ``[B, L, V]`` (left as they are: the sampler works in :func:`~tasks.cache.draws.work_copy`); generators: one per
    window (seeded per window, so the draws do not depend on how windows are batched). Returns flat arrays over the
    ``E`` stored entries, row-major, ids ascending per row: ``row_len`` uint8 ``[B*L]``, ``ids`` int32 ``[E]``,
    ``counts`` uint8 ``[E]``, ``logp`` float32 ``[E]`` (only with ``params.logprobs``), ``n_draws`` uint8 ``[B*L]``
    (only with a byte budget). With ``labels`` ``[B, L]`` also ``teacher_top1`` and ``teacher_nll`` (as
    :func:`~tasks.cache.targets.heldout_stats`).
    """
    B, L, V = logits.shape
    if generators is None or len(generators) != B:
        raise ValueError(f"the sampled format needs one generator per window: got "
                         f"{0 if generators is None else len(generators)} generators for {B} windows")
    budget = params.bytes_per_token is not None
    u, pilot = window_uniforms(generators, L, params.num_samples, PILOT if budget else 0, logits.device)
    x = work_copy(logits)
    held = {}
    if labels is not None:
        labels = labels.to(x.device).long()
        held = {"teacher_top1": x.argmax(dim=-1), "x_label": x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)}
    w, top, lse1 = row_weights(x, temperature, lse=labels is not None or params.logprobs)
    cdf = torch.cumsum(w, dim=-1) if params.logprobs else w.cumsum_(dim=-1)  # in place: no second V-sized buffer
    if budget:
        pilot_ids = lookup(cdf, pilot)
        _, distinct = pilot_statistics(pilot_ids)
        # a row's noise weight: the ids its pilot found, less one (0 for a sure row) — the expected relative noise
        # Σ_i (p̂_i − p_i)²/p_i over the ids with non-negligible mass is (K − Σ p_i)/n (docs/cache-format.md)
        n = budget_draws((distinct[..., -1] - 1).float(), distinct, params.bytes_per_token - FIXED_BYTES,
                         entry_bytes(pilot_ids, V))
        u = torch.where(torch.arange(u.shape[-1], device=u.device) < n.unsqueeze(-1), u, math.inf)
    u = u.sort(dim=-1).values  # sorted draws: the ids come out ascending per row, unused slots last
    row_len, ids, counts, rows = unique_counts(lookup(cdf, u).reshape(B * L, -1), V)
    out = {"row_len": row_len.to(torch.uint8), "ids": ids.to(torch.int32), "counts": counts.to(torch.uint8)}
    if params.logprobs:  # log p₁ = T·log w − (lse₁ − max): w holds exp((x − max)/T)
        lw = w.reshape(B * L, V)[rows, ids].log()
        out["logp"] = temperature * lw - (lse1 - top).reshape(-1)[rows]
    if budget:
        out["n_draws"] = n.reshape(-1).to(torch.uint8)
    if labels is not None:
        out["teacher_top1"] = held["teacher_top1"].reshape(-1).to(torch.int32)
        out["teacher_nll"] = (lse1 - held["x_label"]).reshape(-1)
    return {k: v.cpu().numpy() for k, v in out.items()}


def to_disk(fields: dict[str, np.ndarray], tokens: np.ndarray, vocab_size: int,
            params: Params) -> tuple[dict[str, np.ndarray], dict, tuple[str, ...]]:
    """Encoder arrays → (arrays to store, header entries, names stored uncompressed): the entropy-coded layout
    of :func:`~tasks.cache.sampledpack.compact_sampled`; its gap bits are uniform, so LZMA is skipped on them."""
    held = {k: v for k, v in fields.items() if k.startswith("teacher_")}
    packed, meta = compact_sampled(fields, tokens, vocab_size, params.num_samples, keep_logprobs="logp" in fields)
    return {**packed, **held}, {"sampled": meta}, ("sampled_bits",)


def from_disk(stored: dict[str, np.ndarray], tokens: np.ndarray, vocab_size: int, params: Params,
              header: dict) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_disk` (ValueError/KeyError/IndexError on arrays that do not decode)."""
    return expand_sampled(stored, tokens, vocab_size, params.num_samples, header["sampled"])


def entries(fields: dict[str, np.ndarray]) -> int:
    """Stored (id, count[, log-prob]) entries in encoder arrays: the unique ids over all rows."""
    return len(fields["ids"])


def _pad_ragged(row_len: np.ndarray, values: dict[str, np.ndarray], fill: dict[str, float]) -> dict:
    """Flat per-row entries → padded ``[R, K]`` arrays, K = max row length."""
    R, K = len(row_len), max(int(row_len.max(initial=0)), 1)
    starts = np.concatenate([[0], np.cumsum(row_len, dtype=np.int64)[:-1]])
    rows = np.repeat(np.arange(R), row_len)
    cols = np.arange(len(rows)) - np.repeat(starts, row_len)
    out = {}
    for name, v in values.items():
        dense = np.full((R, K), fill[name], dtype=v.dtype)
        dense[rows, cols] = v
        out[name] = dense
    return out


def decode(fields: dict[str, np.ndarray], row_slice: slice, seq_len: int, params: Params, temperature: float,
           vocab_size: int | None) -> CachedTargets:
    """Encoder arrays of rows ``row_slice`` (window-aligned) → :class:`CachedTargets` ``[w, L, K]``."""
    row_len = fields["row_len"].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(row_len)])
    lo, hi = offsets[row_slice.start], offsets[row_slice.stop]
    sub = {k: fields[k][lo:hi] for k in ("ids", "counts", "logp") if k in fields}
    dense = _pad_ragged(row_len[row_slice], sub, {"ids": 0, "counts": 0, "logp": -np.inf})
    t = {k: torch.from_numpy(v).reshape(-1, seq_len, v.shape[-1]) for k, v in dense.items()}
    return CachedTargets("sampled", temperature, t["ids"].long(), t["logp"].float() if "logp" in t else None,
                         t["counts"].float(), None, params.num_samples, vocab_size)


def log_weights(targets: CachedTargets) -> torch.Tensor:
    """float64 ``[..., K]``: ``log(count·p^(1 − 1/T_c))`` of each drawn id of a row with stored log-probs
    (``p`` at T = 1), −inf on undrawn slots. Their log-sum-exp estimates the proposal's normaliser relative to
    ``p`` (``log N`` at T_c = 1); summed over a subset of ids, that subset's share of the T = 1 mass."""
    w = torch.log(targets.counts.double()) + (1.0 - 1.0 / targets.cache_temperature) * targets.logprobs.double()
    return torch.where(targets.counts > 0, w, -math.inf)


def at_temperature(targets: CachedTargets, temperature: float) -> SparseTargets:
    """Self-normalised importance weights count_i · p_i^(1/T − 1/T_c) with p at T=1; exactly count/n_r at T = T_c
    (n_r = the row's draws: N, or what a byte budget gave it).

    With stored log-probs also ``kl_offset`` (see :class:`SparseTargets`): the teacher's log-prob of each drawn id
    at T is ``lp_i/T − log Z_T``, the normaliser estimated from the same draws,
    ``Z_T/Z_c ≈ Σ count·p^(1/T−1/T_c) / Σ count·p^(1−1/T_c)`` (exactly 1 at T = T_c); in ``log p_T − log probs``
    the re-weighting cancels, so only the second sum is computed.
    """
    counts = targets.counts
    if temperature == targets.cache_temperature:
        probs = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)  # count/n_r: n_r = N, or the row's own
    elif targets.logprobs is None:
        raise ValueError(f"this sampled cache stores no log-probs (cache.sampled_logprobs=false): it gives "
                         f"targets only at its own temperature {targets.cache_temperature}, not {temperature}")
    else:
        logw = torch.log(counts) + (1.0 / temperature - 1.0 / targets.cache_temperature) * targets.logprobs
        logw = torch.where(counts > 0, logw, torch.full_like(logw, -math.inf))
        probs = torch.softmax(logw, dim=-1)
    offset = None
    if targets.logprobs is not None:
        # log(p_T/probs) on a drawn id: the re-weighting to T cancels, leaving log(proposal · Ẑ_c/count) with
        # Ẑ_c estimated from the draws, log Σ count·p^(1−1/T_c) (= log N at T_c = 1)
        log_z = torch.logsumexp(log_weights(targets), dim=-1, keepdim=True)
        log_ratio = targets.logprobs.double() / targets.cache_temperature - torch.log(counts.double()) + log_z
        offset = torch.where(counts > 0, probs.double() * log_ratio, 0.0).sum(-1).float()
    return SparseTargets(targets.ids, probs, torch.zeros(probs.shape[:-1]), offset)


def _log_kept_mass(cached: CachedTargets, keep: torch.Tensor) -> torch.Tensor:
    """``[..., 1]``: log of the teacher's T=1 mass on the kept ids of a row, estimated from its draws with
    :func:`log_weights` (at T_c = 1: the kept share of the draws). 0 for a row with no draws kept (it has no
    targets left)."""
    logw = log_weights(cached)
    log_kept = torch.logsumexp(torch.where(keep, logw, -math.inf), dim=-1, keepdim=True) \
        - torch.logsumexp(logw, dim=-1, keepdim=True)
    return torch.where(torch.isfinite(log_kept), log_kept, 0.0).float()


def restrict_vocab(cached: CachedTargets, vocab_size: int) -> CachedTargets:
    """Draws of ids ≥ ``vocab_size`` removed (id 0, count 0), the remaining counts rescaled to sum to the row's
    draws,
    the stored log-probs conditioned on the kept ids too (so ``kl_offset`` estimates the conditioned teacher's
    KL)."""
    keep = cached.ids < vocab_size
    if bool(keep.all()) and (cached.vocab_size is None or cached.vocab_size <= vocab_size):
        return cached
    ids, lp = torch.where(keep, cached.ids, 0), cached.logprobs
    counts = torch.where(keep, cached.counts, 0.0)
    counts = counts * (cached.counts.sum(-1, keepdim=True) / counts.sum(-1, keepdim=True).clamp(min=1e-12))
    if lp is not None:  # T=1 log-probs of the conditioned teacher: minus log(kept mass), estimated from the draws
        lp = torch.where(keep, lp, -math.inf) - _log_kept_mass(cached, keep)
    return dataclasses.replace(cached, ids=ids, logprobs=lp, counts=counts, vocab_size=vocab_size)
