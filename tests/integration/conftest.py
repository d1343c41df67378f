"""Fixtures of the multi-node tests: a real 2-node Ray cluster (``ray start`` processes, token auth) and an S3
server (moto, as its own process), both on 127.0.0.1 with free ports, both stopped even when a test fails."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="session")
def _gloo_group():
    """One gloo process group for every in-process DeepSpeed engine of the session. Session-wide, not per module:
    DeepSpeed caches the groups it derives from the first one it sees, so a group destroyed and created anew
    makes the next engine fail with "Group ... is not registered"."""
    import socket

    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


@pytest.fixture
def process_group(_gloo_group, monkeypatch):
    """A one-process gloo group for in-process DeepSpeed (Ray Train sets one up in real workers).

    LOCAL_RANK is set per test only: a Ray cluster started later in this process must not inherit it.
    """
    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed asserts on it


@pytest.fixture(scope="module")
def s3_server():
    """``moto_server`` on a free port; yields an ``s3://`` URI factory ``uri(prefix)`` (bucket ``rd-cluster``,
    credentials in the URI: the cluster's processes never see this test's environment)."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e .[test])")
    import pyarrow.fs as pafs
    import requests

    from raydistill.cluster.local_cluster import free_ports

    port = free_ports(1)[0]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60  # a loaded machine: moto's first answer can take seconds
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/", timeout=10)
                break
            except requests.RequestException:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        base = f"s3://testing:testing@rd-cluster/{{}}?endpoint_override=http://127.0.0.1:{port}&region=us-east-1"
        pafs.FileSystem.from_uri(base.format("x") + "&allow_bucket_creation=true")[0].create_dir("rd-cluster")
        yield base.format
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def two_nodes():
    """A head and one worker node, 1 CPU each, token auth on; ``LocalCluster`` (address, env(), token())."""
    from raydistill.cluster.local_cluster import LocalCluster

    with LocalCluster(workers=1) as cluster:
        yield cluster


@pytest.fixture
def cluster_env(two_nodes, monkeypatch):
    """This process as a client of ``two_nodes``: its token file and address in the environment."""
    for k, v in two_nodes.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", two_nodes.address)
    return two_nodes
