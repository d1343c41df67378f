"""Jobs on a real 2-node cluster, through the CLI's ``main()``: the tiny pipeline submitted with ``--wait``
(shared ``s3://`` cache on a local S3 server, work on both nodes, ``@champion``, the token nowhere), then
resume and faults: a stopped cache job, a node lost mid-cache, a driver killed mid-training."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from raydistill.cluster.local_cluster import NodeSpec
from raydistill.workflows.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLUSTER = ["cache.num_actors=2", "train.num_workers=2", "cluster.spread=true"]


def _record(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / "stages" / f"{stage}.json").read_text())["outputs"]


def _client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token()}"})


def _until(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def test_submitted_pipeline_runs_on_both_nodes_reaches_champion_and_never_shows_the_token(
        cluster_env, s3_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    args = ["--config", "tiny", f"run_dir={run_dir}", f"cache.dir={s3_server('pipeline')}", *CLUSTER,
            "pipeline.tune=false", "pipeline.serve=false"]
    assert main(["submit", *args, "submit.wait=true", "submit.timeout_s=900"]) == 0
    out = capsys.readouterr().out
    assert "submitted raydistill-pipeline-" in out and "raydistill summary" in out  # the job's logs, followed

    node_ids = {n["node_id"] for n in cluster_env.nodes()}
    cache, train = _record(run_dir, "cache"), _record(run_dir, "train")
    assert set(cache["actor_nodes"]) == node_ids and len(node_ids) == 2
    assert set(train["metrics"]["worker_nodes"]) == node_ids
    assert cache["cache_dir"].startswith("s3://") and not (run_dir / "cache").exists()
    champion = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}").get_model_version_by_alias("tiny-student",
                                                                                               "champion")
    assert str(champion.version) == str(_record(run_dir, "promote")["champion_version"])

    # the job verbs find this attempt from the same config
    assert main(["job", "status", *args]) == 0
    sid, status = capsys.readouterr().out.strip().split(": ")[:2]
    assert sid.startswith("raydistill-pipeline-") and status.startswith("SUCCEEDED")
    assert main(["job", "logs", *args]) == 0 and "[train] done" in capsys.readouterr().out
    assert main(["job", "list"]) == 0 and sid in capsys.readouterr().out

    # the token: not in the job's metadata, entrypoint or runtime env, its logs, MLflow or any file it wrote
    token = cluster_env.token()
    client = _client(cluster_env)
    info = client.get_job_info(sid)
    assert token not in json.dumps([info.metadata, info.entrypoint, info.runtime_env], default=str)
    assert token not in client.get_job_logs(sid)
    ml = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = ml.search_runs([e.experiment_id for e in ml.search_experiments()])
    assert runs and all(token not in json.dumps(r.data.params) + json.dumps(r.data.tags) for r in runs)
    leaked = [p for root in (run_dir, cluster_env.root) for p in root.rglob("*")
              if p.is_file() and p.name != "auth_token" and token.encode() in p.read_bytes()]
    assert leaked == []  # run dir (MLflow db + artifacts, stage records) and every Ray log of the cluster


def test_submit_ships_submit_verb_and_starts_no_local_ray(cluster_env, tmp_path, capsys):
    import ray

    args = ["--config", "tiny", f"run_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'no-cache'}",
            "submit.verb=cache inspect"]
    assert main(["submit", *args, "submit.wait=true", "submit.timeout_s=300"]) == 1  # no cache there
    out, err = capsys.readouterr()
    assert "raydistill cache inspect --config config.yaml" in out and "ended FAILED" in err
    assert not ray.is_initialized()
    logs = capsys.readouterr().out if main(["job", "logs", *args]) == 0 else ""
    assert "raydistill cache: no teacher cache at" in logs and "Traceback" not in logs  # the typed error, exit 1


def test_stopped_job_lost_node_and_killed_driver_all_resume_without_redoing_work(cluster_env, tmp_path, capsys):
    from raydistill.tasks.cache.shards import open_cache

    run_dir = tmp_path / "run"
    shards = run_dir / "cache" / "shards"
    # 80 small shards, one forward per window: long enough to stop or lose a node while shards remain
    base = ["--config", "tiny", f"run_dir={run_dir}", "corpus.max_tokens=40960", "cache.batch_size=1", *CLUSTER]
    committed = lambda: sorted(p.name for p in shards.glob("*.st") if not p.name.startswith("."))  # noqa: E731

    # 1. the cache job stopped mid-way: the resubmission computes only the shards not committed
    cache_job = [*base, "submit.verb=cache"]
    assert main(["submit", *cache_job]) == 0
    _until(lambda: len(committed()) >= 3, 300, "3 shards committed")
    assert main(["job", "stop", *cache_job]) == 0 and "STOPPED" in capsys.readouterr().out
    time.sleep(2)  # the job's actors go with its driver
    before = committed()

    # 2. the resubmission loses the non-head node mid-cache; a replacement node joins and the job completes
    assert main(["submit", *cache_job]) == 0
    _until(lambda: len(committed()) >= len(before) + 2, 300, "2 more shards committed")
    cluster_env.stop_node("worker0", signal.SIGKILL)
    cluster_env.add_worker(NodeSpec(num_cpus=1), name="worker1")
    cluster_env.wait_nodes(2, name="worker1")
    assert main(["job", "logs", *cache_job, "submit.follow=true", "submit.timeout_s=600"]) == 0
    cache = _record(run_dir, "cache")  # the record of the attempt that completed
    assert cache["shards_total"] > len(before) > 0
    assert 0 < cache["shards_computed"] <= cache["shards_total"] - len(before)  # committed shards: no forward
    assert len(open_cache(str(run_dir / "cache")).verify()) == cache["shards_total"]  # nothing half-written
    capsys.readouterr()
    assert main(["job", "status", *cache_job]) == 0
    assert "-2: SUCCEEDED" in capsys.readouterr().out  # the second attempt itself completed

    # 3. the training driver killed after its first checkpoint: the resubmission resumes from it
    train_job = [*base, "submit.verb=train", "train.steps=36", "train.eval_every=6", "train.checkpoint_every=6"]
    assert main(["submit", *train_job]) == 0
    _until(lambda: list((run_dir / "train" / "ray").glob("*/checkpoint_*")), 300, "a training checkpoint")
    time.sleep(2)  # let Ray Train register it
    client = _client(cluster_env)
    job = next(j for j in client.list_jobs() if j.submission_id.startswith("raydistill-train-")
               and str(j.status).endswith("RUNNING"))
    os.kill(int(job.driver_info.pid), signal.SIGKILL)  # the driver (not a graceful `job stop`)
    _until(lambda: not str(client.get_job_info(job.submission_id).status).endswith(("RUNNING", "PENDING")), 120,
           "the killed job to end")
    capsys.readouterr()
    assert main(["submit", *train_job, "submit.wait=true", "submit.timeout_s=600"]) == 0
    logs = capsys.readouterr().out
    resumed = int(logs.split("[train] resuming at step ")[1].split(":")[0])
    assert 6 <= resumed < 36
    assert _record(run_dir, "train")["steps"] == 36
