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
