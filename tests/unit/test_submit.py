"""Job submission: ids make resubmission resume, never double a running attempt; the config travels; the verb a
job runs is ``submit.verb``, never the verb the local CLI dispatched on."""

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from raydistill.tasks.config import ConfigError, load_config
from raydistill.tasks.errors import JobError
from raydistill.workflows import cli, submit
from raydistill.workflows.submit import build_job, job_command, next_submission_id, submission_prefix


def _job(sid, status):
    return SimpleNamespace(submission_id=sid, status=f"JobStatus.{status}")


def test_first_attempt_then_next():
    assert next_submission_id([], "raydistill-train-abc") == "raydistill-train-abc-1"
    jobs = [_job("raydistill-train-abc-1", "FAILED"), _job("raydistill-train-abc-2", "STOPPED"),
            _job("raydistill-train-zzz-7", "RUNNING"), _job("other", "RUNNING")]
    assert next_submission_id(jobs, "raydistill-train-abc") == "raydistill-train-abc-3"


def test_running_attempt_is_not_doubled():
    with pytest.raises(JobError, match="still RUNNING"):
        next_submission_id([_job("raydistill-train-abc-1", "RUNNING")], "raydistill-train-abc")


def test_prefix_depends_on_resolved_config_but_not_on_how_it_is_submitted():
    a, b = load_config("tiny"), load_config("tiny", ["train.lr=0.01"])
    assert submission_prefix(a, ["train"]) == submission_prefix(load_config("tiny"), ["train"])
    assert submission_prefix(a, ["train"]) != submission_prefix(b, ["train"])
    assert submission_prefix(a, ["train"]) != submission_prefix(a, ["pipeline"])
    followed = load_config("tiny", ["submit.wait=true", "submit.address=http://h:8265", "submit.timeout_s=5"])
    assert submission_prefix(followed, ["train"]) == submission_prefix(a, ["train"])
    assert submission_prefix(a, ["promote", "rollback"]).startswith("raydistill-promote-rollback-")


@pytest.mark.parametrize("upload", [False, True])
def test_job_carries_resolved_config(tmp_path, upload):
    cfg = load_config("tiny", ["train.steps=3"])
    job = build_job(cfg, ["train"], upload, tmp_path)
    assert job["entrypoint"].endswith("train --config config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["steps"] == 3
    assert job["runtime_env"]["working_dir"] == str(tmp_path)
    assert (tmp_path / "raydistill" / "workflows" / "cli.py").exists() == upload
    assert (tmp_path / "raydistill" / "tasks" / "config.py").exists() == upload
    assert (tmp_path / "raydistill" / "__main__.py").exists() == upload


@pytest.mark.parametrize("verb,fragment", [
    ("trian", "did you mean 'train'"), ("submit", "verbs a job can run"),
    ("promote rolback", "one action of run, rollback"), ("train now", "'train' takes no action"),
])
def test_submitted_verb_is_checked_against_the_verb_table(verb, fragment):
    with pytest.raises(ConfigError, match=fragment):
        job_command(load_config("tiny", [f"submit.verb={verb}"]))
    assert job_command(load_config("tiny", ["submit.verb=promote rollback"])) == ["promote", "rollback"]


class FakeJobs:
    """Stands in for Ray's JobSubmissionClient: records what would be submitted (no network)."""

    def __init__(self, address):
        self.address, self.submitted = address, []

    def list_jobs(self):
        return [_job(s["submission_id"], "SUCCEEDED") for s in self.submitted]

    def submit_job(self, **kwargs):
        config = Path(kwargs["runtime_env"]["working_dir"], "config.yaml")  # gone once submit returns
        self.submitted.append({**kwargs, "config": yaml.safe_load(config.read_text())})


@pytest.mark.parametrize("verb", ["train", "cache inspect", "pipeline"])
def test_cli_submit_ships_submit_verb_and_runs_nothing_else_locally(monkeypatch, tmp_path, verb, capsys):
    clients = []
    monkeypatch.setattr(submit, "jobs_client", lambda address: clients.append(FakeJobs(address)) or clients[-1])
    ran_locally = []
    real_import = cli.importlib.import_module
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda name: ran_locally.append(name) or real_import(name))
    argv = ["submit", "--config", "tiny", f"run_dir={tmp_path}", "submit.address=http://head:8265",
            f"submit.verb={verb}"]
    assert cli.main(argv) == 0
    assert ran_locally == ["raydistill.workflows.submit"]
    (client,) = clients
    (job,) = client.submitted
    assert client.address == "http://head:8265"
    assert job["entrypoint"] == f"raydistill {verb} --config config.yaml"
    assert job["metadata"]["raydistill.verb"] == verb
    assert job["submission_id"].startswith(f"raydistill-{verb.replace(' ', '-')}-")
    assert "submitted raydistill-" in capsys.readouterr().out


def test_job_metadata_masks_a_password_in_the_run_dir(monkeypatch, capsys):
    clients = []
    monkeypatch.setattr(submit, "jobs_client", lambda address: clients.append(FakeJobs(address)) or clients[-1])
    argv = ["submit", "--config", "tiny", "run_dir=s3://alice:hunter2@store:9000/runs/x",
            "submit.address=http://admin:dashpass42@head:8265"]
    assert cli.main(argv) == 0
    (job,) = clients[0].submitted
    assert "hunter2" not in str(job["metadata"])
    assert job["metadata"]["raydistill.run_dir"].startswith("s3://alice:")
    assert clients[0].address == "http://admin:dashpass42@head:8265"  # the client itself needs it
    out = capsys.readouterr()
    assert "submit.address=http://admin:***@head:8265" in out.out and "dashpass42" not in out.out + out.err


def test_cli_submit_without_address_is_a_config_error(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main(["submit", "--config", "tiny"]) == 2
    assert "submit.address" in capsys.readouterr().err


def test_a_submitted_config_keeps_its_paths_for_the_cluster_to_resolve(monkeypatch, tmp_path):
    client = FakeJobs("http://head:8265")
    monkeypatch.setattr(submit, "jobs_client", lambda address: client)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["submit", "--config", "tiny", "run_dir=runs/x", "submit.address=http://head:8265"]) == 0
    (job,) = client.submitted
    assert job["config"]["run_dir"] == "runs/x" and job["config"]["submit"]["verb"] == "pipeline"
    assert job["entrypoint"] == "raydistill pipeline --config config.yaml"


def test_cli_submit_to_an_address_nothing_listens_on_is_a_clear_error(monkeypatch, capsys):
    """A real Jobs client against a closed port on this machine: a message naming submit.address, exit 1."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["submit", "--config", "tiny", f"submit.address=http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"submit.address='http://127.0.0.1:{port}'" in err and "Traceback" not in err


def test_the_token_is_sent_from_ray_auth_token_or_its_file(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert submit.auth_headers() == {}  # Ray's own default (~/.ray/auth_token under RAY_AUTH_MODE=token)
    (tmp_path / "tok").write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert submit.auth_headers() == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")  # Ray's precedence: the variable, then the file
    assert submit.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(JobError, match="RAY_AUTH_TOKEN_PATH"):
        submit.auth_headers()


class FakeJobInfo(SimpleNamespace):
    pass


class FakeCluster(FakeJobs):
    """FakeJobs plus what ``raydistill job`` asks: info, logs, stop."""

    def __init__(self, address):
        super().__init__(address)
        self.status, self.stopped = {}, []

    def list_jobs(self):
        return [FakeJobInfo(submission_id=s["submission_id"], status=self.status[s["submission_id"]],
                            start_time=i, end_time=None, message="", metadata=s["metadata"])
                for i, s in enumerate(self.submitted)]

    def submit_job(self, **kwargs):
        super().submit_job(**kwargs)
        self.status[kwargs["submission_id"]] = "JobStatus.RUNNING"

    def get_job_info(self, sid):
        return FakeJobInfo(status=self.status[sid], message="", metadata={})

    def get_job_logs(self, sid):
        return f"logs of {sid}\n"

    def get_job_status(self, sid):
        return self.status[sid]

    def stop_job(self, sid):
        self.stopped.append(sid)
        self.status[sid] = "JobStatus.STOPPED"


def test_job_verbs_act_on_the_latest_attempt_of_the_same_config(monkeypatch, tmp_path, capsys):
    client = FakeCluster("http://head:8265")
    monkeypatch.setattr(submit, "jobs_client", lambda address: client)
    args = ["--config", "tiny", f"run_dir={tmp_path}", "submit.address=http://head:8265", "submit.verb=train"]
    assert cli.main(["submit", *args]) == 0
    first = client.submitted[0]["submission_id"]
    assert cli.main(["job", "stop", *args]) == 0 and client.stopped == [first]
    assert cli.main(["submit", *args]) == 0  # the next attempt
    second = client.submitted[1]["submission_id"]
    assert second == first[:-1] + "2"
    capsys.readouterr()
    assert cli.main(["job", "status", *args]) == 0 and capsys.readouterr().out == f"{second}: RUNNING\n"
    assert cli.main(["job", "logs", *args]) == 0 and capsys.readouterr().out == f"logs of {second}\n"
    assert cli.main(["job", "logs", *args, f"submit.job_id={first}"]) == 0
    assert capsys.readouterr().out == f"logs of {first}\n"
    assert cli.main(["job", "list", "submit.address=http://head:8265"]) == 0
    listed = capsys.readouterr().out
    assert first in listed and "STOPPED" in listed and second in listed and "train" in listed
    # another config has no attempt: a JobError saying how to find one
    assert cli.main(["job", "status", *args, "train.lr=0.5"]) == 1
    assert "raydistill job list" in capsys.readouterr().err


def test_a_job_driver_does_not_set_again_what_the_jobs_runtime_env_sets(monkeypatch, tmp_path):
    """Ray refuses ``ray.init(runtime_env=…)`` naming a variable the job's runtime env names (a submitted
    pipeline died at its first ``ray.init``)."""
    import json

    from raydistill.cluster import ray_init

    job = build_job(load_config("tiny"), ["pipeline"], False, tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job["runtime_env"]}))
    seen = {}
    monkeypatch.setattr(ray_init.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_init.ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    ray_init.init_ray()
    assert seen["address"] == "127.0.0.1:6379"
    assert not set(seen["runtime_env"]["env_vars"]) & set(job["runtime_env"]["env_vars"])


AGENT_500 = "Request failed with status code 500: No available agent to submit job, please try again later.."


class StartingCluster(FakeCluster):
    """A cluster right after `ray start`: the first submissions get Ray's HTTP 500 until its job agent is up."""

    def __init__(self, address, refusals: int, log: str = "", end: str = "JobStatus.SUCCEEDED"):
        super().__init__(address)
        self.refusals, self.log, self.end = refusals, log, end

    def submit_job(self, **kwargs):
        if self.refusals:
            self.refusals -= 1
            raise RuntimeError(AGENT_500)
        super().submit_job(**kwargs)
        self.status[kwargs["submission_id"]] = self.end

    def get_job_logs(self, sid):
        return self.log


def test_a_fresh_clusters_no_available_agent_answer_is_retried_and_a_client_error_is_not(monkeypatch, capsys):
    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    cluster = StartingCluster("http://head:8265", refusals=2)
    monkeypatch.setattr(submit, "jobs_client", lambda address: cluster)
    args = ["submit", "--config", "tiny", "submit.address=http://head:8265", "submit.verb=train"]
    assert cli.main(args) == 0 and len(cluster.submitted) == 1
    assert capsys.readouterr().out.count("No available agent to submit job") == 2
    cluster.refusals = 10 ** 6  # never comes up: bounded by submit.retry_s, then says what to check
    assert cli.main([*args, "submit.retry_s=3"]) == 1
    assert "kept answering" in capsys.readouterr().err
    assert not submit.transient(RuntimeError("Request failed with status code 400: bad runtime_env"))


@pytest.mark.parametrize("log,advice,absent", [
    ("Traceback …\n/bin/sh: 1: raydistill: not found\n", "cannot run raydistill", "resubmit the same command"),
    ("[train] step 3/40\nWorkerLostError: every teacher actor was lost\n", "resubmit the same command", "cannot run"),
])
def test_a_failed_job_says_why_with_its_last_log_lines_and_advises_a_resubmission_only_when_it_can_help(
        monkeypatch, capsys, log, advice, absent):
    cluster = StartingCluster("http://head:8265", refusals=0, log=log, end="JobStatus.FAILED")
    monkeypatch.setattr(submit, "jobs_client", lambda address: cluster)
    assert cli.main(["submit", "--config", "tiny", "submit.address=http://head:8265", "submit.wait=true"]) == 1
    err = capsys.readouterr().err
    assert "ended FAILED" in err and advice in err and absent not in err
    assert log.strip().splitlines()[-1] in err  # the last lines of the job's log are in the error
