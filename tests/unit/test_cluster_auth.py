"""Every YAML under cluster/ is checked for auth by what it is: a KubeRay resource turns Ray's token auth on for its
whole cluster (RayCluster, RayJob, RayService), the cluster launcher starts every node with the token and keeps
the dashboard on 127.0.0.1, a Serve config that listens beyond the machine requires API keys, and a runtime env
turns nothing off and carries no secret. A YAML that is none of these fails: a new kind of file needs its own
check here. (A node or client without the token is refused: tests/integration/test_cluster.py shows it on a real
cluster; a request without an API key gets 401: tests/integration/test_serve.py.)"""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from raydistill.tasks.guard import SECRET_NAME

ROOT = Path(__file__).resolve().parents[2]
YAMLS = sorted(p for p in (ROOT / "cluster").rglob("*") if p.suffix in (".yaml", ".yml"))
LOOPBACK = ("127.0.0.1", "localhost", "::1")
KUBERAY = ("RayCluster", "RayJob", "RayService")
RUNTIME_ENV_KEYS = {"env_vars", "pip", "uv", "conda", "working_dir", "py_modules", "excludes", "container",
                    "image_uri", "config", "nsight", "java_jars"}


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _no_auth_off(env: dict, where: str) -> None:
    assert env.get("RAY_AUTH_MODE", "token") == "token", f"{where}: RAY_AUTH_MODE turns token auth off"
    literal = sorted(k for k, v in env.items() if SECRET_NAME.search(k) and isinstance(v, str) and v)
    assert literal == [], f"{where}: secrets written into the file: {literal} (use a Secret / a token file)"


def check_kuberay(doc: dict, where: str) -> None:
    spec = doc["spec"]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
               "RayService": spec.get("rayClusterConfig")}[doc["kind"]]
    assert cluster, f"{where}: a {doc['kind']} without its own cluster spec"
    assert cluster.get("authOptions") == {"mode": "token"}, \
        f"{where}: no `authOptions: {{mode: token}}` (KubeRay >= 1.5.1 token auth on every Ray container)"
    for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
        for container in group["template"]["spec"]["containers"]:
            _no_auth_off(_env(container), f"{where}: container {container['name']}")
    if doc["kind"] == "RayService":
        check_serve_config(yaml.safe_load(spec["serveConfigV2"]), f"{where}: serveConfigV2")
    if doc["kind"] == "RayJob":
        argv = shlex.split(spec["entrypoint"])
        check_serve_overrides([a for a in argv if "=" in a], "127.0.0.1", f"{where}: entrypoint")
        _no_auth_off(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}").get("env_vars", {}), f"{where}: runtime env")


def check_serve_overrides(overrides: list[str], default_host: str, where: str) -> None:
    """Serving to the network (a host other than loopback) requires API keys; no key is written in the file."""
    values = dict(o.split("=", 1) for o in overrides)
    host = values.get("serve.host", default_host)
    if host not in LOOPBACK:
        assert values.get("serve.require_api_keys") == "true", \
            f"{where}: serves on {host} without serve.require_api_keys=true"
    assert not [k for k in values if "api_key" in k and k not in ("serve.api_keys_file", "serve.require_api_keys")]


def check_serve_config(doc: dict, where: str) -> None:
    host = (doc.get("http_options") or {}).get("host", "127.0.0.1")
    for app in doc["applications"]:
        if app["import_path"].startswith("raydistill."):
            check_serve_overrides(list(app.get("args", {}).get("overrides", [])), host, f"{where}: {app['name']}")
        _no_auth_off((app.get("runtime_env") or {}).get("env_vars", {}), f"{where}: {app['name']} runtime env")


def check_launcher(doc: dict, where: str) -> None:
    starts = [c for c in doc["head_start_ray_commands"] + doc["worker_start_ray_commands"] if " start " in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts), where
    assert "--dashboard-host=127.0.0.1" in starts[0] and "0.0.0.0" not in starts[0], where
    assert "~/.ray/auth_token" in doc["file_mounts"], f"{where}: the token file is not shipped to the nodes"


def check_runtime_env(doc: dict, where: str) -> None:
    _no_auth_off(doc.get("env_vars", {}), where)


def check_auth(doc, where: str) -> str:
    """Check one YAML document by its kind; returns the kind. Unknown kinds fail."""
    assert isinstance(doc, dict), f"{where}: not a mapping"
    if doc.get("kind") in KUBERAY:
        check_kuberay(doc, where)
        return doc["kind"]
    if "head_start_ray_commands" in doc:
        check_launcher(doc, where)
        return "launcher"
    if "applications" in doc:
        check_serve_config(doc, where)
        return "serve config"
    if doc and set(doc) <= RUNTIME_ENV_KEYS:
        check_runtime_env(doc, where)
        return "runtime env"
    raise AssertionError(f"{where}: a YAML of no known kind (keys {sorted(doc)[:6]}): add its auth check to "
                         "tests/unit/test_cluster_auth.py")


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_under_cluster_turns_auth_on(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs
    for doc in docs:
        check_auth(doc, str(path.relative_to(ROOT)))


def test_the_files_checked_are_every_shipped_kind():
    kinds = {str(p.relative_to(ROOT)): check_auth(yaml.safe_load(p.read_text()), str(p)) for p in YAMLS}
    assert kinds == {"cluster/launcher.yaml": "launcher", "cluster/runtime_env.yaml": "runtime env",
                     "cluster/kuberay/rayjob.yaml": "RayJob", "cluster/kuberay/rayservice.yaml": "RayService",
                     "cluster/serve/champion.yaml": "serve config"}


def _service() -> dict:
    return yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())


@pytest.mark.parametrize("break_it,message", [
    (lambda d: d["spec"]["rayClusterConfig"].pop("authOptions"), "authOptions"),
    (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAY_AUTH_MODE", "value": "disabled"}), "turns token auth off"),
    (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAYDISTILL_API_KEYS", "value": "written-into-the-manifest"}), "secrets written"),
    (lambda d: d["spec"].update(serveConfigV2=re.sub(r',\s*"serve.require_api_keys=true"', "",
                                                     d["spec"]["serveConfigV2"])), "without serve.require_api_keys"),
])
def test_a_file_that_drops_auth_fails_the_check(break_it, message):
    """A test of the checks: each way of turning auth off is caught, and so is a file of a new kind."""
    doc = _service()
    check_auth(doc, "rayservice")
    break_it(doc)
    with pytest.raises(AssertionError, match=message):
        check_auth(doc, "rayservice")


def test_a_yaml_of_a_new_kind_fails_until_it_has_a_check():
    with pytest.raises(AssertionError, match="no known kind"):
        check_auth({"apiVersion": "v1", "kind": "Service", "spec": {"ports": [{"port": 8265}]}}, "new.yaml")
    raycluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
                  "spec": {"headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0"},
                                             "template": {"spec": {"containers": [{"name": "ray-head"}]}}}}}
    with pytest.raises(AssertionError, match="authOptions"):
        check_auth(raycluster, "raycluster.yaml")


def test_local_cluster_gives_every_node_its_own_token_file(tmp_path):
    from raydistill.cluster.local_cluster import LocalCluster

    env = LocalCluster(tmp_path).env()
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "auth_token")
    assert "RAY_AUTH_TOKEN" not in env  # a file, never the token itself in an environment
