"""A real multi-node Ray cluster on this machine: a head and N worker nodes, each its own ``ray start`` process.

    python -m raydistill.cluster.local_cluster start --dir /tmp/rdc --workers 1 --num-cpus 1
    python -m raydistill.cluster.local_cluster status --dir /tmp/rdc
    python -m raydistill.cluster.local_cluster stop --dir /tmp/rdc

Every node binds 127.0.0.1 (``--node-ip-address``), the dashboard listens on 127.0.0.1 only, every port is a
free one picked at start (several clusters can run side by side), and token auth is on for every node
(``RAY_AUTH_MODE=token``) with a fresh token in ``<dir>/auth_token``: the user's ``~/.ray`` is never read or
written. A client joins with ``LocalCluster.env()`` (``RAY_AUTH_MODE`` + ``RAY_AUTH_TOKEN_PATH``; printed by
``status``). ``stop`` ends only this cluster's processes (the recorded ``ray start --block`` processes, then any
process still naming ``<dir>``), never a machine-wide ``ray stop``.

Importable too: ``with LocalCluster(root, workers=1) as c: ...`` (the tests' fixture).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

STATE = "cluster.json"
TOKEN = "auth_token"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class NodeSpec:
    """What one node offers the scheduler."""

    num_cpus: int = 1
    """Logical CPUs of the node."""
    num_gpus: int = 0
    """Logical GPUs (none need exist: tests check GPU scheduling on CPU machines)."""
    resources: dict = field(default_factory=dict)
    """Custom resources, e.g. ``{"node_b": 1}``."""


class LocalCluster:
    """A head plus ``workers`` worker nodes under ``root`` (a short path: Ray's socket paths live under it)."""

    def __init__(self, root: str | Path | None = None, workers: int = 1, head: NodeSpec | None = None,
                 worker: NodeSpec | None = None, object_store_mb: int = 200, timeout_s: float = 90.0):
        self.root = Path(root or tempfile.mkdtemp(prefix="rdc-", dir="/tmp")).resolve()
        self.workers, self.head, self.worker = workers, head or NodeSpec(), worker or NodeSpec()
        self.object_store_mb, self.timeout_s = object_store_mb, timeout_s
        self.state: dict = {}
        self.procs: dict[str, subprocess.Popen] = {}
        """This process's ``ray start --block`` children by node name (``head``, ``worker0``, …)."""
        self.started: dict[str, tuple] = {}
        """How each node was started (``_node``'s arguments), to start a worker again that gave up starting."""

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalCluster":
        """Write the token, start the head, then each worker node; wait until every node is alive."""
        if (self.root / STATE).exists():
            raise RuntimeError(f"{self.root / STATE} exists: a cluster already runs there (stop it first)")
        self.root.mkdir(parents=True, exist_ok=True)
        token = self.root / TOKEN
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        gcs, dash, client = free_ports(3)
        self.state = {"root": str(self.root), "gcs_address": f"127.0.0.1:{gcs}",
                      "dashboard_url": f"http://127.0.0.1:{dash}", "client_port": client,
                      "token_path": str(token), "pids": [], "nodes": 1 + self.workers}
        try:
            self._node("head", self.head, ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                                           f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                                           "--include-dashboard=true"])
            self.wait_nodes(1)
            for i in range(self.workers):
                self.add_worker(self.worker, name=f"worker{i}")
                self.wait_nodes(1 + self.workers)
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, spec: NodeSpec, name: str, env: dict | None = None) -> subprocess.Popen:
        """Start one more worker node joining the head (``env`` replaces the node's auth env: tests start a
        node without the token this way)."""
        return self._node(name, spec, [f"--address={self.state['gcs_address']}"], env=env)

    def _node(self, name: str, spec: NodeSpec, extra: list[str], env: dict | None = None) -> subprocess.Popen:
        # Each node its own --temp-dir, as on separate machines: nodes sharing one unpack a job's working_dir
        # into the same path, replacing the directory a running driver has as its cwd.
        nm, om, agent, agent_grpc, rt_env, metrics = free_ports(6)
        # `python -m`, not the venv's `ray` script: a script's shebang may name another interpreter (a copied
        # venv's names the original's), and every node process and worker runs the interpreter `ray start` ran in
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address=127.0.0.1",
               f"--num-cpus={spec.num_cpus}", f"--num-gpus={spec.num_gpus}",
               f"--resources={json.dumps({**spec.resources, marker(name): 1})}",
               f"--object-store-memory={self.object_store_mb << 20}",
               f"--temp-dir={self.root / name}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
               "--disable-usage-stats", *extra]
        log = open(self.root / f"{name}.log", "ab")
        env = {**os.environ, **self.env()} if env is None else env
        env.pop("RAY_AUTH_TOKEN", None)  # the token file is the one source: never a token in an environment
        proc = subprocess.Popen(cmd, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.state["pids"].append(proc.pid)
        self.procs[name] = proc
        self.started[name] = (spec, extra, env)
        (self.root / STATE).write_text(json.dumps(self.state, indent=1))
        return proc

    def stop_node(self, name: str, sig: int = signal.SIGTERM) -> None:
        """End one node (``SIGKILL``: as if its machine died) and wait until its processes are gone."""
        proc = self.procs.pop(name)
        _signal_group(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(15)

    def stop(self) -> None:
        """End this cluster's processes only, then remove its directory."""
        state = self.state or load_state(self.root)
        if not state:  # not a cluster's directory: touch nothing
            return
        for pid in reversed(state.get("pids", [])):
            _signal_group(pid, signal.SIGTERM)
        deadline = time.time() + 8  # ray start --block stops its processes on SIGTERM
        while time.time() < deadline and any(_alive(p) for p in state.get("pids", [])):
            time.sleep(0.2)
        for pid in state.get("pids", []):
            _signal_group(pid, signal.SIGKILL)
        _kill_naming(str(self.root))
        shutil.rmtree(self.root, ignore_errors=True)
        self.state = {}

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ clients
    @property
    def address(self) -> str:
        """The dashboard (Jobs API) address, ``http://127.0.0.1:PORT``."""
        return self.state["dashboard_url"]

    @property
    def gcs_address(self) -> str:
        return self.state["gcs_address"]

    def env(self) -> dict:
        """What a client (driver, Jobs SDK, ``ray`` CLI) needs in its environment to be let in."""
        bin_dir = str(Path(sys.executable).parent)  # a job's `raydistill`/`python` are this environment's
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.root / TOKEN),
                "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    @contextlib.contextmanager
    def as_client(self):
        """This process as the cluster's client (drivers, Jobs SDK) inside the block, its environment restored
        after. Ray reads ``RAY_AUTH_MODE`` into its config once and caches the first token it loads, so both
        are refreshed here (what ``ray.init`` does when it turns token auth on by itself)."""
        saved = {k: os.environ.get(k) for k in (*self.env(), "RAY_AUTH_TOKEN")}
        os.environ.update({k: v for k, v in self.env().items() if k != "PATH"})
        os.environ.pop("RAY_AUTH_TOKEN", None)
        _refresh_ray_auth()
        try:
            yield self
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
            _refresh_ray_auth()

    def token(self) -> str:
        return (self.root / TOKEN).read_text().strip()

    def nodes(self) -> list[dict]:
        """Alive nodes as the dashboard's state API lists them (``node_id``, ``resources_total``, …)."""
        import requests

        r = requests.get(f"{self.address}/api/v0/nodes", params={"limit": 100, "detail": "1"},
                         headers={"Authorization": f"Bearer {self.token()}"}, timeout=10)
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_nodes(self, n: int, name: str | None = None) -> None:
        """Until ``n`` nodes are alive, one of them ``name`` if given (``TimeoutError`` with the nodes' logs after
        ``timeout_s``). A worker whose ``ray start`` gave up (it waits 30 s for the GCS) is started once more."""
        deadline, last, retried = time.time() + self.timeout_s, None, set()
        while time.time() < deadline:
            for gone in [k for k, p in self.procs.items() if k != "head" and p.poll() is not None]:
                if gone not in retried:  # on a loaded machine `ray start` gives up after 30 s: once more
                    retried.add(gone)
                    _signal_group(self.procs[gone].pid, signal.SIGKILL)  # its raylet may linger half-started
                    self._node(gone, *self.started[gone])
                    deadline = max(deadline, time.time() + self.timeout_s)
            try:
                nodes = self.nodes()
                if len(nodes) >= n and (name is None or any(marker(name) in x["resources_total"] for x in nodes)):
                    return
            except Exception as e:  # the dashboard is still starting
                last = e
            time.sleep(1)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in self.root.glob("*.log"))
        raise TimeoutError(f"{n} Ray nodes not alive after {self.timeout_s:.0f} s ({last}); logs:\n{logs}")


def marker(name: str) -> str:
    """The custom resource naming a node (``rdc_worker0``): tests find a node by it."""
    return f"rdc_{name}"


def load_state(root: str | Path) -> dict:
    path = Path(root) / STATE
    return json.loads(path.read_text()) if path.exists() else {}


def _refresh_ray_auth() -> None:
    """Make an already imported Ray see the current ``RAY_AUTH_*`` environment (nothing to do before import)."""
    if "ray" not in sys.modules:
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children (zombies count as gone)
        return waited == 0
    except ChildProcessError:
        return True
    except OSError:
        return False


def _signal_group(pid: int, sig: int) -> None:
    """``ray start --block`` runs in its own session: signal its whole group (raylet, GCS, workers)."""
    try:
        os.killpg(pid, sig)
    except OSError:
        pass


def _kill_naming(root: str) -> None:
    """Kill leftover processes whose command line names ``root`` (this cluster's temp dir), and nothing else."""
    import psutil

    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != me and any(root in arg for arg in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raydistill.cluster.local_cluster",
                                      description="Start, inspect or stop a multi-node Ray cluster on 127.0.0.1.")
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--dir", required=True, help="the cluster's directory (token, logs, Ray temp dir)")
    parser.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    parser.add_argument("--num-cpus", type=int, default=1, help="logical CPUs per node")
    parser.add_argument("--num-gpus", type=int, default=0, help="logical GPUs per node")
    args = parser.parse_args(argv)
    spec = NodeSpec(num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    cluster = LocalCluster(args.dir, workers=args.workers, head=spec, worker=spec)
    if args.command == "start":
        cluster.start()
    elif args.command == "stop":
        cluster.stop()
        print(f"stopped {args.dir}")
        return
    cluster.state = load_state(args.dir)
    if not cluster.state:
        parser.error(f"no cluster in {args.dir} (start one: python -m raydistill.cluster.local_cluster start "
                     f"--dir {args.dir})")
    nodes = cluster.nodes()
    print(json.dumps({"address": cluster.address, "gcs_address": cluster.gcs_address, "nodes": len(nodes),
                      "cpus": sum(n["resources_total"].get("CPU", 0) for n in nodes)}))
    client_env = {k: v for k, v in cluster.env().items() if k != "PATH"}
    print("\n".join(f"export {k}={v}" for k, v in {**client_env, "RAY_ADDRESS": cluster.address}.items()))


if __name__ == "__main__":
    main()
