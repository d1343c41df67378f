"""Follow and control submitted jobs over the Ray Jobs SDK (the token is sent as for ``submit``).

    raydistill job list   submit.address=http://HEAD:8265
    raydistill job status --config tiny submit.address=http://HEAD:8265       # latest attempt of this config
    raydistill job logs   --config tiny submit.address=… submit.follow=true    # like `ray job logs -f`
    raydistill job stop   submit.job_id=raydistill-pipeline-0123456789-2 submit.address=…

Without ``submit.job_id`` a job is found the way ``submit`` names it: the latest attempt of
``raydistill-<submit.verb>-<config hash>``, so the command that submitted a job, with ``submit`` replaced by
``job status``, asks about that job.
"""

from __future__ import annotations

import re
import time

from raydistill.tasks.config import PipelineConfig
from raydistill.tasks.errors import JobError
from raydistill.workflows.submit import _ACTIVE, _follow, connect, job_command, submission_prefix


def _status(job) -> str:
    return str(getattr(job, "status", "")).split(".")[-1]


def job_id(cfg: PipelineConfig, client) -> str:
    """``submit.job_id``, or the latest attempt submitted with this config and ``submit.verb``."""
    if cfg.submit.job_id:
        return cfg.submit.job_id
    prefix = submission_prefix(cfg, job_command(cfg))
    attempts = {}
    for job in client.list_jobs():
        m = re.fullmatch(re.escape(prefix) + r"-(\d+)", getattr(job, "submission_id", None) or "")
        if m:
            attempts[int(m.group(1))] = job.submission_id
    if not attempts:
        raise JobError(f"no job {prefix}-N on this cluster (submitted with another config or submit.verb?); "
                       "`raydistill job list` shows its jobs, submit.job_id=ID picks one")
    return attempts[max(attempts)]


def list_jobs(client) -> list[dict]:
    """Every job the cluster knows, oldest first."""
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    rows = [{"submission_id": j.submission_id, "status": _status(j), "verb": (j.metadata or {}).get("raydistill.verb"),
             "start_time": j.start_time, "end_time": j.end_time, "message": j.message} for j in jobs]
    for r in rows:
        print(f"{r['submission_id'] or '-':<48} {r['status']:<10} {r['verb'] or ''}")
    return rows


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """``list`` | ``status`` | ``logs`` (``submit.follow``: until the job ends) | ``stop`` (waits until it has)."""
    _, client = connect(cfg)
    if action == "list":
        return {"jobs": list_jobs(client)}
    sid = job_id(cfg, client)
    if action == "logs":
        if cfg.submit.follow:
            return {"submission_id": sid, "status": _follow(client, sid, cfg.submit.timeout_s)}
        print(client.get_job_logs(sid), end="", flush=True)
        return {"submission_id": sid, "status": _status(client.get_job_info(sid))}
    if action == "stop":
        client.stop_job(sid)
        deadline = time.time() + (cfg.submit.timeout_s or 60)
        while _status(client.get_job_info(sid)) in _ACTIVE and time.time() < deadline:
            time.sleep(1)
    info = client.get_job_info(sid)
    print(f"{sid}: {_status(info)}" + (f" ({info.message})" if info.message else ""))
    return {"submission_id": sid, "status": _status(info), "message": info.message,
            "metadata": dict(info.metadata or {})}
