"""Job submission: ids make resubmission resume, never double a running attempt; the config travels."""

from types import SimpleNamespace

import pytest
import yaml

from raydistill.tasks.config import load_config
from raydistill.workflows.submit import build_job, next_submission_id, submission_prefix


def _job(sid, status):
    return SimpleNamespace(submission_id=sid, status=f"JobStatus.{status}")


def test_first_attempt_then_next():
    assert next_submission_id([], "raydistill-train-abc") == "raydistill-train-abc-1"
    jobs = [_job("raydistill-train-abc-1", "FAILED"), _job("raydistill-train-abc-2", "STOPPED"),
            _job("raydistill-train-zzz-7", "RUNNING"), _job("other", "RUNNING")]
    assert next_submission_id(jobs, "raydistill-train-abc") == "raydistill-train-abc-3"


def test_running_attempt_is_not_doubled():
    with pytest.raises(SystemExit, match="still RUNNING"):
        next_submission_id([_job("raydistill-train-abc-1", "RUNNING")], "raydistill-train-abc")


def test_prefix_depends_on_resolved_config():
    a, b = load_config("tiny"), load_config("tiny", ["train.lr=0.01"])
    assert submission_prefix(a, "train") == submission_prefix(load_config("tiny"), "train")
    assert submission_prefix(a, "train") != submission_prefix(b, "train")
    assert submission_prefix(a, "train") != submission_prefix(a, "pipeline")


@pytest.mark.parametrize("upload", [False, True])
def test_job_carries_resolved_config(tmp_path, upload):
    cfg = load_config("tiny", ["train.steps=3"])
    job = build_job(cfg, "train", upload, tmp_path)
    assert job["entrypoint"].endswith("train --config config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["steps"] == 3
    assert job["runtime_env"]["working_dir"] == str(tmp_path)
    assert (tmp_path / "workflows" / "cli.py").exists() == upload
