"""One gate (tasks/gate.py): Tune's best-trial choice and promotion judge the same metrics the same way,
missing metrics included."""

import itertools

import pytest

from raydistill.tasks.config import ConfigError, GateConfig
from raydistill.tasks.gate import check, violations
from raydistill.workflows import promote
from raydistill.workflows import tune as tune_mod  # imports ray.tune, starts nothing

GATES = [GateConfig(), GateConfig(max_heldout_loss=4.0, min_top1_agreement=0.3),
         GateConfig(max_kl_to_teacher=1.0), GateConfig(max_kl_to_teacher=1.0, min_top1_agreement=0.5)]
VALUES = {"heldout_loss": (None, 3.0, 4.0, 9.0), "top1_agreement": (None, 0.05, 0.3, 0.5),
          "kl_to_teacher": (None, 0.5, 1.0, 2.0)}


def all_metrics():
    """Every combination of missing / passing / boundary / failing values of the gated metrics."""
    for combo in itertools.product(*VALUES.values()):
        yield dict(zip(VALUES, combo))
    yield {}  # nothing at all
    yield {"heldout_loss": 3.0}  # a trial whose evaluation reported only its loss


@pytest.mark.parametrize("gate", GATES, ids=lambda g: f"loss{g.max_heldout_loss}-agr{g.min_top1_agreement}"
                                                     f"-kl{g.max_kl_to_teacher}")
def test_tune_and_promote_agree_on_every_combination_of_metrics(gate):
    judged = 0
    for metrics in all_metrics():
        promoted, reasons = promote.check_gate(metrics, gate)
        tune_ok = not tune_mod.gate_violations(metrics, gate)
        assert tune_ok is promoted, (metrics, reasons, tune_mod.gate_violations(metrics, gate))
        judged += 1
    assert judged == 4 ** 3 + 2


def test_a_missing_metric_fails_both_callers_and_says_which():
    gate = GateConfig(max_kl_to_teacher=1.0)
    metrics = {"heldout_loss": 3.0, "top1_agreement": 0.5}  # no KL
    assert tune_mod.gate_violations(metrics, gate) == ["kl_to_teacher missing from the version's metrics"]
    passed, reasons = promote.check_gate(metrics, gate)
    assert not passed and "kl_to_teacher missing from the version's metrics" in reasons
    assert check({**metrics, "kl_to_teacher": None}, gate)[0] is False  # None is missing too


def test_tune_never_picks_a_trial_promotion_would_refuse():
    gate = GateConfig(max_heldout_loss=5.0, min_top1_agreement=0.2)
    trials = [{"trial_id": "a", "heldout_loss": 3.0, "top1_agreement": None},  # lowest loss, no agreement
              {"trial_id": "b", "heldout_loss": 4.0, "top1_agreement": 0.3}]
    best, why = tune_mod.choose_best(trials, gate)
    assert best["trial_id"] == "b" and "1/2 trials passing" in why
    assert promote.check_gate(best, gate)[0] and not promote.check_gate(trials[0], gate)[0]


def test_violations_are_the_failed_reasons_without_the_prefix():
    gate = GateConfig(max_heldout_loss=4.0)
    assert violations({"heldout_loss": 3.0, "top1_agreement": 0.5}, gate) == []
    assert violations({"heldout_loss": 9.0, "top1_agreement": 0.5}, gate) == ["heldout_loss 9 not <= 4.0"]


def test_the_generation_metric_is_gated_at_quantize_and_promote_and_needs_its_prompts():
    gate = GateConfig(gen_prompts=8, max_gen_teacher_nll=3.0, max_gen_nll_regression=0.1)
    good = {"heldout_loss": 3.0, "top1_agreement": 0.5, "gen_teacher_nll": 2.5}
    assert check(good, gate)[0] and "gen_teacher_nll 2.5 <= 3.0" in check(good, gate)[1]
    assert violations({**good, "gen_teacher_nll": 3.5}, gate) == ["gen_teacher_nll 3.5 not <= 3.0"]
    assert violations({k: v for k, v in good.items() if k != "gen_teacher_nll"}, gate) == [
        "gen_teacher_nll missing from the version's metrics"]
    champion = {**good, "gen_teacher_nll": 2.0}
    passed, reasons = check(good, gate, champion)
    assert not passed and any(r.startswith("FAILED: gen_teacher_nll 2.5 is worse than the champion's 2")
                              for r in reasons)
    assert check(good, gate, {**good, "gen_teacher_nll": 2.45})[0]  # within the 0.1 margin
    assert check(good, GateConfig(), champion)[0]  # not compared unless asked
    # Tune's trials do not score the gate's prompts: the generation check is quantize's and promote's
    assert tune_mod.gate_violations({"heldout_loss": 3.0, "top1_agreement": 0.5}, gate) == []
    with pytest.raises(ConfigError, match="registry.gate.gen_prompts=8, or max_gen_teacher_nll=null"):
        GateConfig(max_gen_teacher_nll=3.0)
