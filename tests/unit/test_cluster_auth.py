"""Every shipped way to start a cluster turns token auth on for every node (a node or client without the token is
refused: tests/integration/test_cluster.py shows it on a real cluster)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_launcher_starts_every_node_with_token_auth_and_ships_the_token():
    cfg = yaml.safe_load((ROOT / "cluster/launcher.yaml").read_text())
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if " start " in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0] and "0.0.0.0" not in starts[0]
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_rayjob_turns_on_token_auth_for_its_cluster_and_submitter():
    job = yaml.safe_load((ROOT / "cluster/kuberay/rayjob.yaml").read_text())["spec"]
    assert job["rayClusterSpec"]["authOptions"] == {"mode": "token"}  # KubeRay >= 1.5.1: every container
    for group in [job["rayClusterSpec"]["headGroupSpec"], *job["rayClusterSpec"]["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:  # nothing turns it back off
            assert _env(container).get("RAY_AUTH_MODE", "token") == "token"


def test_local_cluster_gives_every_node_its_own_token_file(tmp_path):
    from raydistill.cluster.local_cluster import LocalCluster

    env = LocalCluster(tmp_path).env()
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "auth_token")
    assert "RAY_AUTH_TOKEN" not in env  # a file, never the token itself in an environment
