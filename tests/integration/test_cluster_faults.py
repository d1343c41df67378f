"""Resume and faults on a real 2-node cluster, through the CLI's ``main()``: a stopped cache job, a node lost
mid-cache, a driver killed mid-training — each resubmission redoes no committed work.

A module (so a cluster) of its own: run after the jobs of ``test_cluster_jobs.py`` on their cluster, the first
cache job here once committed no shard within 300 s, while on a fresh cluster the same test passed.

The node is killed while the cache job runs: the job's driver replaces the teacher actor lost with it (the
replacement waits until the new node joins; the survivor keeps computing) and re-queues its uncommitted shard
(workflows/cache.py ``_Pool``)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from raydistill.cluster.local_cluster import NodeSpec
from raydistill.workflows.cli import main
from test_cluster_jobs import CLUSTER, _client, _record, _until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
    assert cache["actors_replaced"] >= 1  # the actor on the killed node, replaced on worker1
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
