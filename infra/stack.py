#!/usr/bin/env python3
"""The registry server stack on one machine: PostgreSQL + an S3-compatible store + ``mlflow server``.

    .venv/bin/python infra/stack.py up --dir /tmp/raydistill-stack      # start (or find running) all three
    .venv/bin/python infra/stack.py status --dir /tmp/raydistill-stack  # JSON: ports, pids, alive, tracking_uri
    .venv/bin/python infra/stack.py down --dir /tmp/raydistill-stack    # stop all three (idempotent)
    raydistill pipeline --config tiny registry.tracking_uri=$(.venv/bin/python infra/stack.py uri --dir /tmp/raydistill-stack)

The integration tests start the stack with exactly these commands (``tests/integration/test_registry_server.py``).

- PostgreSQL (Debian's ``postgresql`` package: ``/usr/lib/postgresql/*/bin``) is the MLflow backend store; its
  data directory is ``DIR/pg`` (initialised once, kept across ``down``/``up``), password auth over TCP on
  127.0.0.1 only (no Unix socket). ``initdb`` refuses to run as root, so as root the server runs as the
  ``postgres`` user (``RAYDISTILL_PG_USER``) via ``runuser``; DIR must then be reachable by that user.
- The S3-compatible store is moto's server (``moto_server``, in the ``test`` extra), in memory: artifacts live
  until ``down``. A real deployment points ``--artifacts-destination`` at its own bucket instead.
- ``mlflow server --serve-artifacts`` proxies artifacts, so clients need no object-store credentials.

Every server binds 127.0.0.1 on a free port; ``DIR/stack.json`` (mode 600: it holds the generated database
password) records ports, pids and URIs; logs go to ``DIR/logs``. Servers run under this interpreter
(``python -m mlflow``, ``python -m moto.server``): run the script with the venv's python.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from raydistill.cluster.local_cluster import free_ports

BUCKET = "raydistill-artifacts"
S3_KEY, S3_SECRET = "raydistill", "raydistill-local-secret"  # moto accepts any; fixed so restarts agree
DB_USER, DB_NAME = "raydistill", "mlflow"


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (our own exited child) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True


def wait_until(check, what: str, log: Path, timeout: float = 120.0, pid: int | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and (pid is None or alive(pid)):
        if check():
            return
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    why = "exited" if pid is not None and not alive(pid) else f"did not come up within {timeout:.0f} s"
    raise SystemExit(f"stack: {what} {why}; log {log}:\n{tail}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------ postgres

def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found or not found[-1]:
        raise SystemExit(f"stack: PostgreSQL's {name} not found; install it: apt-get install -y postgresql")
    return found[-1]


def as_pg_user(cmd: list[str]) -> list[str]:
    """``cmd`` as the unprivileged PostgreSQL user when we are root (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return cmd
    user = os.environ.get("RAYDISTILL_PG_USER", "postgres")
    return ["runuser", "-u", user, "--", *cmd]


def _give_to_pg_user(path: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam(os.environ.get("RAYDISTILL_PG_USER", "postgres"))
        os.chown(path, user.pw_uid, user.pw_gid)


def pg_up(root: Path, state: dict) -> None:
    data, log = root / "pg", root / "logs" / "postgres.log"
    if not (data / "PG_VERSION").exists():
        data.mkdir(mode=0o700, exist_ok=True)
        _give_to_pg_user(data)
        pwfile = root / "pg.pw"
        pwfile.write_text(state["db_password"] + "\n")
        _give_to_pg_user(pwfile)
        out = subprocess.run(as_pg_user([pg_bin("initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={pwfile}",
                                         "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"]),
                             capture_output=True, text=True)
        pwfile.unlink()
        if out.returncode:
            raise SystemExit(f"stack: initdb failed (is {root} reachable by the postgres user?):\n{out.stderr}")
    log.touch()
    _give_to_pg_user(log)
    port = state["ports"]["postgres"]
    opts = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
    out = subprocess.run(as_pg_user([pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w",
                                     "-t", "60", "start"]), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"stack: PostgreSQL did not start: {out.stderr}\n{log.read_text()[-2000:]}")
    state["pids"]["postgres"] = int((data / "postmaster.pid").read_text().split()[0])
    env = {**os.environ, "PGPASSWORD": state["db_password"]}
    exists = subprocess.run([pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, "-d", "postgres",
                             "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"],
                            capture_output=True, text=True, env=env)
    if exists.stdout.strip() != "1":
        subprocess.run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME],
                       check=True, env=env)


def pg_down(root: Path) -> None:
    data = root / "pg"
    if (data / "postmaster.pid").exists():
        subprocess.run(as_pg_user([pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True)


# ------------------------------------------------------------------------------------------- moto + mlflow

def spawn(cmd: list[str], log: Path, env: dict | None = None) -> int:
    """Start ``cmd`` in its own session (so ``down`` can stop it and its workers as one group)."""
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True).pid


def s3_env(state: dict) -> dict:
    return {"MLFLOW_S3_ENDPOINT_URL": state["s3_endpoint"], "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


def s3_up(root: Path, state: dict) -> None:
    log = root / "logs" / "moto.log"
    state["pids"]["s3"] = spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(state["ports"]["s3"])], log)
    wait_until(lambda: http_ok(state["s3_endpoint"] + "/moto-api/"), "the S3 server (moto)", log, 60,
               pid=state["pids"]["s3"])
    import boto3  # moto's dependency: present wherever moto_server is

    env = s3_env(state)
    boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id=S3_KEY,
                 aws_secret_access_key=S3_SECRET, region_name="us-east-1").create_bucket(Bucket=BUCKET)


def mlflow_up(root: Path, state: dict) -> None:
    log = root / "logs" / "mlflow.log"
    port = state["ports"]["mlflow"]
    backend = (f"postgresql+psycopg2://{DB_USER}:{state['db_password']}@127.0.0.1:{state['ports']['postgres']}/{DB_NAME}")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--serve-artifacts",
           "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    # no background job runner (GenAI evaluation jobs): raydistill does not use it, and it forks 7 workers
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, **s3_env(state)}
    state["pids"]["mlflow"] = spawn(cmd, log, env=env)
    wait_until(lambda: http_ok(f"{state['tracking_uri']}/health"), "mlflow server", log, 180,
               pid=state["pids"]["mlflow"])


def stop(pid: int | None, grace: float = 10.0) -> None:
    if not alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    if alive(pid):
        os.killpg(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ commands

def state_path(root: Path) -> Path:
    return root / "stack.json"


def read_state(root: Path) -> dict | None:
    p = state_path(root)
    return json.loads(p.read_text()) if p.exists() else None


def write_state(root: Path, state: dict) -> None:
    p = state_path(root)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)


def status(root: Path) -> dict:
    state = read_state(root) or {}
    pids = state.get("pids", {})
    running = {name: alive(pid) for name, pid in pids.items()}
    return {"dir": str(root), "tracking_uri": state.get("tracking_uri"), "ports": state.get("ports", {}),
            "pids": pids, "alive": running, "up": bool(running) and all(running.values()) and len(running) == 3}


def up(root: Path) -> dict:
    now = status(root)
    if now["up"]:
        return now
    down(root)  # a half-started or crashed stack: start clean (the database files are kept)
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(root, 0o755)  # the postgres user must reach DIR/pg; stack.json stays 600
        os.chmod(root / "logs", 0o755)
    old = read_state(root) or {}
    ports = dict(zip(("postgres", "s3", "mlflow"), free_ports(3)))  # held open together: three distinct ports
    state = {"ports": ports, "pids": {}, "db_password": old.get("db_password") or secrets.token_hex(16),
             "s3_endpoint": f"http://127.0.0.1:{ports['s3']}", "tracking_uri": f"http://127.0.0.1:{ports['mlflow']}",
             "artifacts": f"s3://{BUCKET}/mlartifacts"}
    try:
        for start in (pg_up, s3_up, mlflow_up):
            start(root, state)
            write_state(root, state)
    except BaseException:
        write_state(root, state)
        down(root)
        raise
    return status(root)


def down(root: Path) -> dict:
    state = read_state(root)
    if state:
        stop(state["pids"].get("mlflow"))
        stop(state["pids"].get("s3"))
    if (root / "pg").exists():
        pg_down(root)
    if state:
        state["pids"] = {}
        write_state(root, state)
    return status(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], prog="infra/stack.py")
    p.add_argument("command", choices=("up", "down", "status", "uri"))
    p.add_argument("--dir", required=True, help="where the database files, logs and stack.json live")
    args = p.parse_args(argv)
    root = Path(args.dir).resolve()
    if args.command == "uri":
        print(status(root)["tracking_uri"] or "")
        return 0
    result = {"up": up, "down": down, "status": status}[args.command](root)
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0 if args.command != "up" or result["up"] else 1


if __name__ == "__main__":
    sys.exit(main())
