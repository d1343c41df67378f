"""Soft-target formats: teacher logits → compact arrays → teacher distribution at any temperature.

    python -m pytest tests/unit/test_softtargets.py -q

Rows. A window of ``L+1`` tokens gives ``L`` rows; row ``j`` is the teacher distribution over token ``j+1``
given tokens ``0..j`` (over ``labels[j]``). A shard with ``W`` windows has ``R = W*L`` rows, window-major.

Formats (``cache.temperature`` = T_c; full details and the re-tempering math in docs/cache-format.md):
- ``sampled``: ``N`` draws with replacement from softmax(logits/T_c); per row the unique ids (sorted), their
  counts, and their teacher log-probs at T=1 (so training may use another temperature).
- ``topk``: the k largest log-probs at T_c plus the log-mass of everything else (the tail bucket).
- ``full``: all log-probs at T_c (float16).

This module is pure (torch + numpy); storage, keys and manifests are in :mod:`tasks.softtargets`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

FORMATS = ("sampled", "topk", "full")


@dataclass
class CachedTargets:
    """Decoded targets of some windows, as stored (not yet at a training temperature).

    ``ids``/``counts``/``logprobs``: ``[w, L, K]`` (padding: id 0, count 0, logprob -inf), or ``logprobs``
    ``[w, L, V]`` for ``full``. ``logprobs`` are at T=1 for ``sampled`` and at T_c for ``topk``/``full``.
    ``tail_logmass`` ``[w, L]``: log of the probability (at T_c) not on the top-k ids (``topk`` only).
    ``vocab_size`` lets ``topk`` re-temper its tail (see :func:`at_temperature`).
    """

    format: str
    cache_temperature: float
    ids: torch.Tensor | None
    logprobs: torch.Tensor | None
    counts: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None
    num_samples: int | None = None
    vocab_size: int | None = None


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
    probs: torch.Tensor
    tail: torch.Tensor
    kl_offset: torch.Tensor | None = None


@dataclass
class DenseTargets:
    """Teacher distribution at a temperature over the whole vocabulary: ``logprobs`` ``[..., V]``."""

    logprobs: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# encoding (one forward batch at a time: never more than one batch of full logits in memory)
# ----------------------------------------------------------------------------------------------------------

def encode_sampled(logits: torch.Tensor, num_samples: int, temperature: float,
                   generators: list[torch.Generator], labels: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Draw ``num_samples`` ids per row and keep unique ids + counts + T=1 log-probs.

    logits: ``[B, L, V]``; generators: one per window (seeded per window, so the draws do not depend on how
    windows are batched). Returns flat arrays over the ``E`` stored entries, row-major, ids ascending per row:
    ``row_len`` uint8 ``[B*L]``, ``ids`` int32 ``[E]``, ``counts`` uint8 ``[E]``, ``logp`` float32 ``[E]``.
    With ``labels`` ``[B, L]`` also :func:`heldout_stats`' ``teacher_top1`` and ``teacher_nll``, from the same
    passes over the logits (one max, one exp, one sum per window at T = 1: the draws take unnormalised weights).
    """
    B, L, V = logits.shape
    out = {"row_len": [], "ids": [], "counts": [], "logp": []}
    if labels is not None:
        out.update(teacher_top1=[], teacher_nll=[])
    for b in range(B):  # per window: bounded memory and batch-independent draws
        x = logits[b].float()
        top, top1 = x.max(dim=-1)                                            # [L]
        weights = torch.sub(x, top.unsqueeze(-1)).exp_()                    # exp(x − max), [L, V]
        lse1 = top + weights.sum(dim=-1).log()                              # log Σ exp(x), [L]
        if temperature != 1.0:
            weights = torch.sub(x, top.unsqueeze(-1)).mul_(1.0 / temperature).exp_()
        draws = torch.multinomial(weights, num_samples, replacement=True, generator=generators[b])
        draws, _ = draws.sort(dim=-1)  # [L, N]
        starts = torch.ones_like(draws, dtype=torch.bool)
        starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
        ids = draws[starts]  # [E_b]: unique ids, ascending within each row
        pos = starts.flatten().nonzero().squeeze(1)
        counts = torch.diff(pos, append=torch.tensor([L * num_samples]))
        row_len = starts.sum(dim=1)
        rows = torch.repeat_interleave(torch.arange(L), row_len)
        out["row_len"].append(row_len.to(torch.uint8))
        out["ids"].append(ids.to(torch.int32))
        out["counts"].append(counts.to(torch.uint8))
        out["logp"].append(x[rows, ids] - lse1[rows])
        if labels is not None:
            out["teacher_top1"].append(top1.to(torch.int32))
            out["teacher_nll"].append(lse1 - x.gather(-1, labels[b].long().unsqueeze(-1)).squeeze(-1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def tail_logmass(top_logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log(1 - Σ exp(top_logprobs)) computed stably as log(-expm1(logsumexp)); -inf when nothing is left.

    top_logprobs: ``[..., k]`` normalised log-probs. Returns ``[...]``.
    """
    if top_logprobs.shape[-1] >= vocab_size:
        return torch.full(top_logprobs.shape[:-1], -math.inf)
    lse = torch.logsumexp(top_logprobs.double(), dim=-1).clamp(max=0.0)  # rounding can push it above 0
    return torch.log(-torch.expm1(lse)).float()


def encode_topk(logits: torch.Tensor, k: int, temperature: float) -> dict[str, np.ndarray]:
    """logits ``[B, L, V]`` → ``ids`` int32 ``[B*L, k]``, ``logprobs`` float16 ``[B*L, k]`` (at T_c, descending),
    ``tail`` float32 ``[B*L]``."""
    V = logits.shape[-1]
    lp = torch.log_softmax(logits.float().reshape(-1, V) / temperature, dim=-1)
    vals, ids = lp.topk(min(k, V), dim=-1)
    return {"ids": ids.to(torch.int32).numpy(), "logprobs": vals.half().numpy(),
            "tail": tail_logmass(vals, V).numpy()}


def encode_full(logits: torch.Tensor, temperature: float) -> dict[str, np.ndarray]:
    """logits ``[B, L, V]`` → ``logprobs`` float16 ``[B*L, V]`` at T_c."""
    V = logits.shape[-1]
    return {"logprobs": torch.log_softmax(logits.float().reshape(-1, V) / temperature, dim=-1).half().numpy()}


def heldout_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """logits ``[B, L, V]``, labels ``[B, L]`` → ``teacher_top1`` int32 ``[B*L]`` (argmax id) and
    ``teacher_nll`` float32 ``[B*L]`` (teacher cross-entropy of the true next token at T=1)."""
    x = logits.float()
    nll = torch.logsumexp(x, dim=-1) - x.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return {"teacher_top1": x.argmax(dim=-1).reshape(-1).to(torch.int32).numpy(),
            "teacher_nll": nll.reshape(-1).numpy().astype(np.float32)}


def encode_fields(logits: torch.Tensor, fmt: str, temperature: float, *, num_samples: int | None = None,
                  top_k: int | None = None, generators: list[torch.Generator] | None = None,
                  labels: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Teacher logits ``[B, L, V]`` → the arrays of format ``fmt`` (the one dispatch over :data:`FORMATS`).

    ``sampled`` needs ``num_samples`` and one generator per window (and takes ``labels``, see
    :func:`encode_sampled`); ``topk`` needs ``top_k``.
    """
    if fmt == "sampled":
        if num_samples is None:
            raise ValueError("the sampled format needs num_samples")
        if generators is None or len(generators) != logits.shape[0]:
            raise ValueError(f"the sampled format needs one generator per window: got "
                             f"{0 if generators is None else len(generators)} generators for {logits.shape[0]} windows")
        return encode_sampled(logits, num_samples, temperature, generators, labels=labels)
    if fmt == "topk":
        if top_k is None:
            raise ValueError("the topk format needs top_k")
        return encode_topk(logits, top_k, temperature)
    if fmt == "full":
        return encode_full(logits, temperature)
    raise ValueError(f"unknown cache format {fmt!r}; expected one of {FORMATS}")


def encode_targets(logits: torch.Tensor, fmt: str, *, temperature: float = 1.0, num_samples: int | None = None,
                   top_k: int | None = None, generators: list[torch.Generator] | None = None) -> CachedTargets:
    """Teacher logits ``[B, L, V]`` → the targets a cache of ``fmt`` would give back for these ``B`` windows.

    The in-memory round trip (encode, then :func:`decode_rows`) that benchmarks and tests use in place of a
    cache on disk. The one difference from a stored ``sampled`` shard: its log-probs are exact here, the shard
    keeps them to within ``LOGP_STEP/2`` (:mod:`tasks.sampledpack`). ``sampled`` needs ``num_samples`` and
    one generator per window (default: :func:`window_generator` of ``"encode_targets"``); ``topk`` needs ``top_k``.
    """
    B, L, V = logits.shape
    if generators is None and fmt == "sampled":
        generators = [window_generator("encode_targets", b) for b in range(B)]
    fields = encode_fields(logits, fmt, temperature, num_samples=num_samples, top_k=top_k, generators=generators)
    t = decode_rows(fmt, fields, slice(0, B * L), L)
    return CachedTargets(fmt, temperature, t.get("ids"), t.get("logprobs"), t.get("counts"), t.get("tail_logmass"),
                         num_samples if fmt == "sampled" else None, V)


def select_windows(targets: CachedTargets, index) -> CachedTargets:
    """The targets of some windows (``index``: an int, slice or index tensor over the first dimension)."""
    if isinstance(index, int):
        index = slice(index, index + 1)

    def pick(t):
        return None if t is None else t[index]

    return CachedTargets(targets.format, targets.cache_temperature, pick(targets.ids), pick(targets.logprobs),
                         pick(targets.counts), pick(targets.tail_logmass), targets.num_samples, targets.vocab_size)


def window_generator(key: str, window: int) -> torch.Generator:
    """RNG of one window's draws: seeded by the shard key (which includes cache.seed) and the window index."""
    seed = int.from_bytes(hashlib.sha256(f"{key}:{window}".encode()).digest()[:8], "little") & (2 ** 63 - 1)
    return torch.Generator().manual_seed(seed)


def encode_shard(model: torch.nn.Module, tokens: np.ndarray, split: str, fmt: str, params: dict,
                 temperature: float, batch_size: int, key: str) -> tuple[dict[str, np.ndarray], dict, int]:
    """Run the teacher over one shard and encode its targets.

    tokens: int32 ``[W, L+1]``. Returns (fields: arrays over the ``W*L`` rows, stats: vocab_size,
    teacher_nll_sum, teacher_top1_correct, forwards performed). Held-out shards also get ``teacher_top1`` and
    ``teacher_nll`` per row, so no later stage needs the teacher for evaluation.
    """
    if fmt not in FORMATS:  # before any teacher forward
        raise ValueError(f"unknown cache format {fmt!r}; expected one of {FORMATS}")
    parts, nll_sum, correct, forwards, vocab = [], 0.0, 0, 0, None
    for i in range(0, tokens.shape[0], batch_size):
        x = torch.tensor(tokens[i: i + batch_size], dtype=torch.long)  # copy: Ray hands read-only arrays
        with torch.inference_mode():
            logits = model(input_ids=x[:, :-1], use_cache=False).logits  # [b, L, V]
            forwards += 1
            vocab = logits.shape[-1]
            if int(x.max()) >= vocab:
                raise ValueError(f"token id {int(x.max())} >= teacher vocab size {vocab}: tokenizer and teacher "
                                 "do not match")
            sampled = fmt == "sampled"  # the draws' own passes over the logits give the held-out statistics too
            enc = encode_fields(logits, fmt, temperature, num_samples=params.get("num_samples"),
                                top_k=params.get("top_k"), labels=x[:, 1:] if sampled else None,
                                generators=[window_generator(key, i + b) for b in range(x.shape[0])] if sampled
                                else None)
            if sampled:
                held = {k: enc.pop(k) for k in ("teacher_top1", "teacher_nll")}
                if not params.get("logprobs", True):
                    del enc["logp"]
            else:
                held = heldout_stats(logits, x[:, 1:])
            nll_sum += float(held["teacher_nll"].astype(np.float64).sum())
            correct += int((held["teacher_top1"] == x[:, 1:].reshape(-1).numpy()).sum())
        parts.append({**enc, **(held if split == "heldout" else {})})
    fields = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    stats = {"vocab_size": vocab, "teacher_nll_sum": nll_sum, "teacher_top1_correct": correct}
    return fields, stats, forwards


# ----------------------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------------------

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


def decode_rows(fmt: str, fields: dict[str, np.ndarray], row_slice: slice, seq_len: int) -> dict:
    """The stored arrays of rows ``row_slice`` (window-aligned) as padded torch tensors ``[w, L, ...]``."""
    if fmt == "sampled":
        row_len = fields["row_len"].astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(row_len)])
        lo, hi = offsets[row_slice.start], offsets[row_slice.stop]
        sub = {k: fields[k][lo:hi] for k in ("ids", "counts", "logp") if k in fields}
        dense = _pad_ragged(row_len[row_slice], sub, {"ids": 0, "counts": 0, "logp": -np.inf})
        t = {k: torch.from_numpy(v) for k, v in dense.items()}
        out = {"ids": t["ids"].long(), "counts": t["counts"].float()}
        if "logp" in t:
            out["logprobs"] = t["logp"].float()
    elif fmt == "topk":
        out = {"ids": torch.from_numpy(fields["ids"][row_slice]).long(),
               "logprobs": torch.from_numpy(fields["logprobs"][row_slice]).float(),
               "tail_logmass": torch.from_numpy(fields["tail"][row_slice]).float()}
    elif fmt == "full":
        out = {"logprobs": torch.from_numpy(fields["logprobs"][row_slice]).float()}
    else:
        raise ValueError(f"unknown cache format {fmt!r}; expected one of {FORMATS}")
    return {k: v.reshape(-1, seq_len, *v.shape[1:]) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------
# re-tempering
# ----------------------------------------------------------------------------------------------------------

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


def sampled_log_weights(targets: CachedTargets) -> torch.Tensor:
    """float64 ``[..., K]``: ``log(count·p^(1 − 1/T_c))`` of each drawn id of a ``sampled`` row with stored log-probs
    (``p`` at T = 1), −inf on undrawn slots. Their log-sum-exp estimates the proposal's normaliser relative to
    ``p`` (``log N`` at T_c = 1); summed over a subset of ids, that subset's share of the T = 1 mass."""
    w = torch.log(targets.counts.double()) + (1.0 - 1.0 / targets.cache_temperature) * targets.logprobs.double()
    return torch.where(targets.counts > 0, w, -math.inf)


def at_temperature(targets: CachedTargets, temperature: float) -> SparseTargets | DenseTargets:
    """The teacher distribution at ``temperature`` (T) from targets cached at T_c.

    - ``full``: log_softmax(logprobs · T_c/T) — exact.
    - ``topk``: top-k weights exp(lp · T_c/T); the tail weight is the geometric mean of its two extremes
      (:func:`_retemper_tail`; exact at T = T_c and when k = V; see docs/cache-format.md).
    - ``sampled``: self-normalised importance weights count_i · p_i^(1/T − 1/T_c) with p at T=1; exactly
      count/N at T = T_c. With stored log-probs also ``kl_offset`` (see :class:`SparseTargets`): the teacher's
      log-prob of each drawn id at T is ``lp_i/T − log Z_T``, the normaliser estimated from the same draws,
      ``Z_T/Z_c ≈ Σ count·p^(1/T−1/T_c) / Σ count·p^(1−1/T_c)`` (exactly 1 at T = T_c); in
      ``log p_T − log probs`` the re-weighting cancels, so only the second sum is computed.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    r = targets.cache_temperature / temperature
    if targets.format == "full":
        return DenseTargets(torch.log_softmax(targets.logprobs * r, dim=-1))
    if targets.format == "topk":
        lp = targets.logprobs
        tail = targets.tail_logmass
        if r != 1.0:
            tail = _retemper_tail(tail, lp[..., -1], r, targets.vocab_size, lp.shape[-1])
        logw = torch.cat([lp * r, tail.unsqueeze(-1)], dim=-1)
        probs = torch.softmax(logw, dim=-1)  # joint normalisation also absorbs float16 rounding
        return SparseTargets(targets.ids, probs[..., :-1], probs[..., -1])
    if targets.format == "sampled":
        counts = targets.counts
        if temperature == targets.cache_temperature:
            probs = counts / float(targets.num_samples)
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
            log_z = torch.logsumexp(sampled_log_weights(targets), dim=-1, keepdim=True)
            log_ratio = targets.logprobs.double() / targets.cache_temperature - torch.log(counts.double()) + log_z
            offset = torch.where(counts > 0, probs.double() * log_ratio, 0.0).sum(-1).float()
        return SparseTargets(targets.ids, probs, torch.zeros(probs.shape[:-1]), offset)
    raise ValueError(f"unknown cache format {targets.format!r}; expected one of {FORMATS}")


def cat_targets(parts: list[CachedTargets]) -> CachedTargets:
    """Concatenate targets of several shards along windows, padding K to the largest."""
    first = parts[0]

    def cat(name, fill):
        tensors = [getattr(p, name) for p in parts]
        if tensors[0] is None:
            return None
        if name in ("ids", "counts", "logprobs") and first.format != "full":
            K = max(t.shape[-1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, K - t.shape[-1]), value=fill) for t in tensors]
        return torch.cat(tensors, dim=0)

    return CachedTargets(first.format, first.cache_temperature, cat("ids", 0), cat("logprobs", -math.inf),
                         cat("counts", 0.0), cat("tail_logmass", 0.0), first.num_samples, first.vocab_size)
