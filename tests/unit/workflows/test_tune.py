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


def test_lora_rank_alpha_and_student_layers_are_searched_only_when_listed_and_applied_to_the_student():
    plain = tune_mod.param_space(load_config("tiny"))
    assert not set(plain) & set(tune_mod.OPTIONAL_FIELDS)
    cfg = load_config("tiny", ["student.peft.method=lora", "tune.lora_r=[4,8]", "tune.lora_alpha=[8,16]",
                               "tune.student_layers=[[0],[0,1]]"])
    space = tune_mod.param_space(cfg)
    assert space["lora_r"].categories == [4, 8] and space["lora_alpha"].categories == [8, 16]
    assert space["student_layers"].categories == ["0", "0,1"]  # Optuna's categorical takes only scalars
    tuned = tune_mod.apply_params(cfg, {"alpha": 0.2, "temperature": 1.0, "lr": 1e-3, "loss": "forward_kl",
                                        "lora_r": 4, "lora_alpha": 8, "student_layers": "0,1"})
    assert (tuned.student.peft.r, tuned.student.peft.lora_alpha, tuned.student.layers) == (4, 8, [0, 1])
    assert tune_mod.searched({"lr": 1e-3, "lora_r": 4, "other": 1}) == {"lr": 1e-3, "lora_r": 4}


def test_lora_search_without_a_lora_student_is_refused_naming_the_fix():
    from raydistill.tasks.config import ConfigError

    with pytest.raises(ConfigError, match="student.peft.method=lora"):
        load_config("tiny", ["tune.lora_r=[4,8]"])


def _first_suggestions(cfg, n=4):
    search = tune_mod.searcher(cfg)
    assert search.set_search_properties(tune_mod.METRIC, tune_mod.MODE, tune_mod.param_space(cfg))
    return [search.suggest(f"t{i}") for i in range(n)]


def test_optuna_search_with_the_same_seed_suggests_the_same_first_trials():
    from ray.tune.search.optuna import OptunaSearch

    overrides = ["tune.search=optuna", "tune.alpha=[0.1,0.5,0.9]", "tune.lr=[1e-5,1e-2]",
                 "tune.optuna_startup_trials=2"]
    cfg = load_config("tiny", [*overrides, "tune.seed=3"])
    assert isinstance(tune_mod.searcher(cfg), OptunaSearch)
    assert tune_mod.searcher(load_config("tiny")) is None  # random: Tune's own sampling
    first = _first_suggestions(cfg)
    assert first == _first_suggestions(load_config("tiny", [*overrides, "tune.seed=3"]))
    assert first != _first_suggestions(load_config("tiny", [*overrides, "tune.seed=4"]))
    assert all(1e-5 <= s["lr"] <= 1e-2 and s["alpha"] in (0.1, 0.5, 0.9) for s in first)


def test_the_best_trial_passes_the_gate_unless_none_does_and_then_it_says_so():
    gate = load_config("tiny", ["registry.gate.max_heldout_loss=5.0", "registry.gate.min_top1_agreement=0.2"]
                       ).registry.gate
    trials = [{"trial_id": "a", "heldout_loss": 4.0, "top1_agreement": 0.1},   # lowest loss, fails agreement
              {"trial_id": "b", "heldout_loss": 4.5, "top1_agreement": 0.3},
              {"trial_id": "c", "heldout_loss": 4.8, "top1_agreement": 0.5},
              {"trial_id": "d", "heldout_loss": None, "error": "boom"}]
    best, why = tune_mod.choose_best(trials, gate)
    assert best["trial_id"] == "b" and "2/3 trials passing" in why
    best, why = tune_mod.choose_best([trials[0], {"trial_id": "e", "heldout_loss": 6.0, "top1_agreement": 0.9}], gate)
    assert best["trial_id"] == "a" and why.startswith("NO trial passes") and "top1_agreement 0.1 not >= 0.2" in why
    assert tune_mod.choose_best([trials[3]], gate) == (None, "no trial reported a held-out loss")


def test_a_retried_trial_finds_its_own_mlflow_child_run_by_trial_id(tiny_cfg):
    """Tune's retry of a trial resumes the child run the first attempt started (sqlite store, no server)."""
    from raydistill.workflows import tracking

    with tracking.start_run(tiny_cfg, "tune") as parent:
        pid = parent.info.run_id
    ids = {}
    for trial in ("aaa_00000", "bbb_00001"):
        with tracking.start_run(tiny_cfg, f"trial-{trial}", parent_run_id=pid,
                                tags={"raydistill.trial_id": trial}) as run:
            ids[trial] = run.info.run_id
    assert tracking.find_child_run(tiny_cfg, pid, "raydistill.trial_id", "bbb_00001") == ids["bbb_00001"]
    assert tracking.find_child_run(tiny_cfg, pid, "raydistill.trial_id", "ccc_00002") is None
    assert {r["run_id"] for r in tracking.child_runs(tiny_cfg, pid)} == set(ids.values())
