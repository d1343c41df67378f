"""The registry's quality gate (``registry.gate``), one pure function for every caller.

    from raydistill.tasks.gate import check, violations
    passed, reasons = check({"heldout_loss": 3.1, "top1_agreement": 0.4}, cfg.registry.gate)  # promote
    violations(trial_metrics, cfg.registry.gate)         # Tune's best trial, the quantize stage's candidates

Promotion (``workflows.promote``), Tune's best-trial choice (``workflows.tune``) and the quantize stage's
choice all judge with :func:`check`, so a model they pick is one promotion accepts. A metric the gate needs
and the model lacks (missing or ``None``) fails it, everywhere: a trial whose evaluation produced no top-1
agreement is not "passing by default" in Tune and then refused at promote.

Absolute thresholds: held-out loss ≤ ``max_heldout_loss``, top-1 agreement with the teacher ≥
``min_top1_agreement``, KL to the teacher ≤ ``max_kl_to_teacher`` and the teacher's NLL of the model's greedy
answers ≤ ``max_gen_teacher_nll`` (each when set). Against a champion (its metrics on the *same* held-out set,
only promote has them): no regression beyond ``max_loss_regression`` / ``max_agreement_regression`` /
``max_ece_regression`` / ``max_gen_nll_regression`` (when ``compare_to_champion``; the last when set), and a
strictly lower loss with ``require_better_than_champion``.
"""

from __future__ import annotations

from raydistill.tasks.config import GateConfig
from raydistill.tasks.evaluate import regressions

FAILED = "FAILED: "


def check(metrics: dict, gate: GateConfig, champion: dict | None = None) -> tuple[bool, list[str]]:
    """``(passed, reasons)``; each reason says which check failed or passed and with what numbers (a failed
    one starts with ``FAILED:`` or says the metric is missing). ``champion``: the champion's metrics on the same
    held-out set (None: no champion, absolute checks only)."""
    reasons, passed = [], True

    def need(name: str, ok, text: str):
        nonlocal passed
        value = metrics.get(name)
        if value is None:
            passed = False
            reasons.append(f"{name} missing from the version's metrics")
        elif ok(value):
            reasons.append(f"{name} {value:.4g} {text}")
        else:
            passed = False
            reasons.append(f"{FAILED}{name} {value:.4g} not {text}")

    need("heldout_loss", lambda v: v <= gate.max_heldout_loss, f"<= {gate.max_heldout_loss}")
    need("top1_agreement", lambda v: v >= gate.min_top1_agreement, f">= {gate.min_top1_agreement}")
    if gate.max_kl_to_teacher is not None:
        need("kl_to_teacher", lambda v: v <= gate.max_kl_to_teacher, f"<= {gate.max_kl_to_teacher}")
    if gate.max_gen_teacher_nll is not None:
        need("gen_teacher_nll", lambda v: v <= gate.max_gen_teacher_nll, f"<= {gate.max_gen_teacher_nll}")
    if champion and gate.compare_to_champion:
        passed = _against_champion(metrics, gate, champion, reasons) and passed
    if gate.require_better_than_champion and champion and champion.get("heldout_loss") is not None:
        best = champion["heldout_loss"]
        need("heldout_loss", lambda v: v < best, f"< champion's {best:.4g}")
    return passed, reasons


def _against_champion(metrics: dict, gate: GateConfig, champion: dict, reasons: list[str]) -> bool:
    passed = True
    margins = {"heldout_loss": gate.max_loss_regression, "top1_agreement": gate.max_agreement_regression,
               "ece": gate.max_ece_regression}
    if gate.max_gen_nll_regression is not None:
        margins["gen_teacher_nll"] = gate.max_gen_nll_regression
    worse = regressions(metrics, champion)
    for name, margin in margins.items():
        if champion.get(name) is None:
            continue
        if name not in worse:
            passed = False
            reasons.append(f"{name} missing from the version's metrics (the champion has it)")
        elif worse[name] <= margin:
            reasons.append(f"{name} {metrics[name]:.4g} vs the champion's {champion[name]:.4g}: regression "
                           f"{worse[name]:+.4g} within {margin}")
        else:
            passed = False
            reasons.append(f"{FAILED}{name} {metrics[name]:.4g} is worse than the champion's "
                           f"{champion[name]:.4g} by {worse[name]:.4g} (more than {margin})")
    return passed


def violations(metrics: dict, gate: GateConfig) -> list[str]:
    """The gate's absolute checks that ``metrics`` fail (a missing metric included); ``[]`` = it passes
    (the champion comparison needs the champion's metrics on the same set: promote's)."""
    passed, reasons = check(metrics, gate)
    return [] if passed else [r.removeprefix(FAILED) for r in reasons if r.startswith(FAILED) or "missing" in r]
