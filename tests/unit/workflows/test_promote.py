"""workflows.promote's gate: a pure function of a version's metrics, the gate config and the champion's metrics."""

import pytest

from raydistill.tasks.config import GateConfig
from raydistill.workflows.promote import check_gate


@pytest.mark.parametrize("metrics,champion,gate,ok", [
    ({"heldout_loss": 3.0, "top1_agreement": 0.5}, None, GateConfig(), True),
    ({"heldout_loss": 9.0, "top1_agreement": 0.5}, None, GateConfig(), False),
    ({"heldout_loss": 3.0, "top1_agreement": 0.05}, None, GateConfig(), False),
    ({"heldout_loss": 3.0}, None, GateConfig(), False),
    ({"heldout_loss": 3.0, "top1_agreement": 0.5, "kl_to_teacher": 2.0}, None,
     GateConfig(max_kl_to_teacher=1.0), False),
    ({"heldout_loss": 3.0, "top1_agreement": 0.5}, {"heldout_loss": 2.9},
     GateConfig(require_better_than_champion=True), False),
    ({"heldout_loss": 3.0, "top1_agreement": 0.5}, {"heldout_loss": 3.1},
     GateConfig(require_better_than_champion=True), True),
])
def test_the_gate_passes_only_when_every_threshold_holds(metrics, champion, gate, ok):
    passed, reasons = check_gate(metrics, gate, champion)
    assert passed is ok and reasons
    assert any(r.startswith("FAILED") or "missing" in r for r in reasons) is (not ok)


CHAMPION = {"heldout_loss": 3.0, "top1_agreement": 0.5, "ece": 0.10}


@pytest.mark.parametrize("candidate,failed", [
    ({"heldout_loss": 3.04, "top1_agreement": 0.49, "ece": 0.11}, []),  # within every margin
    ({"heldout_loss": 3.10, "top1_agreement": 0.50, "ece": 0.10}, ["heldout_loss"]),
    ({"heldout_loss": 3.00, "top1_agreement": 0.45, "ece": 0.10}, ["top1_agreement"]),
    ({"heldout_loss": 3.00, "top1_agreement": 0.50, "ece": 0.15}, ["ece"]),
    ({"heldout_loss": 2.50, "top1_agreement": 0.70, "ece": 0.01}, []),  # better everywhere
])
def test_a_regression_beyond_the_margin_against_the_champion_fails_the_gate(candidate, failed):
    passed, reasons = check_gate(candidate, GateConfig(), CHAMPION)
    assert passed is (not failed)
    assert sorted(r.split()[1] for r in reasons if r.startswith("FAILED")) == failed
    assert all("worse than the champion's" in r and "more than" in r for r in reasons if r.startswith("FAILED"))


def test_without_champion_comparison_only_the_absolute_thresholds_count():
    worse = {"heldout_loss": 5.0, "top1_agreement": 0.2, "ece": 0.5}
    assert check_gate(worse, GateConfig(compare_to_champion=False), CHAMPION)[0]
    assert not check_gate(worse, GateConfig(), CHAMPION)[0]
    assert not check_gate({"heldout_loss": 3.0, "top1_agreement": 0.5}, GateConfig(), CHAMPION)[0]  # no ece


def test_the_heldout_digest_names_a_set_of_shards_whatever_their_order():
    from raydistill.tasks.evaluate import heldout_digest, regressions

    assert heldout_digest(["b", "a"]) == heldout_digest(["a", "b"]) != heldout_digest(["a", "b", "c"])
    assert heldout_digest(["a"], 4) != heldout_digest(["a"])
    assert regressions({"heldout_loss": 3.5, "top1_agreement": 0.4, "ece": None}, CHAMPION) == \
        pytest.approx({"heldout_loss": 0.5, "top1_agreement": 0.1})
