"""Submit a raydistill verb as a Ray job to a (remote) cluster.

    raydistill submit --config smollm2-shakespeare submit.address=http://HEAD:8265 submit.verb=pipeline \
        submit.wait=true

The config travels with the job (as ``config.yaml`` in the job's working directory), so what runs is exactly
what ``--print-config`` shows here; ``submit.verb`` says what the job runs (a verb and optionally its action,
e.g. ``promote rollback``). ``submit.upload_code`` also ships this checkout's ``raydistill`` package (for
clusters whose image lacks raydistill).

Ray Jobs never retry by themselves: resubmission is the resume mechanism. The submission id is
``raydistill-<verb>-<config hash>-<attempt>`` (the hash leaves out the ``submit`` section: following a job or
not is no new job); resubmitting the same config starts the next attempt, which
skips finished stages and resumes the cache and training from what the first attempt left in ``run_dir``
(so ``run_dir``/``cache.dir`` must be on storage every node sees). A still-running attempt is never doubled.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

import yaml

from raydistill import copy_package
from raydistill.tasks.config import ConfigError, PipelineConfig, dump_yaml, to_dict
from raydistill.tasks.errors import JobError
from raydistill.tasks.guard import redact
from raydistill.workflows.verbs import VERBS

_ACTIVE = {"PENDING", "RUNNING"}


def job_command(cfg: PipelineConfig) -> list[str]:
    """``submit.verb`` as ``[verb]`` or ``[verb, action]``, checked against the verb table."""
    words = cfg.submit.verb.split()
    verbs = [v for v in VERBS if v not in ("submit", "job")]
    if words[0] not in verbs:
        close = difflib.get_close_matches(words[0], verbs, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"submit.verb={cfg.submit.verb!r}: {hint}verbs a job can run: {', '.join(verbs)}")
    actions = VERBS[words[0]].actions
    if len(words) > 2 or (len(words) == 2 and words[1] not in actions):
        raise ConfigError(f"submit.verb={cfg.submit.verb!r}: '{words[0]}' takes "
                          + (f"one action of {', '.join(actions)}" if actions else "no action"))
    return words


def submission_prefix(cfg: PipelineConfig, command: list[str]) -> str:
    """``raydistill-<verb>[-<action>]-<hash of the config without its submit section>``."""
    data = {k: v for k, v in to_dict(cfg).items() if k != "submit"}
    digest = hashlib.sha256(yaml.safe_dump(data, sort_keys=False).encode()).hexdigest()[:10]
    return f"raydistill-{'-'.join(command)}-{digest}"


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
            raise JobError(f"{sid} is still {status}; not submitting a second copy "
                           f"(stop it with `ray job stop {sid}` first)")
        attempts.append(int(m.group(1)))
    return f"{prefix}-{max(attempts, default=0) + 1}"


def build_job(cfg: PipelineConfig, command: list[str], upload_code: bool, workdir: Path) -> dict:
    """The job's working directory contents and runtime env (pure: testable without a cluster)."""
    (workdir / "config.yaml").write_text(dump_yaml(cfg))
    runtime_env: dict = {"working_dir": str(workdir), "env_vars": {"HF_HUB_OFFLINE": "1"}}
    args = f"{' '.join(command)} --config config.yaml"
    if upload_code:
        copy_package(workdir / "raydistill")
        entrypoint = f"python -m raydistill {args}"
    else:
        entrypoint = f"raydistill {args}"
    return {"entrypoint": entrypoint, "runtime_env": runtime_env}


def auth_headers() -> dict:
    """``Authorization: Bearer <token>`` from ``RAY_AUTH_TOKEN`` or the file ``RAY_AUTH_TOKEN_PATH`` (Ray's
    order), or nothing (Ray then sends ``~/.ray/auth_token`` itself when ``RAY_AUTH_MODE=token``). Sent
    explicitly because Ray's own loader keeps the first token a process saw: a process that talked to another
    cluster would send that one."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path!r} cannot be read ({e}); point it at the cluster's token "
                           "file (`ray get-auth-token` prints a token)") from None
    return {"Authorization": f"Bearer {token}"} if token else {}


def jobs_client(address: str):
    """The Ray Jobs client for ``address`` (the one network dependency; tests replace it), sending the token."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except ConnectionError as e:
        raise JobError(f"cannot reach a Ray cluster's Jobs API at submit.address={address!r} ({e}); give the "
                       "head's dashboard address (http://HEAD:8265) and check that the cluster is up") from None
    except AuthenticationError as e:
        raise JobError(f"the cluster at submit.address={address!r} refused this client's token "
                       f"({str(e).splitlines()[0]}); set RAY_AUTH_TOKEN_PATH to the cluster's token file "
                       "(or RAY_AUTH_MODE=token with the token in ~/.ray/auth_token)") from None


def connect(cfg: PipelineConfig):
    """``(address, client)`` for ``submit.address`` or ``$RAY_ADDRESS``."""
    address = cfg.submit.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("submit.address is not set: give submit.address=http://HEAD:8265 or set RAY_ADDRESS")
    return address, jobs_client(address)


def transient(error: BaseException) -> bool:
    """Whether a Jobs API error is worth retrying: Ray's dashboard answers HTTP 500 "No available agent to submit
    job, please try again later" while a fresh cluster's job agents start, and 502-504 behind a proxy."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("try again later" in text or
                                                re.search(r"status code 50[0234]\b", text) is not None)


def retrying(call, what: str, budget_s: float):
    """``call()``, retried with backoff (1 s doubling to 10 s) while it fails transiently, for ``budget_s``."""
    began, delay = time.monotonic(), 1.0
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 — classified by transient()
            waited = time.monotonic() - began
            if not transient(e) or waited + delay > budget_s:
                if transient(e):
                    raise JobError(f"{what}: the cluster kept answering {str(e).splitlines()[0][:200]!r} for "
                                   f"{waited:.0f} s (submit.retry_s={budget_s}); is its dashboard's job agent "
                                   "up? `ray status` on the head, then submit again") from None
                raise
            print(f"{what}: {str(e).splitlines()[0][:200]}; retrying in {delay:.0f} s", flush=True)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """Submit ``submit.verb`` with this config as a Ray job (``submit.wait``: follow it to the end)."""
    command = job_command(cfg)
    s = cfg.submit
    address, client = connect(cfg)
    sid = next_submission_id(retrying(client.list_jobs, "listing jobs", s.retry_s), submission_prefix(cfg, command))
    with tempfile.TemporaryDirectory(prefix="raydistill-job-") as tmp:
        job = build_job(cfg, command, s.upload_code, Path(tmp))
        retrying(lambda: client.submit_job(
            entrypoint=job["entrypoint"], runtime_env=job["runtime_env"], submission_id=sid,
            # job metadata is readable by anyone who can list jobs: URL passwords masked
            metadata=redact({"raydistill.verb": " ".join(command), "raydistill.run_dir": cfg.run_dir})),
            f"submitting {sid}", s.retry_s)
    shown = redact(address)  # a dashboard behind a proxy may take http://user:password@…: never in a log
    print(f"submitted {sid}: {job['entrypoint']}\n  logs: raydistill job logs submit.job_id={sid} "
          f"submit.address={shown} submit.follow=true")
    result = {"submission_id": sid, "entrypoint": job["entrypoint"], "address": shown}
    if s.wait:
        result["status"] = _follow(client, sid, s.timeout_s)
        if result["status"] != "SUCCEEDED":
            raise JobError(failure_message(sid, result["status"], client.get_job_logs(sid),
                                           getattr(client.get_job_info(sid), "message", "") or ""))
    return result


# what a job log says when the nodes cannot run raydistill at all: resubmitting the same job cannot help
_SETUP_ERRORS = (r"raydistill: (command )?not found", r"No module named '?raydistill", r"command not found")


def failure_message(sid: str, status: str, logs: str, message: str = "", lines: int = 20) -> str:
    """Why a followed job did not succeed: its status, Ray's message, the last ``lines`` of its log, and what to
    do — resubmit to resume, unless the log shows the nodes cannot run raydistill (then resubmitting fails alike)."""
    tail = "\n".join(logs.rstrip().splitlines()[-lines:])
    setup = next((p for p in _SETUP_ERRORS if re.search(p, logs)), None)
    if status == "TIMEOUT":
        advice = "the job is still running on the cluster: `raydistill job logs … submit.follow=true` follows it"
    elif setup:
        advice = ("the cluster's nodes cannot run raydistill: install it in the environment the nodes were started "
                  "from (the same Python as `ray start`), or set submit.upload_code=true to ship this checkout; "
                  "resubmitting unchanged fails the same way")
    else:
        advice = "resubmit the same command to resume (finished stages are skipped)"
    return (f"{sid} ended {status}" + (f" ({message})" if message else "") + f"; {advice}. Last lines of its log:\n"
            + (tail or "(empty)"))


def _follow(client, sid: str, timeout: float | None) -> str:
    deadline = None if timeout is None else time.time() + timeout
    printed = 0
    while True:
        status = str(client.get_job_status(sid)).split(".")[-1]
        logs = client.get_job_logs(sid)  # after the status: an ended job's last lines are printed too
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        if status not in _ACTIVE:
            return status
        if deadline and time.time() > deadline:
            return "TIMEOUT"
        time.sleep(2)
