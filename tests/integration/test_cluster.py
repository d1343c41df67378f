"""A real 2-node cluster (``cluster/local_cluster.py``): nodes on 127.0.0.1 with their own CPUs, token auth that
keeps out nodes and clients without the token, and ``raydistill submit`` / ``job`` over the Jobs SDK."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests

from raydistill.cluster.local_cluster import NodeSpec
from raydistill.workflows.cli import main

pytestmark = pytest.mark.integration


def test_two_nodes_each_with_its_own_cpu_and_the_dashboard_on_127_0_0_1_only(two_nodes):
    nodes = two_nodes.nodes()
    assert len(nodes) == 2
    # Ray (services.resolve_ip_for_localhost) swaps --node-ip-address=127.0.0.1 for this machine's routable
    # address on Linux: one IP for both nodes, and the dashboard is not served there (127.0.0.1 only)
    ips = {n["node_ip"] for n in nodes}
    assert len(ips) == 1
    assert [n["resources_total"]["CPU"] for n in nodes] == [1.0, 1.0]
    assert sum(bool(n["is_head_node"]) for n in nodes) == 1
    assert two_nodes.address.startswith("http://127.0.0.1:")
    with pytest.raises(requests.ConnectionError):
        requests.get(two_nodes.address.replace("127.0.0.1", ips.pop()), timeout=5)


def test_a_node_started_without_the_token_cannot_join(two_nodes, tmp_path):
    # no RAY_AUTH_MODE, no token anywhere (a HOME without ~/.ray): what a node outside the cluster has
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), PATH=two_nodes.env()["PATH"])
    rogue = two_nodes.add_worker(NodeSpec(num_cpus=1, resources={"rogue": 1}), name="rogue", env=env)
    try:
        deadline = time.time() + 120  # it gives up within seconds on a calm machine; minutes when loaded
        while rogue.poll() is None and time.time() < deadline:
            time.sleep(1)
        nodes = two_nodes.nodes()
        assert len(nodes) == 2 and not any("rogue" in n["resources_total"] for n in nodes)
        assert rogue.poll() not in (None, 0)  # `ray start` gave up: the head refused it
    finally:
        two_nodes.stop_node("rogue")


def test_clients_without_the_token_are_refused(two_nodes, tmp_path, monkeypatch, capsys):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = f"{two_nodes.address}/api/jobs/"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer not-the-token"}, timeout=10).status_code == 403
    assert requests.get(url, headers={"Authorization": f"Bearer {two_nodes.token()}"}, timeout=10).status_code == 200
    with pytest.raises(AuthenticationError, match="Authentication failed"):
        JobSubmissionClient(two_nodes.address, headers={"Authorization": "Bearer not-the-token"}).list_jobs()
    # the SDK in a process that has no token at all
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    code = f"from ray.job_submission import JobSubmissionClient as C; C({two_nodes.address!r}).list_jobs()"
    r = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(tmp_path)}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "Authentication required" in r.stderr
    # raydistill's own client with a wrong token file: a JobError naming the fix
    (tmp_path / "wrong").write_text("not-the-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "wrong"))
    assert main(["job", "list", f"submit.address={two_nodes.address}"]) == 1
    assert "refused this client's token" in capsys.readouterr().err

