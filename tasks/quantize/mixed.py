"""Mixed precision: each layer's bits (16 / 8 / 4) chosen greedily by its KL-to-teacher sensitivity under a
size budget (a fraction of the model's float32 bytes).

Sensitivity of layer ℓ at b bits = KL(teacher ‖ model with only ℓ quantized to b) − KL(teacher ‖ float model),
measured by a caller-given ``kl(model) → float`` on held-out cached targets. The plan starts with every layer
at 4 bits and repeatedly upgrades the layer whose upgrade (4→8 or 8→16) removes the most KL per extra byte,
while the whole model still fits the budget.
"""

from __future__ import annotations

import copy
from typing import Callable

from torch import nn

from raydistill.tasks.quantize.methods import EMBEDDING, apply_plan, layer_bytes, uniform_plan

STEPS = {4: 8, 8: 16}


def _shape(model: nn.Module, name: str) -> tuple[int, int]:
    m = model.get_input_embeddings() if name == EMBEDDING else model.get_submodule(name)
    return tuple(m.weight.shape)


def plan_bytes(model: nn.Module, plan: dict[str, int], group_size: int | None) -> int:
    """Stored bytes of ``model`` under ``plan``: planned weights at their bits, everything else float32."""
    planned = sum(layer_bytes(*_shape(model, n), bits, group_size) for n, bits in plan.items())
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
            apply_plan(trial, {name: bits}, group_size=group_size)
            out[name][bits] = kl(trial) - base
    return out


def greedy_plan(model: nn.Module, sens: dict[str, dict[int, float]], budget: float,
                group_size: int | None) -> dict[str, int]:
    """The plan: all 4 bits, then the best KL-per-byte upgrades that keep ``plan_bytes <= budget · fp32 bytes``."""
    fp32 = sum(4 * p.numel() for p in model.parameters())
    plan = {n: 4 for n in sens}
    limit = budget * fp32
    if plan_bytes(model, plan, group_size) > limit:
        raise ValueError(f"quantize.size_budget={budget} is below the all-int4 size "
                         f"{plan_bytes(model, plan, group_size) / fp32:.3f}; raise it to at least that")
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


def candidate_layers(model: nn.Module) -> list[str]:
    """Layers the plan decides: every linear (incl. ``lm_head``) and an untied embedding."""
    return list(uniform_plan(model, 4))
