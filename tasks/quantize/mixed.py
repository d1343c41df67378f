"""Mixed precision: each layer's bits (16 / 8 / 4) chosen greedily by its KL-to-teacher sensitivity under a
size budget (a fraction of the model's float32 bytes).

Sensitivity of layer ℓ at b bits = KL(teacher ‖ model with only ℓ quantized to b) − KL(teacher ‖ float model),
measured by a caller-given ``kl(model) → float`` on held-out cached targets. int8 layers here are per channel
(one scale per output row, as ``int8_dynamic``'s), int4 layers group-wise: so "every layer int8" costs exactly
uniform int8's bytes, and a plan at that size can only differ from it by trading int4 layers for bf16 ones.

:func:`plan_for_budget` (what the quantize stage uses) minimises the summed sensitivities (bf16 counts 0)
under the budget exactly — a multiple-choice knapsack over bytes; :func:`greedy_plan` is the older greedy
(all 4 bits, then the best KL-per-byte upgrade while it fits), which can stop with a large layer (``lm_head``)
stuck at 4 bits because its upgrade no longer fits.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from raydistill.tasks.quantize.methods import EMBEDDING, head_name, apply_plan, is_tied, layer_bytes, uniform_plan

STEPS = {4: 8, 8: 16}
INT8_GROUP_SIZE = None  # mixed's int8 layers: one scale per output row


def _shape(model: nn.Module, name: str) -> tuple[int, int]:
    m = model.get_input_embeddings() if name == EMBEDDING else model.get_submodule(name)
    return tuple(m.weight.shape)


def _cost(model: nn.Module, name: str, bits: int, group_size: int | None) -> int:
    """Stored bytes of one planned weight, as :func:`apply_plan` writes it: an untied embedding left at 16 stays
    float32; a tied ``lm_head`` at 16 becomes bf16 while the embedding keeps its float32 copy (both stored)."""
    out, n = _shape(model, name)
    if bits == 16 and name == EMBEDDING:
        return 4 * out * n
    extra = 4 * out * n if bits == 16 and is_tied(model) and name == head_name(model) else 0
    return extra + layer_bytes(out, n, bits, INT8_GROUP_SIZE if bits == 8 else group_size)


def plan_bytes(model: nn.Module, plan: dict[str, int], group_size: int | None) -> int:
    """Stored bytes of ``model`` under ``plan``: planned weights at their bits, everything else float32."""
    planned = sum(_cost(model, n, bits, group_size) for n, bits in plan.items())
    shared = {id(p) for n in plan for p in [(model.get_input_embeddings() if n == EMBEDDING
                                             else model.get_submodule(n)).weight]}
    rest = sum(4 * p.numel() for p in model.parameters() if id(p) not in shared)
    return planned + rest


def sensitivities(model: nn.Module, kl: Callable[[nn.Module], float], group_size: int | None,
                  names: list[str]) -> dict[str, dict[int, float]]:
    """``{layer: {bits: KL increase}}`` for 8 and 4 bits, one layer quantized at a time (on copies)."""
    base = kl(model)
    out = {}
    for name in names:
        out[name] = {}
        for bits in (8, 4):
            trial = copy.deepcopy(model)
            apply_plan(trial, {name: bits}, group_size=group_size, int8_group_size=INT8_GROUP_SIZE)
            out[name][bits] = kl(trial) - base
    return out


def greedy_plan(model: nn.Module, sens: dict[str, dict[int, float]], budget: float,
                group_size: int | None) -> dict[str, int]:
    """The plan: all 4 bits, then the best KL-per-byte upgrades that keep ``plan_bytes <= budget · fp32 bytes``."""
    plan = {n: 4 for n in sens}
    limit = _limit(model, plan, budget, group_size)
    while True:
        best, best_gain = None, 0.0
        for name, bits in plan.items():
            if bits not in STEPS:
                continue
            up = STEPS[bits]
            trial = {**plan, name: up}
            extra = plan_bytes(model, trial, group_size) - plan_bytes(model, plan, group_size)
            if plan_bytes(model, trial, group_size) > limit:
                continue
            gain = (sens[name].get(bits, 0.0) - sens[name].get(up, 0.0)) / max(extra, 1)
            if best is None or gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            return plan
        plan[best] = STEPS[plan[best]]


def _limit(model: nn.Module, low: dict[str, int], budget: float, group_size: int | None) -> float:
    """``budget`` · fp32 bytes, checked to hold the all-int4 plan ``low``."""
    fp32 = sum(4 * p.numel() for p in model.parameters())
    if plan_bytes(model, low, group_size) > budget * fp32:
        raise ValueError(f"quantize.size_budget={budget} is below the all-int4 size "
                         f"{plan_bytes(model, low, group_size) / fp32:.3f}; raise it to at least that")
    return budget * fp32


def plan_for_budget(model: nn.Module, sens: dict[str, dict[int, float]], budget: float, group_size: int | None,
                    steps: int = 100_000) -> dict[str, int]:
    """The plan of lowest summed sensitivity (bf16: 0) with ``plan_bytes <= budget · fp32 bytes``: an exact
    multiple-choice knapsack (bytes rounded up to ``1/steps`` of the room left for the planned weights)."""
    names = list(sens)
    low = {n: 4 for n in names}
    limit = _limit(model, low, budget, group_size)
    cost = {n: {b: _cost(model, n, b, group_size) for b in (4, 8, 16)} for n in names}
    room = limit - plan_bytes(model, low, group_size) + sum(c[4] for c in cost.values())
    unit = room / steps
    units = {n: {b: math.ceil(c / unit) for b, c in cost[n].items()} for n in names}
    best = torch.full((steps + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0  # best[u]: lowest summed KL of the layers so far using exactly u units
    picks = []
    for n in names:
        new, pick = torch.full_like(best, math.inf), torch.zeros(steps + 1, dtype=torch.long)
        for bits in (4, 8, 16):
            w = units[n][bits]
            if w > steps:
                continue
            cand = torch.full_like(best, math.inf)
            cand[w:] = best[:steps + 1 - w] + (0.0 if bits == 16 else sens[n][bits])
            better = cand < new
            new, pick = torch.where(better, cand, new), torch.where(better, bits, pick)
        picks.append(pick)
        best = new
    if math.isinf(best.min().item()):
        return low  # the all-int4 plan fits but its rounded-up units do not: nothing to trade
    u, plan = int(best.argmin()), {}
    for n, pick in zip(reversed(names), reversed(picks)):
        plan[n] = int(pick[u])
        u -= units[n][plan[n]]
    return {n: plan[n] for n in names}


def candidate_layers(model: nn.Module) -> list[str]:
    """Layers the plan decides: every linear (incl. ``lm_head``) and an untied embedding."""
    return list(uniform_plan(model, 4))
