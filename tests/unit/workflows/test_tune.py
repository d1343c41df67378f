"""Tune's search space and ASHA's budget, counted in the reports a trial makes (no Ray cluster)."""

from __future__ import annotations

import pytest

from raydistill.tasks.config import load_config
from raydistill.tasks.trainloop import report_steps
from raydistill.workflows import tune as tune_mod  # imports ray.tune (a few seconds), starts nothing


def test_the_search_space_samples_the_tuned_train_fields():
    cfg = load_config("tiny", ["tune.alpha=[0.2,0.5]", "tune.temperature=[1.0]", "tune.lr=[1e-4,1e-2]",
                               "tune.loss=[forward_kl,reverse_kl]"])
    space = tune_mod.param_space(cfg)
    assert set(space) == set(tune_mod.TUNED_FIELDS)
    assert space["alpha"].categories == [0.2, 0.5] and space["temperature"].categories == [1.0]
    assert space["loss"].categories == ["forward_kl", "reverse_kl"]
    assert (space["lr"].lower, space["lr"].upper) == (1e-4, 1e-2)
    assert all(1e-4 <= space["lr"].sample() <= 1e-2 for _ in range(20))
    assert tune_mod.param_space(load_config("tiny", ["tune.lr=[3e-4,3e-4]"]))["lr"] == 3e-4  # fixed, not sampled
    tuned = tune_mod.apply_params(cfg, {"alpha": 0.5, "temperature": 1.0, "lr": 2e-3, "loss": "reverse_kl",
                                        "other": 1})
    assert (tuned.train.alpha, tuned.train.lr, tuned.train.loss) == (0.5, 2e-3, "reverse_kl")


@pytest.mark.parametrize("overrides,reports", [
    (["tune.steps=40", "train.eval_every=20", "train.checkpoint_every=20"], [20, 40]),
    (["tune.steps=40", "train.eval_every=20", "train.checkpoint_every=15"], [15, 20, 30, 40]),
    (["tune.steps=7", "train.eval_every=2", "train.checkpoint_every=3"], [2, 3, 4, 6, 7]),
    (["tune.steps=5", "train.eval_every=20", "train.checkpoint_every=20"], [5]),
])
def test_asha_max_t_sits_one_past_the_last_report_train_makes(overrides, reports):
    """checkpoint_every adds reports too: counting only evals put max_t on the last report (a trial stopped by
    Tune mid-export)."""
    cfg = load_config("tiny", [*overrides, "tune.grace_period=3"])
    assert report_steps(cfg.train, cfg.tune.steps) == reports
    max_t, grace = tune_mod.asha_limits(cfg)
    assert max_t == len(reports) + 1
    assert grace == min(3, len(reports))
