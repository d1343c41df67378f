"""Jobs on a real 2-node cluster, through the CLI's ``main()``: the tiny pipeline submitted with ``--wait``
(shared ``s3://`` cache on a local S3 server, work on both nodes, ``@champion``, the token nowhere) and
``submit.verb``. Resume and faults are in ``test_cluster_faults.py``, on a cluster of their own."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

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


def _held_after_jobs(cluster) -> list[str]:
    """Placement groups not removed and live actors holding CPUs: what a finished job must not leave behind
    (a later job's actors would wait for those CPUs). Ray's own detached 0-CPU actors do not count."""
    import requests

    def state(kind: str) -> list[dict]:
        r = requests.get(f"{cluster.address}/api/v0/{kind}", params={"limit": 1000, "detail": "1"},
                         headers={"Authorization": f"Bearer {cluster.token()}"}, timeout=30)
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    pgs = [f"placement group {p['placement_group_id'][:8]} {p['state']}" for p in state("placement_groups")
           if p["state"] != "REMOVED"]
    return pgs + [f"actor {a['class_name']} {a['state']}" for a in state("actors")
                  if a["state"] != "DEAD" and (a.get("required_resources") or {}).get("CPU")]


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
    # nothing of the finished job holds resources: Train's placement groups removed, its actors gone
    _until(lambda: not _held_after_jobs(cluster_env), 60, "the finished job's resources to be freed")

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
    # the typed error, exit 1: the cache this config would write (its id) is not in the dir
    assert re.search(r"raydistill cache: no teacher cache [0-9a-f]{16} at ", logs) and "Traceback" not in logs
