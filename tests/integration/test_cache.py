"""workflows.cache on a real local Ray cluster: resumable caching, rerun = no-op, a killed actor replaced, an
exception in the teacher code failing the run at once."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
from tqdm import tqdm

from raydistill.tasks.config import load_config
from raydistill.tasks.cache.manifest import check_compatible, shard_file
from raydistill.tasks.cache.resume import KnownEntries
from raydistill.tasks.cache.store import Store
from raydistill.tasks.cache.shards import config_cache, open_cache
from raydistill.tasks.errors import DataError
from raydistill.workflows import cache
from raydistill.workflows.stage import read as read_stage

pytestmark = pytest.mark.integration


def test_tiny_cache_then_rerun_performs_no_teacher_forward(tiny_cached):
    cfg = tiny_cached
    c = config_cache(cfg)
    assert len(c.shards()) >= 3 and c.shards("heldout") and c.manifest["complete"]
    assert sorted(c.verify()) == sorted(e["name"] for e in c.shards())
    check_compatible(c, cfg.teacher, cfg.cache, cfg.corpus)
    first = read_stage(cfg, "cache")
    assert first["outputs"]["teacher_forwards"] > 0
    assert first["outputs"]["shards_computed"] == first["outputs"]["shards_total"] == len(c.shards())
    again = cache.run(cfg, None)
    assert again["teacher_forwards"] == 0 and again["shards_computed"] == 0
    assert again["cache_key"] == first["key"] == read_stage(cfg, "cache")["key"]
    # the teacher's measured throughput survives a rerun that measures nothing (the summary's teacher row)
    assert first["outputs"]["teacher_tokens_per_s"] > 0
    assert again["teacher_tokens_per_s"] == first["outputs"]["teacher_tokens_per_s"]
    held = c.read(c.shards("heldout")[0])
    assert held.teacher_nll is not None and held.teacher_nll.shape == held.tokens[:, 1:].shape


def _actor_pid(deadline: float) -> tuple[int, str]:
    while time.time() < deadline:
        names = [n for n in ray.util.list_named_actors() if n.startswith(cache.ACTOR_PREFIX)]
        if names:
            return ray.get(ray.get_actor(names[0]).pid.remote(), timeout=120), names[0]
        time.sleep(0.1)
    raise TimeoutError("no cache actor appeared")


def _committed_shards(cfg) -> int:
    d = os.path.join(cfg.cache_dir, "shards")
    return len([n for n in os.listdir(d) if n.endswith(".st") and not n.startswith(".")]) if os.path.isdir(d) else 0


def test_killed_actor_process_is_replaced_its_shard_requeued_and_every_shard_verifies(tmp_path, ray_cluster):
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "corpus.seq_len=128", "corpus.max_tokens=5120",
                               "corpus.windows_per_shard=1", "cache.batch_size=1",
                               "teacher.tiny.hidden_size=256", "teacher.tiny.intermediate_size=512"])
    result, errors = {}, []

    def drive():
        try:
            result.update(cache.run(cfg, None))
        except Exception as e:  # surfaced below
            errors.append(e)

    thread = threading.Thread(target=drive)
    thread.start()
    pid, name = _actor_pid(time.time() + 120)
    while _committed_shards(cfg) < 2 and thread.is_alive():
        time.sleep(0.05)
    done_before_kill = _committed_shards(cfg)
    assert thread.is_alive() and done_before_kill < 40, "the run finished before the actor could be killed"
    os.kill(pid, signal.SIGKILL)  # really kill the process, mid-run
    thread.join(timeout=300)
    assert not errors, errors
    # an actor killed after its atomic commit but before it answered leaves the file: the replacement adopts it
    assert result["shards_computed"] + result["shards_adopted"] == result["shards_total"] == 40
    assert result["shards_adopted"] <= 1, result
    # the driver replaced the lost actor and computed its in-flight shard again (recorded in the stage record)
    assert result["actors_replaced"] >= 1 and result["shards_requeued"] >= 1
    assert read_stage(cfg, "cache")["outputs"]["actors_replaced"] == result["actors_replaced"]
    c = config_cache(cfg)
    assert len(c.verify()) == 40 and c.manifest["complete"]

    # a corrupted shard: inspect fails naming it; the next run recomputes exactly that shard
    entry = c.shards("train")[3]
    path = os.path.join(cfg.cache_dir, entry["file"])
    data = bytearray(open(path, "rb").read())
    data[-7] ^= 0xFF
    open(path, "wb").write(bytes(data))
    cache.run(cfg, "inspect")  # without --verify inspect reads no shard: every file is listed
    with pytest.raises(DataError, match=entry["name"]):
        cache.run(dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, verify=True)), "inspect")
    os.unlink(path)  # what the error says to do: delete it and rerun
    again = cache.run(cfg, None)
    assert again["shards_computed"] == 1 and again["teacher_forwards"] == 1
    assert len(config_cache(cfg).verify()) == 40


def test_an_exception_in_the_teacher_code_fails_the_cache_at_once_and_is_not_retried(tmp_path, ray_cluster, capsys):
    """Not infrastructure: a shard whose token ids the teacher's embedding cannot look up raises IndexError in
    the actor; the driver re-raises it (no replacement actor, no re-queued shard), not a lost-actor error."""
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}"])
    run = cache._Run(cfg, cache._head(cfg, "cpu"), Store(cfg.cache_dir), KnownEntries([]), np.zeros(0, np.uint64),
                     "cpu")
    pool = cache._Pool(cfg, "cpu")
    L1 = cfg.corpus.seq_len + 1
    # (tokens, mask) per shard, as plan_task gives them; ids beyond the vocab in the first
    tokens = ray.put([(np.full((2, L1), 10 ** 6, np.int32), None), (np.ones((2, L1), np.int32), None)])
    run.queue.extend([("train-bad-00000", "train", "a" * 64, tokens, 0), ("train-ok-00000", "train", "b" * 64,
                                                                           tokens, 1)])
    pool.grow(len(run.queue))
    try:
        with pytest.raises(IndexError, match="index out of range"):
            while run.queue or run.pending:
                cache._step(run, pool, tqdm(disable=True))
    finally:
        pool.close()
    out = capsys.readouterr().out
    assert "lost a teacher actor" not in out and "replaced" not in out and run.out["shards_requeued"] == 0
    assert not os.path.exists(os.path.join(cfg.cache_dir, shard_file("train-bad-00000", "a" * 64)))


def test_object_store_cache_on_a_local_s3_server(tmp_path, ray_cluster):
    """The same cache in ``s3://`` (moto's S3 server on 127.0.0.1, started here): compute, rerun, verify."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e .[test])")
    import pyarrow.fs as pafs

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        # credentials in the URI: Ray workers started before this test do not see environment changes
        uri = f"s3://testing:testing@rd-cache/tiny?endpoint_override=http://{host}:{port}&region=us-east-1"
        pafs.FileSystem.from_uri(uri + "&allow_bucket_creation=true")[0].create_dir("rd-cache")
        cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"cache.dir={uri}", "corpus.max_tokens=2048"])
        first = cache.run(cfg, None)
        assert first["shards_computed"] == first["shards_total"] >= 3 and first["teacher_forwards"] > 0
        assert not (tmp_path / "run" / "cache").exists()  # nothing went to the local run dir
        again = cache.run(cfg, None)
        assert again["teacher_forwards"] == 0 and again["cache_key"] == first["cache_key"]
        c = open_cache(uri)
        assert len(c.verify()) == first["shards_total"]
        check_compatible(c, cfg.teacher, cfg.cache, cfg.corpus)
        assert read_stage(cfg, "cache")["paths"] == [f"s3://rd-cache/tiny/caches/{first['cache_id']}/head.json"]
        # the rerun read the head (and at most the index): one listing, no shard byte
        assert again["store_requests"].get("get", 0) <= 2 and again["store_requests"]["list"] == 1
    finally:
        server.stop()
