"""Held-out evaluation of a (student) model against the cached teacher.

    python -m pytest tests/unit/test_evaluate.py

``evaluate(model, shards)`` takes *already-read* held-out shards (``Cache.read(entry)`` objects, or anything
with the same fields) and returns plain floats:

- ``heldout_loss``: mean cross-entropy of the true next token, nats/token; ``perplexity`` = exp of it;
- ``top1_agreement``: share of positions where the model's argmax equals the teacher's (``teacher_top1``);
- ``ece``: expected calibration error of the model's top-1 prediction (15 equal-width confidence bins,
  accuracy against the true next token);
- ``kl_to_teacher``: mean forward KL(teacher ‖ model) on the cached targets, both at the cache temperature
  (over the stored ids + tail bucket for ``sampled``/``topk`` caches, see :mod:`tasks.losses`);
- ``tokens``, ``tokens_per_s`` (forward passes only).

A shard-like item needs ``tokens`` (``[W, L+1]`` ids; the model reads ``tokens[:, :-1]``, labels are
``tokens[:, 1:]``); optional ``teacher_top1`` (``[W, L]``) and ``targets(window_slice)`` (cached targets of
those windows, ``tasks.cache.targets.CachedTargets``). A metric whose teacher field is missing is ``None``.
A chat shard's ``mask`` (bool ``[W, L]``) limits every metric to the positions it holds (the assistant's tokens).

The promotion gate compares two models on one *frozen* held-out set: :func:`heldout_digest` names it (the
sorted held-out shard keys and the window cap) and :func:`regressions` says how much worse a candidate is than
the champion on each gated metric.

For assistants, :func:`generation_metrics` scores the student's greedy answers to prompts by the teacher's
per-token log-likelihood of them (and their length): a metric of what the student *generates*, not of how it
predicts the corpus.

For distributed evaluation, each rank calls :func:`evaluate_sums` on its own shards, the sums are added
across ranks (``all_reduce``) and :func:`finalize` turns them into the metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Iterable

import torch
import torch.nn.functional as F

from raydistill.tasks.device import module_device, to_device
from raydistill.tasks.losses import divergence, sparse_buckets
from raydistill.tasks.students import forward_logits
from raydistill.tasks.cache.targets import DenseTargets, HiddenTargets, at_temperature

ECE_BINS = 15
SUM_KEYS = ("nll", "tokens", "agree", "agree_tokens", "kl", "kl_tokens", "seconds")


def _empty_sums() -> torch.Tensor:
    """Additive statistics: ``SUM_KEYS`` then per-bin count, confidence sum and correct count."""
    return torch.zeros(len(SUM_KEYS) + 3 * ECE_BINS, dtype=torch.float64)


def _kl_rows(logits: torch.Tensor, cached) -> torch.Tensor:
    """Forward KL per position ``(w*L,)``: ``logits`` ``(w, L, V)`` vs cached targets at the cache temperature."""
    t = cached.cache_temperature
    targets = to_device(at_temperature(cached, t), logits.device)
    log_q = F.log_softmax(logits.float().reshape(-1, logits.shape[-1]) / t, dim=-1)
    if isinstance(targets, (DenseTargets, HiddenTargets)):  # hidden: the exact log-probs, rebuilt here
        log_p = (targets.logprobs() if isinstance(targets, HiddenTargets) else targets.logprobs)
        log_p = log_p.reshape(log_q.shape[0], -1)
        if log_p.shape[-1] < log_q.shape[-1]:
            log_p = F.pad(log_p, (0, log_q.shape[-1] - log_p.shape[-1]), value=-math.inf)
        return divergence(log_p, log_q, "forward_kl")
    n = log_q.shape[0]
    log_p, log_q = sparse_buckets(log_q, targets.ids.reshape(n, -1), targets.probs.reshape(n, -1),
                                  targets.tail.reshape(n))
    return divergence(log_p, log_q, "forward_kl")


@torch.no_grad()
def evaluate_sums(model, shards: Iterable, *, max_windows: int | None = None, teacher_targets: bool = True,
                  batch_size: int = 8, device: torch.device | str | None = None) -> torch.Tensor:
    """Additive evaluation statistics over the windows of ``shards`` (see :func:`finalize`), as a CPU tensor;
    the forwards run on ``device`` (default: where ``model``'s parameters are)."""
    was_training = getattr(model, "training", False)
    model.eval()
    sums, seen = _empty_sums(), 0  # on the CPU; the forward and its per-position math on the model's device
    bins = sums[len(SUM_KEYS):].view(3, ECE_BINS)
    device = torch.device(device) if device is not None else module_device(model)
    try:
        for shard in shards:
            tokens = torch.as_tensor(shard.tokens).long().to(device)
            top1 = getattr(shard, "teacher_top1", None)
            mask = getattr(shard, "mask", None)  # a chat shard: only the assistant's tokens are scored
            for a in range(0, tokens.shape[0], batch_size):
                if max_windows is not None and seen >= max_windows:
                    return sums
                b = min(a + batch_size, tokens.shape[0])
                if max_windows is not None:
                    b = min(b, a + max_windows - seen)
                seen += b - a
                x, y = tokens[a:b, :-1], tokens[a:b, 1:]
                t0 = time.perf_counter()
                logits = forward_logits(model, x).float()
                sums[SUM_KEYS.index("seconds")] += time.perf_counter() - t0
                flat, labels = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
                keep = None if mask is None else torch.as_tensor(mask[a:b]).reshape(-1).bool()
                if keep is not None:
                    flat, labels = flat[keep.to(device)], labels[keep.to(device)]
                sums[0] += F.cross_entropy(flat, labels, reduction="sum").item()
                sums[1] += labels.numel()
                conf, pred = F.softmax(flat, dim=-1).max(dim=-1)
                if top1 is not None:
                    t1 = torch.as_tensor(top1[a:b]).reshape(-1)
                    t1 = t1 if keep is None else t1[keep]
                    sums[2] += (pred == t1.long().to(device)).sum().item()
                    sums[3] += labels.numel()
                if teacher_targets and hasattr(shard, "targets"):
                    kl = _kl_rows(logits, shard.targets(slice(a, b)))
                    sums[4] += (kl if keep is None else kl[keep.to(kl.device)]).double().sum().item()
                    sums[5] += labels.numel()
                which = (conf.double() * ECE_BINS).long().clamp(max=ECE_BINS - 1)
                bins[0] += torch.bincount(which, minlength=ECE_BINS).double().cpu()
                bins[1] += torch.bincount(which, weights=conf.double(), minlength=ECE_BINS).cpu()
                bins[2] += torch.bincount(which, weights=(pred == labels).double(), minlength=ECE_BINS).cpu()
            if max_windows is not None and seen >= max_windows:
                return sums  # before the next shard is read: a capped evaluation reads only what it scores
        return sums
    finally:
        model.train(was_training)


def finalize(sums: torch.Tensor) -> dict:
    """Metrics from (possibly all-reduced) :func:`evaluate_sums` statistics."""
    s = dict(zip(SUM_KEYS, sums[:len(SUM_KEYS)].tolist()))
    if s["tokens"] == 0:
        raise ValueError("evaluate: no held-out windows to evaluate (empty shards or max_windows=0)")
    count, conf, correct = sums[len(SUM_KEYS):].view(3, ECE_BINS)
    loss = s["nll"] / s["tokens"]
    return {
        "heldout_loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "top1_agreement": s["agree"] / s["agree_tokens"] if s["agree_tokens"] else None,
        "ece": float((conf - correct).abs().sum() / s["tokens"]),
        "kl_to_teacher": s["kl"] / s["kl_tokens"] if s["kl_tokens"] else None,
        "tokens": int(s["tokens"]),
        "tokens_per_s": s["tokens"] / s["seconds"] if s["seconds"] > 0 else None,
    }


def evaluate(model, shards: Iterable, *, max_windows: int | None = None, teacher_targets: bool = True,
             batch_size: int = 8) -> dict:
    """Held-out metrics of ``model`` (any causal LM returning ``.logits``) on shard-like items.

    Args:
        model: a Hugging Face causal LM (plain, PEFT or quantized); it is put in eval mode for the call.
        shards: iterable of read shards (``tokens [W, L+1]``, optional ``teacher_top1``, ``targets(slice)``).
        max_windows: stop after this many windows (None: all).
        teacher_targets: compute ``kl_to_teacher`` from the cached targets (reading them costs time).
        batch_size: windows per forward pass.
    Returns:
        dict: ``heldout_loss, perplexity, top1_agreement, ece, kl_to_teacher, tokens, tokens_per_s``.
    """
    return finalize(evaluate_sums(model, shards, max_windows=max_windows, teacher_targets=teacher_targets,
                                  batch_size=batch_size))



@torch.no_grad()
def generation_metrics(student, teacher, prompts: torch.Tensor, *, max_new_tokens: int, eos: set[int],
                       batch_size: int = 8) -> dict:
    """The teacher's verdict on the student's greedy answers: how likely the teacher finds them, and how long.

    Args:
        student, teacher: causal LMs (an engine or :class:`tasks.online.StudentWithHeads` for the student too).
        prompts (torch.Tensor): ``(B, P)`` token ids (e.g. prefixes of held-out windows), on the student's device.
        max_new_tokens: greedy tokens per answer (an answer ends at its first EOS, which it includes).
        eos: ids that end an answer.
    Returns:
        ``gen_teacher_logprob``: mean over answer tokens of the teacher's log p(token | prompt, answer so far) at
        T=1 (a token the teacher's vocabulary lacks counts −100); ``gen_teacher_nll`` its negation;
        ``gen_length``: mean answer tokens before the EOS; ``gen_answers``: B.
    """
    from raydistill.tasks.onpolicy import answer_mask, causal_lm, sample

    total, tokens, length = 0.0, 0, 0
    device = module_device(teacher)
    for a in range(0, prompts.shape[0], batch_size):
        p = prompts[a:a + batch_size]
        answers = sample(causal_lm(student), p, max_new_tokens, temperature=0.0)
        keep = answer_mask(answers, eos)
        x = torch.cat([p, answers], dim=1).to(device)
        logp = torch.log_softmax(teacher(input_ids=x[:, :-1], use_cache=False).logits.float(), dim=-1)
        logp = logp[:, p.shape[1] - 1:]  # rows predicting the answer's tokens
        ids = answers.to(device)
        inside = ids < logp.shape[-1]
        lp = torch.where(inside, logp.gather(-1, ids.clamp(max=logp.shape[-1] - 1)[..., None])[..., 0], -100.0)
        total += float(lp.clamp(min=-100.0)[keep.to(device)].sum())
        tokens += int(keep.sum())
        is_eos = sum((answers == e).long() for e in eos) if eos else torch.zeros_like(answers)
        length += int((keep & (is_eos == 0)).sum())
    mean = total / max(tokens, 1)
    return {"gen_teacher_logprob": mean, "gen_teacher_nll": -mean, "gen_length": length / prompts.shape[0],
            "gen_answers": int(prompts.shape[0]), "gen_tokens": tokens}


def generation_scores(student, teacher, prompts: list[torch.Tensor], *, max_new_tokens: int, eos: set[int],
                      batch_size: int = 8) -> dict:
    """:func:`generation_metrics` over prompts of different lengths (a chat set: each conversation up to its
    answer): prompts of one length are batched together; the NLL is the mean over all answer tokens, the length
    the mean over all answers. ``prompts``: 1-D token-id tensors on the student's device."""
    by_length: dict[int, list[torch.Tensor]] = {}
    for p in prompts:
        by_length.setdefault(int(p.shape[0]), []).append(p)
    logprob, tokens, length = 0.0, 0, 0.0
    for group in by_length.values():
        m = generation_metrics(student, teacher, torch.stack(group), max_new_tokens=max_new_tokens, eos=eos,
                               batch_size=batch_size)
        logprob += m["gen_teacher_logprob"] * m["gen_tokens"]
        tokens += m["gen_tokens"]
        length += m["gen_length"] * len(group)
    mean = logprob / max(tokens, 1)
    return {"gen_teacher_nll": -mean, "gen_length": length / max(len(prompts), 1), "gen_answers": len(prompts)}


GATED = {"heldout_loss": 1.0, "top1_agreement": -1.0, "ece": 1.0, "gen_teacher_nll": 1.0}
"""Metrics the promotion gate compares with the champion, and the sign of "worse" (+1: higher is worse)."""


def heldout_digest(shard_keys: Iterable[str], max_windows: int | None = None) -> str:
    """sha256 naming a frozen held-out set: the *sorted* shard keys (a set: where the shards sort in the corpus
    does not matter) and the window cap. Two evaluations with the same digest saw the same windows."""
    payload = {"heldout_shard_keys": sorted(shard_keys), "max_windows": max_windows}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def regressions(candidate: dict, champion: dict) -> dict:
    """How much worse ``candidate`` is than ``champion`` per :data:`GATED` metric (negative = better); a metric
    missing from either side is left out."""
    return {k: sign * (candidate[k] - champion[k]) for k, sign in GATED.items()
            if candidate.get(k) is not None and champion.get(k) is not None}
