"""The model lifecycle against the real registry server stack (``infra/stack.py``: PostgreSQL backend store,
artifacts proxied to an S3-compatible server, ``mlflow server`` on 127.0.0.1), started by the very command users
run: register with lineage, the fair gate on one frozen held-out set, rollback, two racing promotions, the
``lineage`` verb, and no planted secret in anything the stack or the run directory stores."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from raydistill.tasks.config import load_config
from raydistill.workflows import cli, lineage, promote, quantize, register, stage, tracking

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STACK = Path(__file__).resolve().parents[2] / "infra" / "stack.py"
NAME = "tiny-student"


def _stack(command: str, root: str) -> dict:
    out = subprocess.run([sys.executable, str(STACK), command, "--dir", root], capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def stack():
    """``infra/stack.py up`` in a fresh directory (reachable by the postgres user), ``down`` whatever happens."""
    root = tempfile.mkdtemp(prefix="raydistill-stack-")
    try:
        yield {**_stack("up", root), **json.loads(Path(root, "stack.json").read_text())}
    finally:
        _stack("down", root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def base(tiny_cached, stack, tmp_path_factory):
    """What every version here shares: the tiny cache, the server, a student built from the tiny teacher."""
    from raydistill.tasks.students import build_student
    from raydistill.tasks.teacher import load_teacher

    cfg = load_config("tiny", [f"cache.dir={tiny_cached.cache_dir}"])
    teacher, _ = load_teacher(cfg.teacher)
    return {"cache_dir": str(tiny_cached.cache_dir), "uri": stack["tracking_uri"], "student": build_student(
        cfg.student, teacher), "root": tmp_path_factory.mktemp("server"), "versions": {}}


def _config(base, run: str, *overrides):
    # one quantization method: quantize.methods' choice goes by measured speed, which load can sway, and these
    # tests need the same weights registered twice to be the same model
    return load_config("tiny", [f"run_dir={base['root'] / run}", f"cache.dir={base['cache_dir']}",
                                f"registry.tracking_uri={base['uri']}", "quantize.methods=[int8_weight_only]",
                                *overrides])


def _register(base, run: str, noise: float = 0.0, *overrides) -> tuple:
    """A version from the shared student (``noise`` > 0: a worse one), with real train and tune runs linked."""
    from raydistill.tasks.students import save_student
    from raydistill.tasks.teacher import load_tokenizer

    cfg = _config(base, run, *overrides)
    student = base["student"]
    if noise:
        import copy

        student, gen = copy.deepcopy(student), torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen))
    student_dir = cfg.stage_dir("train") / "student"
    save_student(student, load_tokenizer(cfg.teacher), student_dir)
    with tracking.start_run(cfg, run_name="tune") as tune_run:
        pass
    with tracking.start_run(cfg, run_name="train") as train_run:
        pass
    stage.record(cfg, "tune", f"tune-{run}", {"mlflow_parent_run_id": tune_run.info.run_id})
    stage.record(cfg, "train", f"train-{run}", {"student_dir": str(student_dir), "mlflow_run_id":
                                                train_run.info.run_id}, paths=[student_dir])
    quantize.run(cfg, None)
    reg = register.run(cfg, None)
    base["versions"][run] = reg["version"]
    return cfg, reg


def _tags(cfg, version) -> dict:
    return dict(tracking.client(cfg).get_model_version(NAME, str(version)).tags)


def test_a_version_registered_on_the_server_is_stored_in_postgres_and_s3(base, stack):
    import boto3
    import psycopg2

    cfg, reg = _register(base, "v1")
    assert reg["version"] == 1 and cfg.tracking_uri.startswith("http://127.0.0.1:")
    tags = _tags(cfg, 1)
    train = stage.read(cfg, "train")["outputs"]["mlflow_run_id"]
    assert tags["lineage.train_run_id"] == train
    assert tags["lineage.tune_parent_run_id"] == stage.read(cfg, "tune")["outputs"]["mlflow_parent_run_id"]
    assert tags["code.version"].startswith(("git:", "raydistill=="))
    head = subprocess.run(["git", "-C", str(STACK.parents[1]), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI's clean clone is one): the exact commit, not only the package
        assert tags["code.version"].removesuffix("+dirty") == f"git:{head.stdout.strip()}"
    chosen = json.loads(Path(cfg.run_dir, "quantize", "report.json").read_text())["method"]  # quantize.methods' pick
    assert tags["raydistill.quantization"] == chosen
    with psycopg2.connect(host="127.0.0.1", port=stack["ports"]["postgres"], user="raydistill",
                          password=stack["db_password"], dbname="mlflow") as db, db.cursor() as cur:
        cur.execute("SELECT version FROM model_versions WHERE name = %s", (NAME,))
        assert cur.fetchall() == [(1,)]
    s3 = boto3.client("s3", endpoint_url=stack["s3_endpoint"], aws_access_key_id="x", aws_secret_access_key="x",
                      region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="raydistill-artifacts")["Contents"]]
    assert any(k.endswith("model.safetensors") for k in keys) and any(k.endswith("lineage/shards.arrow") for k in keys)


def test_the_gate_compares_challenger_and_champion_on_one_frozen_heldout_set(base):
    cfg1 = _config(base, "v1")
    first = promote.run(cfg1, None)
    assert first["promoted"] and first["champion_version"] == 1 and first["champion"] is None
    cfg2, reg2 = _register(base, "v2")  # the same weights under another train key: a second version
    second = promote.run(cfg2, None)
    assert second["promoted"] and second["champion_version"] == reg2["version"] == 2
    tags = _tags(cfg2, 2)
    assert tags["gate.champion_version"] == "1" and tags["gate.decision"] == "promoted"
    assert tags["gate.heldout_digest"] == second["heldout_digest"] == _tags(cfg1, 1)["gate.heldout_digest"]
    for metric in ("heldout_loss", "top1_agreement", "ece"):  # same weights, same windows: the same numbers
        assert tags[f"gate.candidate.{metric}"] == tags[f"gate.champion.{metric}"]
    assert float(tags["gate.candidate.heldout_loss"]) == pytest.approx(second["candidate"]["heldout_loss"])


def test_rollback_restores_the_previous_champion_and_says_which(base, capsys):
    cfg = _config(base, "v2")
    back = promote.run(cfg, "rollback")
    assert back["restored_version"] == 1 and back["rolled_back_from"] == 2
    assert "restored version 1" in capsys.readouterr().out
    assert int(tracking.alias_version(tracking.client(cfg), NAME, "champion").version) == 1


def test_a_challenger_worse_than_the_champion_is_refused_though_it_passes_the_thresholds(base):
    cfg3, reg3 = _register(base, "v3", 0.05, "registry.gate.max_heldout_loss=1000",
                           "registry.gate.min_top1_agreement=0")
    result = promote.run(cfg3, None)
    assert not result["promoted"] and result["champion_version"] == 1
    candidate, champion = result["candidate"], result["champion"]  # the noisy student agrees less with the teacher
    assert candidate["top1_agreement"] < champion["top1_agreement"] - 0.02
    assert "worse than the champion's" in result["reason"]
    tags = _tags(cfg3, reg3["version"])
    assert tags["gate.passed"] == "false" and tags["gate.decision"] == "rejected"
    assert tags["gate.heldout_digest"] == _tags(cfg3, 1)["gate.heldout_digest"] == result["heldout_digest"]
    assert float(tags["gate.champion.top1_agreement"]) == pytest.approx(champion["top1_agreement"])
    assert int(tracking.alias_version(tracking.client(cfg3), NAME, "champion").version) == 1


def test_two_promotions_racing_move_the_alias_once(base, monkeypatch):
    """v2 and v3 both pass a loose gate against champion v1; both gates finish before either commits."""
    cfg = _config(base, "v3", "registry.gate.max_heldout_loss=1000", "registry.gate.min_top1_agreement=0",
                  "registry.gate.max_loss_regression=1000", "registry.gate.max_agreement_regression=1",
                  "registry.gate.max_ece_regression=1")
    barrier, real, results = threading.Barrier(2, timeout=120), promote.check_gate, {}

    def gate_then_wait(*args):
        verdict = real(*args)
        barrier.wait()  # both racers read @champion (v1) and passed the gate: now both try to commit
        return verdict

    monkeypatch.setattr(promote, "check_gate", gate_then_wait)

    def racer(version):
        results[version] = promote.promote(tracking.client(cfg), NAME, version, cfg.registry.gate,
                                           promote.FrozenHeldout(cfg))

    threads = [threading.Thread(target=racer, args=(v,)) for v in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    winners = [v for v, r in results.items() if r["promoted"]]
    assert len(results) == 2 and len(winners) == 1
    loser = ({2, 3} - set(winners)).pop()
    assert "while the gate ran" in results[loser]["reason"]
    assert _tags(cfg, loser)["gate.decision"] == "lost-race"
    client = tracking.client(cfg)
    assert int(tracking.alias_version(client, NAME, "champion").version) == winners[0]
    assert int(tracking.alias_version(client, NAME, "previous").version) == 1
    assert promote.run(cfg, "rollback")["restored_version"] == 1


def _cas(uri: str, version: int, barrier, queue) -> None:
    from mlflow.tracking import MlflowClient

    from raydistill.workflows import tracking as t

    client = MlflowClient(uri)
    barrier.wait()
    with t.registry_lock(client, NAME, timeout_s=120):
        now = t.alias_version(client, NAME, "race")
        if now is None:  # expected: unset; the move depends on it
            t.set_alias(client, NAME, "race", version)
        queue.put((version, now is None))


def test_the_registry_lock_is_a_compare_and_set_across_processes(base):
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_cas, args=(base["uri"], v, barrier, queue)) for v in (1, 2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    got = dict(queue.get(timeout=10) for _ in procs)
    assert [p.exitcode for p in procs] == [0, 0, 0] and sum(got.values()) == 1
    winner = next(v for v, ok in got.items() if ok)
    client = tracking.client(_config(base, "v1"))
    assert int(tracking.alias_version(client, NAME, "race").version) == winner
    assert not [m for m in client.search_registered_models() if m.name.endswith(tracking.LOCK_SUFFIX)]


def test_lineage_prints_the_chain_back_to_the_exact_cache_shards(base, capsys):
    from raydistill.tasks.cache.shards import config_cache

    cfg, uri = _config(base, "v1"), tracking.model_uri(NAME, version=1)
    code = cli.main(["lineage", uri, "--config", "tiny", f"run_dir={cfg.run_dir}", f"cache.dir={cfg.cache_dir}",
                     f"registry.tracking_uri={cfg.tracking_uri}"])
    out = capsys.readouterr().out
    assert code in (0, None)
    train = stage.read(cfg, "train")["outputs"]["mlflow_run_id"]
    assert uri in out and train in out and "verified" in out and "NOT verified" not in out
    chain = lineage.chain(cfg, uri)
    tune = stage.read(cfg, "tune")["outputs"]["mlflow_parent_run_id"]
    assert chain["tune_parent_run_id"] == tune and f"tune parent run     {tune}" in out
    for printed in ("code_version", "corpus_sha256", "teacher_weights_sha256", "cache_key", "heldout_digest"):
        assert chain[printed] and chain[printed] != "None" and chain[printed] in out
    cache = config_cache(cfg)
    assert chain["cache_key"] == cache.key and chain["train_run_id"] == train
    assert chain["init_from"] == "none" and "warm-started from   none" in out  # built from the teacher
    from raydistill.tasks.cache.index import Index, ShardList

    assert (chain["shards"]["train"], chain["shards"]["heldout"]) == (len(cache.shards("train")),
                                                                      len(cache.shards("heldout")))
    with tempfile.TemporaryDirectory() as tmp:  # the logged shard list: the cache's index, a row per shard
        logged = Index(str(tracking.download_run_artifact(cfg.tracking_uri, chain["register_run_id"],
                                                          lineage.SHARDS_ARTIFACT, tmp)))
        listed = list(ShardList(logged, logged.rows(None)))
    assert sorted(e["key"] for e in listed) == sorted(cache.shards().keys())
    for e in listed:  # every listed file is the very file in the cache
        assert hashlib.sha256(Path(cfg.cache_dir, e["file"]).read_bytes()).hexdigest() == e["sha256"]
    assert chain["heldout_digest"] == _tags(cfg, 2)["gate.heldout_digest"]


SECRETS = {"RAY_AUTH_TOKEN": "planted-ray-token-5521", "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token-7731",
           "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-3307"}
URL_SECRETS = ("planted-dash-pass-417", "planted-mlflow-pass-902", "planted-s3-secret-668")


def _cache_on_s3(base, stack) -> str:
    """The shared tiny cache copied to a bucket of the stack's S3 server; its ``s3://`` URI carries a planted
    secret key (the case the issue names: ``cache.dir`` with ``s3://key:secret@…``)."""
    import pyarrow.fs as pafs

    uri = (f"s3://plantedkey:{URL_SECRETS[2]}@leak-cache/tiny?endpoint_override={stack['s3_endpoint']}"
           "&region=us-east-1")
    fs, _ = pafs.FileSystem.from_uri(uri + "&allow_bucket_creation=true")
    fs.create_dir("leak-cache")
    pafs.copy_files(base["cache_dir"], "leak-cache/tiny", destination_filesystem=fs)
    return uri


def test_no_planted_secret_reaches_params_artifacts_records_logs_or_the_servers(base, stack, monkeypatch, capsys):
    import boto3

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    uri = base["uri"].replace("http://", f"http://mlflowuser:{URL_SECRETS[1]}@")
    cache_dir = _cache_on_s3(base, stack)
    cfg, reg = _register(base, "leak", 0.0, f"submit.address=http://admin:{URL_SECRETS[0]}@head:8265",
                         f"registry.tracking_uri={uri}", f"registry.experiment=leaks", f"cache.dir={cache_dir}")
    assert cfg.cache_dir == cache_dir and reg["version"] > 1  # the cache really was read from the bucket
    promote.run(cfg, None)
    lineage.run(load_config("tiny", [f"run_dir={cfg.run_dir}", f"registry.tracking_uri={uri}",
                                     "registry.lineage_uri=" + tracking.model_uri(NAME, version=reg["version"])]))
    planted = [*SECRETS.values(), *URL_SECRETS]
    out = capsys.readouterr()
    blobs = {"stdout": out.out.encode(), "stderr": out.err.encode()}
    blobs.update({str(p): p.read_bytes() for p in Path(cfg.run_dir).rglob("*") if p.is_file()})
    client = tracking.client(cfg)
    run = client.get_run(reg["run_id"])
    assert run.data.params["submit.address"] == "http://admin:***@head:8265"
    assert run.data.params["cache.dir"].startswith("s3://plantedkey:***@leak-cache/tiny")
    blobs["params"] = json.dumps(run.data.params).encode()
    s3 = boto3.client("s3", endpoint_url=stack["s3_endpoint"], aws_access_key_id="x", aws_secret_access_key="x",
                      region_name="us-east-1")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="raydistill-artifacts"):
        for o in page.get("Contents", []):
            blobs["s3:" + o["Key"]] = s3.get_object(Bucket="raydistill-artifacts", Key=o["Key"])["Body"].read()
    dump = subprocess.run(["/usr/bin/env", f"PGPASSWORD={stack['db_password']}",
                           sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_dump"))[-1], "-h", "127.0.0.1",
                           "-p", str(stack["ports"]["postgres"]), "-U", "raydistill", "mlflow"],
                          capture_output=True, check=True)
    blobs["pg_dump"] = dump.stdout
    blobs.update({str(p): p.read_bytes() for p in Path(stack["dir"], "logs").rglob("*") if p.is_file()})
    assert any(k.endswith("config.yaml") for k in blobs) and b"submit" in blobs["pg_dump"]
    assert b"plantedkey:***@leak-cache" in blobs["pg_dump"]  # the cache URI was stored, masked
    leaks = [(where, s) for where, data in blobs.items() for s in planted if s.encode() in data]
    assert not leaks
