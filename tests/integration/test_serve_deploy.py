"""Deploying like Ray users do: ``cluster/serve/champion.yaml`` through the ``serve run`` command on a local cluster
(API keys required), the RayService manifest embedding the same file, a replica's process killed under load, and
an alias move under load with 2 replicas: they switch together, and no request sent after the switch gets the old
version."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from test_serve import AUTH, KEY, register_tiny_version

from raydistill.cluster.local_cluster import free_ports
from raydistill.tasks.config import load_config
from raydistill.workflows import serve, tracking

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "cluster" / "serve" / "champion.yaml"
RAYSERVICE = ROOT / "cluster" / "kuberay" / "rayservice.yaml"


def test_the_rayservice_embeds_the_serve_config_file():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CONFIG.read_text())
    service = yaml.safe_load(RAYSERVICE.read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == config  # the same application, deployments, options and args
    schema = ServeDeploySchema.model_validate(config)  # what `serve deploy` / `serve run` validate
    (app,) = schema.applications
    assert app.import_path == "raydistill.workflows.serve:application"
    assert set(app.args) <= set(serve.APP_ARGS)
    assert [d.name for d in app.deployments] == [serve.DEPLOYMENT]
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == __import__("ray").__version__


def local_copy(cfg, path: Path, port: int, replicas: int | None = None) -> Path:
    """The repo's config file with only what a laptop needs changed: port, registry, CPUs (and replicas)."""
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    app["args"].update(tracking_uri=cfg.tracking_uri, model_uri=tracking.model_uri(cfg.registry.model_name, alias="champion"))
    keys = path.parent / "api-keys"  # the file holds the key a Secret would give (require_api_keys is on)
    keys.write_text(f"{KEY}\n")
    app["args"]["overrides"] = [*app["args"]["overrides"], "serve.num_cpus=0.5", "serve.alias_poll_s=0.5",
                                f"serve.api_keys_file={keys}"]
    (deployment,) = app["deployments"]
    deployment["ray_actor_options"]["num_cpus"] = 0.5
    if replicas:
        deployment["autoscaling_config"].update(min_replicas=replicas, initial_replicas=replicas)
    path.write_text(yaml.safe_dump(config))
    return path


def serve_run(path: Path) -> None:
    """``serve run <file> --non-blocking`` (the Serve CLI itself, in this process's Ray session)."""
    from click.testing import CliRunner
    from ray.serve.scripts import cli

    result = CliRunner().invoke(cli, ["run", str(path), "--non-blocking"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def running_replicas() -> int:
    app = serve.serve.status().applications.get(serve.APP_NAME)
    deployment = app.deployments.get(serve.DEPLOYMENT) if app else None
    return deployment.replica_states.get("RUNNING", 0) if deployment else 0


def replica_pids() -> set[int]:
    import ray
    from ray.util.state import list_actors

    name = f"ServeReplica:{serve.APP_NAME}:{serve.DEPLOYMENT}"
    return {a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                  filters=[("class_name", "=", name), ("state", "=", "ALIVE")])}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, ray_cluster, tiny_tokenizer):
    run_dir = tmp_path_factory.mktemp("serve_deploy") / "run"
    cfg = load_config("tiny", [f"run_dir={run_dir}"])
    version = register_tiny_version(cfg, tiny_tokenizer, seed=1, loss=5.0)
    tracking.client(cfg).set_registered_model_alias(cfg.registry.model_name, "champion", str(version))
    port = free_ports(1)[0]
    yield cfg, version, port, run_dir.parent
    serve.shutdown_app()


def wait(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, what
        time.sleep(0.2)
    return value


@pytest.mark.slow
def test_serve_run_accepts_the_config_file_and_serves_the_champion(deployed):
    cfg, version, port, tmp = deployed
    serve_run(local_copy(cfg, tmp / "champion.yaml", port))
    wait(lambda: running_replicas() >= 1, 180, "the app from the config file never ran")
    url = f"http://127.0.0.1:{port}"
    assert requests.post(f"{url}/v1/completions", timeout=60, json={"prompt": "ROMEO."}).status_code == 401
    r = wait(lambda: (x := requests.post(f"{url}/v1/completions", timeout=60, headers=AUTH,
                                         json={"prompt": "ROMEO.", "max_tokens": 3, "temperature": 0}))
             .status_code == 200 and x, 60, "no answer")
    assert r.json()["model"] == f"{cfg.registry.model_name}/{version}"
    deployment = serve.serve.status().applications[serve.APP_NAME].deployments[serve.DEPLOYMENT]
    assert deployment.status == "HEALTHY"


def load(url: str, clients: int, stop: threading.Event, results: list, max_requests: int = 400):
    """``clients`` threads, each sending one request at a time (bounded in count), recording
    ``(started, ended, status or None)``."""

    def client(c: int):
        with requests.Session() as session:
            for i in range(max_requests):
                if stop.is_set():
                    return
                t0 = time.time()
                try:
                    status = session.post(f"{url}/v1/completions", timeout=60, headers=AUTH, json={
                        "prompt": f"Client {c}, line {i}", "max_tokens": 4, "temperature": 0}).status_code
                except requests.RequestException:
                    status = None
                results.append((t0, time.time(), status))

    pool = ThreadPoolExecutor(clients)
    return [pool.submit(client, c) for c in range(clients)], pool


@pytest.mark.slow
def test_killing_one_of_two_replicas_loses_at_most_its_in_flight_requests(deployed):
    cfg, _, port, tmp = deployed
    serve_run(local_copy(cfg, tmp / "champion-2.yaml", port, replicas=2))  # a config update, as `serve deploy`
    wait(lambda: running_replicas() == 2 and len(replica_pids()) == 2, 180, "2 replicas never ran")
    url, stop, results = f"http://127.0.0.1:{port}", threading.Event(), []
    futures, pool = load(url, 8, stop, results)
    try:
        time.sleep(2)
        victim = sorted(replica_pids())[0]
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        # a healthy replacement: 2 running replicas again, the victim not among them. The 30 s is a speed
        # target, measured by benchmarks/serve.py (replica_kill_recovery_s); here the bound only has to catch a
        # replica that never comes back (it took 30.1 s once on 2 cores shared by three test runs)
        wait(lambda: running_replicas() == 2 and victim not in replica_pids() and len(replica_pids()) == 2, 90,
             "no healthy replacement within 90 s")
        time.sleep(1)
    finally:
        stop.set()
        for f in futures:
            f.result()
        pool.shutdown()
    failed = [r for r in results if r[2] != 200]
    assert sum(1 for r in results if r[0] > killed_at) > 0  # load went on after the kill
    assert all(started < killed_at for started, _, _ in failed), failed  # only requests already in flight
    assert len(failed) <= 8


@pytest.mark.slow
def test_two_replicas_under_load_switch_together_when_the_alias_moves(deployed, tiny_tokenizer):
    """The app's version watcher moves both replicas: each loads v2 beside v1, both switch when both have it.
    Under load from 6 clients: no failed request, and no request sent after the last replica switched is
    answered by v1 (requests already running then may finish on v1: that is the design)."""
    cfg, v1, port, tmp = deployed
    v2 = register_tiny_version(cfg, tiny_tokenizer, seed=2, loss=4.0)
    keys = tmp / "api-keys-swap"
    keys.write_text(f"{KEY}\n")
    two = load_config("tiny", [f"run_dir={cfg.run_dir}", f"serve.port={port}", "serve.num_replicas=2",
                               "serve.num_cpus=0.5", "serve.alias_poll_s=0.5", f"serve.api_keys_file={keys}"])
    tracking.client(cfg).set_registered_model_alias(cfg.registry.model_name, "champion", str(v1))
    url = serve.start_app(two)
    wait(lambda: running_replicas() == 2 and len(serve.watcher_status()["replicas"]) == 2, 180,
         "2 replicas never reported to the version watcher")
    stop, results, name = threading.Event(), [], cfg.registry.model_name

    def client(c: int):  # bounded in count; records (sent, answered, status, model)
        with requests.Session() as session:
            for i in range(400):
                if stop.is_set():
                    return
                sent = time.time()
                try:
                    r = session.post(f"{url}/v1/completions", timeout=60, headers=AUTH, json={
                        "prompt": f"Client {c}, line {i}", "max_tokens": 4, "temperature": 0})
                    results.append((sent, time.time(), r.status_code, r.json().get("model") if r.ok else r.text))
                except requests.RequestException as e:
                    results.append((sent, time.time(), None, repr(e)))

    pool = ThreadPoolExecutor(6)
    futures = [pool.submit(client, c) for c in range(6)]
    try:
        time.sleep(2)
        moved = time.time()
        tracking.client(cfg).set_registered_model_alias(cfg.registry.model_name, "champion", str(v2))
        status = wait(lambda: (x := serve.watcher_status())["mixed_s"] is not None and x["committed"] == v2 and x,
                      120, "the replicas did not both switch to v2 within 120 s")
        time.sleep(2)  # load goes on after the switch
    finally:
        stop.set()
        for f in futures:
            f.result()
        pool.shutdown()
    switched = [r["since"] for r in status["replicas"].values()]
    assert len(switched) == 2 and all(r["serving"] == v2 for r in status["replicas"].values())
    assert status["mixed_s"] == pytest.approx(max(switched) - min(switched))
    assert moved < min(switched) <= max(switched) < moved + 60  # bounded: poll + load + report, not 10 s timers
    failed = [r for r in results if r[2] != 200]
    assert not failed, failed[:3]
    late_old = [r for r in results if r[0] > max(switched) and r[3] == f"{name}/{v1}"]
    assert late_old == [], late_old[:3]
    assert any(r[3] == f"{name}/{v1}" for r in results) and any(r[0] > max(switched) for r in results)
    assert {r[3] for r in results if r[0] > max(switched)} == {f"{name}/{v2}"}
