"""The on-policy phase through Ray Train + DeepSpeed on the tiny cache: 2 workers (ZeRO-2) take the scheduled
on-policy steps (teacher in-process in each worker), MLflow gets each step's ``on_policy`` flag and the
teacher-scored generation metric at each report, and a continuation under the same run name resumes from the
checkpoint with the same schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from raydistill.tasks.config import load_config

pytestmark = pytest.mark.integration


def test_on_policy_steps_train_under_ray_train_and_deepspeed_log_to_mlflow_and_resume(tiny_cached, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    from raydistill.workflows import stage, train

    cfg = load_config("tiny", [f"run_dir={tiny_cached.run_dir}",  # the train verb needs the cache stage's record
                               "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2",
                               "train.on_policy.fraction=0.5", "train.on_policy.prompt_tokens=16",
                               "train.on_policy.max_new_tokens=8", "train.on_policy.eval_prompts=4"])
    out = train.run(cfg)
    m = out["metrics"]
    assert m["step"] == 4 and m["on_policy"] == 0.5  # the mean over the window of steps 3-4
    for key in ("gen_teacher_nll", "gen_length"):
        assert key in m and key in m["init"]
    assert 0 < m["gen_length"] <= 8 and m["gen_teacher_nll"] > 0
    text = "".join(capfd.readouterr())
    assert "on-policy 0.5 of steps after 0" in text and "gen_teacher_nll" in text

    client = MlflowClient(cfg.tracking_uri)
    flags = sorted((h.step, h.value) for h in client.get_metric_history(out["mlflow_run_id"], "on_policy"))
    assert flags == [(1, 0.0), (2, 1.0), (3, 0.0), (4, 1.0)]
    assert [h.step for h in client.get_metric_history(out["mlflow_run_id"], "gen_teacher_nll")] == [2, 4]

    again = train.train_driver(cfg, run_name=f"train-{stage.key(cfg, 'train')[:12]}",
                               storage_path=str(Path(cfg.run_dir, "train", "ray").resolve()), steps=6,
                               output_dir=str(tmp_path / "resumed"), mlflow_run_id=out["mlflow_run_id"])
    assert again["steps"] == 6 and "resuming at step 4" in "".join(capfd.readouterr())
    flags = sorted((h.step, h.value) for h in client.get_metric_history(out["mlflow_run_id"], "on_policy"))
    assert flags == [(s, float(s % 2 == 0)) for s in range(1, 7)]  # each step once, the schedule kept


@pytest.mark.slow
def test_on_policy_steps_under_zero3_keep_every_ranks_forwards_in_step(tiny_cached, tmp_path):
    """ZeRO-3 gathers parameters in collective forwards: the fixed-length sampling and the same held-out prompts
    on both ranks keep them in step (a rank sampling fewer tokens would hang the other)."""
    from raydistill.workflows import train

    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"cache.dir={tiny_cached.cache_dir}",
                               "train.zero_stage=3", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                               "train.on_policy.fraction=1.0", "train.on_policy.start_step=1",
                               "train.on_policy.max_new_tokens=4", "train.on_policy.eval_prompts=2"])
    out = train.train_driver(cfg, run_name="zero3-onpolicy", storage_path=str(tmp_path / "ray"))
    assert out["steps"] == 2 and out["metrics"]["on_policy"] == 0.5 and "gen_teacher_nll" in out["metrics"]
