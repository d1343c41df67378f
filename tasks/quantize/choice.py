"""Which quantized candidate the quantize stage keeps, reproducibly: the same inputs choose the same method.

Timing is the one noisy input (the machine's load moves tokens/s by tens of %), so it decides only when it is
beyond its own measured noise, and only between candidates equal on what is measured exactly:

1. the candidates that pass the gate (:mod:`raydistill.tasks.gate`) within ``quantize.size_budget``;
2. the smallest of them — sizes within :data:`SIZE_TOLERANCE` count as one size (``gptq``, ``qad`` and
   ``int4_weight_only`` share a layout and differ by a few bytes of metadata);
3. among those, the lowest KL to the teacher — KLs within :data:`KL_TOLERANCE` (relative) count as one;
4. among *those*, one whose every timing round was faster than every round of the lowest-KL one wins
   (its slowest round beats the other's fastest); otherwise the lowest KL, then the method name.

Size and KL come from deterministic computations on fixed inputs (the stored file; the evaluation on the
cache's held-out windows), so steps 1–3 give the same answer on every run; step 4 needs a speed gap larger
than the spread of interleaved rounds (:func:`interleaved_speeds`), so noise alone cannot flip it.
Without a candidate in budget: the smallest that passes the gate; without one passing: the lowest KL (the
gate then refuses it at promote, as it should).
"""

from __future__ import annotations

import statistics
import time

import torch

SIZE_TOLERANCE = 0.01
KL_TOLERANCE = 0.01


def interleaved_speeds(models: dict, ids: torch.Tensor, rounds: int) -> dict[str, dict]:
    """``{name: {"tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "tokens_per_s_spread"}}`` of one
    forward on ``ids`` ``(batch, seq)`` per model per round, the models timed in turn each round (after one
    warm-up each), so that a change of machine load hits them all alike. ``spread`` = (max − min) / median;
    ``tokens_per_s_rounds``: every round's figure, in round order (round ``r`` of two models was timed together)."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(input_ids=ids[:1], use_cache=False)
        for _ in range(rounds):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                times[name].append(ids.numel() / (time.perf_counter() - t0))
    out = {}
    for name, speeds in times.items():
        mid = statistics.median(speeds)
        out[name] = {"tokens_per_s": mid, "tokens_per_s_min": min(speeds), "tokens_per_s_max": max(speeds),
                     "tokens_per_s_spread": (max(speeds) - min(speeds)) / mid, "speed_rounds": len(speeds),
                     "tokens_per_s_rounds": speeds}
    return out


def faster_beyond_noise(a: dict, b: dict) -> bool:
    """Whether ``a``'s slowest timing round was faster than ``b``'s fastest."""
    lo, hi = a.get("tokens_per_s_min"), b.get("tokens_per_s_max")
    return lo is not None and hi is not None and lo > hi


def _kl(r: dict) -> float:
    return r["kl_to_teacher"] if r.get("kl_to_teacher") is not None else float("inf")


def choose(rows: dict[str, dict]) -> tuple[str, str]:
    """``(method, why)`` from candidate rows holding ``gate_passed``, ``within_budget``, ``size_bytes``,
    ``kl_to_teacher`` and the timing fields of :func:`interleaved_speeds` (see the module doc)."""
    ok = [r for r in rows.values() if r["gate_passed"] and r["within_budget"]]
    if not ok:
        passing = [r for r in rows.values() if r["gate_passed"]]
        if passing:
            best = min(passing, key=lambda r: (r["size_bytes"], _kl(r), r["method"]))
            return best["method"], "no method passes the gate within quantize.size_budget: the smallest that passes"
        best = min(rows.values(), key=lambda r: (_kl(r), r["method"]))
        return best["method"], "no method passes the gate: the lowest KL to the teacher"
    smallest = min(r["size_bytes"] for r in ok)
    same_size = [r for r in ok if r["size_bytes"] <= smallest * (1 + SIZE_TOLERANCE)]
    best_kl = min(_kl(r) for r in same_size)
    same = sorted([r for r in same_size if _kl(r) <= best_kl * (1 + KL_TOLERANCE)], key=lambda r: (_kl(r), r["method"]))
    best = same[0]
    faster = [r for r in same[1:] if faster_beyond_noise(r, best)]
    why = [f"passes the gate within quantize.size_budget ({len(ok)} of {len(rows)} do)",
           _size_words(best, same_size, ok), _kl_words(best, same_size, same)]
    if faster:
        winner = max(faster, key=lambda r: (r["tokens_per_s_min"], r["method"]))
        why.append(f"{winner['method']} is as small and as close to the teacher and faster in every timing round "
                   f"({winner['tokens_per_s_min']:.0f} vs {best['tokens_per_s_max']:.0f} tokens/s)")
        return winner["method"], "; ".join(why)
    if len(same) > 1:
        why.append(f"speed did not decide: {', '.join(r['method'] for r in same[1:])} not faster beyond the "
                   "spread of the timing rounds")
    return best["method"], "; ".join(why)


def _size_words(best: dict, same_size: list, ok: list) -> str:
    others = [r["method"] for r in same_size if r is not best]
    text = f"the smallest: {best['size_bytes'] / 2**20:.2f} MB" + (f" ({', '.join(others)} the same size)"
                                                                   if others else "")
    larger = [r for r in ok if r not in same_size]
    if larger:
        nxt = min(larger, key=lambda r: r["size_bytes"])
        text += f", next {nxt['method']} {nxt['size_bytes'] / 2**20:.2f} MB"
    return text


def _kl_words(best: dict, same_size: list, same: list) -> str:
    rivals = [r for r in same_size if r is not best]
    if not rivals:
        return f"KL to the teacher {_kl(best):.4f}"
    nxt = min(rivals, key=_kl)
    tie = ", within 1 %: the same quality" if nxt in same else ""
    return f"the lowest KL to the teacher of those: {_kl(best):.4f} ({nxt['method']} {_kl(nxt):.4f}{tie})"
