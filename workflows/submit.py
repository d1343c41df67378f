"""Submit a raydistill verb as a Ray job to a (remote) cluster.

    raydistill submit --address http://HEAD:8265 --config smollm2-shakespeare --verb pipeline --wait

The resolved config travels with the job (as ``config.yaml`` in the job's working directory), so what runs
is exactly what ``--print-config`` shows here. ``--upload-code`` also ships this checkout's ``tasks``,
``workflows`` and ``cluster`` packages (for clusters whose image lacks raydistill).

Ray Jobs never retry by themselves: resubmission is the resume mechanism. The submission id is
``raydistill-<verb>-<config hash>-<attempt>``; resubmitting the same config starts the next attempt, which
skips finished stages and resumes the cache and training from what the first attempt left in ``run_dir``
(so ``run_dir``/``cache.dir`` must be on storage every node sees). A still-running attempt is never doubled.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import tempfile
import time
from pathlib import Path

from raydistill.tasks.config import PipelineConfig, dump_yaml

_ACTIVE = {"PENDING", "RUNNING"}
_ROOT = Path(__file__).resolve().parent.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray dashboard address, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--verb", default="pipeline",
                        choices=["cache", "train", "tune", "quantize", "register", "promote", "serve", "pipeline"],
                        help="verb to run on the cluster (default: pipeline)")
    parser.add_argument("--upload-code", action="store_true",
                        help="ship this checkout's packages with the job (cluster image without raydistill)")
    parser.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    parser.add_argument("--timeout", type=float, default=None, help="with --wait: give up after N seconds")


def submission_prefix(cfg: PipelineConfig, verb: str) -> str:
    digest = hashlib.sha256(dump_yaml(cfg).encode()).hexdigest()[:10]
    return f"raydistill-{verb}-{digest}"


def next_submission_id(existing: list, prefix: str) -> str:
    """The next attempt's id; refuses while an attempt for the same config is still running."""
    attempts = []
    for job in existing:
        sid = getattr(job, "submission_id", None) or ""
        m = re.fullmatch(re.escape(prefix) + r"-(\d+)", sid)
        if not m:
            continue
        status = str(getattr(job, "status", "")).split(".")[-1]
        if status in _ACTIVE:
            raise SystemExit(f"raydistill submit: {sid} is still {status}; not submitting a second copy "
                             f"(stop it with `ray job stop {sid}` first)")
        attempts.append(int(m.group(1)))
    return f"{prefix}-{max(attempts, default=0) + 1}"


def build_job(cfg: PipelineConfig, verb: str, upload_code: bool, workdir: Path) -> dict:
    """The job's working directory contents and runtime env (pure: testable without a cluster)."""
    (workdir / "config.yaml").write_text(dump_yaml(cfg))
    runtime_env: dict = {"working_dir": str(workdir), "env_vars": {"HF_HUB_OFFLINE": "1"}}
    if upload_code:
        for pkg in ("tasks", "workflows", "cluster"):
            shutil.copytree(_ROOT / pkg, workdir / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        entrypoint = f"python -m workflows.cli {verb} --config config.yaml"
    else:
        entrypoint = f"raydistill {verb} --config config.yaml"
    return {"entrypoint": entrypoint, "runtime_env": runtime_env}


def run(cfg: PipelineConfig, args: argparse.Namespace) -> dict:
    import os

    from ray.job_submission import JobSubmissionClient

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SystemExit("raydistill submit: give --address http://HEAD:8265 or set RAY_ADDRESS")
    client = JobSubmissionClient(address)
    prefix = submission_prefix(cfg, args.verb)
    sid = next_submission_id(client.list_jobs(), prefix)
    with tempfile.TemporaryDirectory(prefix="raydistill-job-") as tmp:
        job = build_job(cfg, args.verb, args.upload_code, Path(tmp))
        client.submit_job(entrypoint=job["entrypoint"], runtime_env=job["runtime_env"], submission_id=sid,
                          metadata={"raydistill.verb": args.verb, "raydistill.run_dir": cfg.run_dir})
    print(f"submitted {sid}: {job['entrypoint']}\n  logs: ray job logs --address {address} -f {sid}")
    result = {"submission_id": sid, "entrypoint": job["entrypoint"], "address": address}
    if args.wait:
        result["status"] = _follow(client, sid, args.timeout)
        if result["status"] != "SUCCEEDED":
            raise SystemExit(f"raydistill submit: {sid} ended {result['status']}; resubmit to resume")
    return result


def _follow(client, sid: str, timeout: float | None) -> str:
    deadline = None if timeout is None else time.time() + timeout
    printed = 0
    while True:
        logs = client.get_job_logs(sid)
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        status = str(client.get_job_status(sid)).split(".")[-1]
        if status not in _ACTIVE:
            return status
        if deadline and time.time() > deadline:
            return "TIMEOUT"
        time.sleep(2)
