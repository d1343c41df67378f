"""The embedded cluster's processes reach their own State API while another Ray cluster runs on the machine.

Ray Train's placement-group cleaner (a detached actor next to every Train controller) asks the State API, with no
address, whether its controller is alive. Ray then looks for "the" local cluster and raises ConnectionError when
the machine runs two; the cleaner's thread died of it, a Tune trial stopped by ASHA kept its placement group and
the next Train run waited for its CPUs forever (test_tune_report's hang on a machine shared with CI and other
runs). ``init_ray`` names the cluster's own API server to all its processes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def another_cluster():
    """A second, bare Ray cluster in its own process (its own GCS), up until the module ends."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    code = ("import sys, ray; ray.init(num_cpus=0, include_dashboard=False); print('up', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "up", "the second Ray cluster did not start"
        yield
    finally:
        proc.stdin.close()  # its ray.init ends with the process
        proc.wait(timeout=60)


def test_a_worker_asks_the_state_api_about_an_actor_of_its_own_cluster_while_another_cluster_runs(
        another_cluster, ray_cluster):
    import ray
    from ray.util.state import list_actors

    @ray.remote(num_cpus=0)
    class Watched:
        def ping(self) -> bool:
            return True

    @ray.remote(num_cpus=0)
    def state_of(actor_id: str) -> str:
        from ray.util.state import get_actor  # what Train's placement-group cleaner calls

        return get_actor(actor_id, timeout=30).state

    watched = Watched.remote()
    assert ray.get(watched.ping.remote())
    actor_id = watched._actor_id.hex()
    assert ray.get(state_of.remote(actor_id)) == "ALIVE"
    # and this driver, naming its cluster (its environment is left alone: the variable would override the
    # address of every Jobs/State client in the process, and outlive this cluster)
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
    assert actor_id in {a.actor_id for a in alive}
