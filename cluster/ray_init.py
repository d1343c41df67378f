"""The one place raydistill calls ``ray.init``.

Local runs start an embedded cluster; under ``ray job submit`` (``RAY_ADDRESS`` set) or with
``cluster.address`` the driver joins the existing cluster instead.
"""

from __future__ import annotations

import json
import os

import ray

from raydistill.cluster.local_cluster import free_ports
from raydistill.tasks.config import ClusterConfig

# Quiet, quick defaults for an embedded cluster; a user's environment wins.
_LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def _job_env_vars() -> dict:
    """``env_vars`` of the runtime env of the Ray job this driver runs in (``raydistill submit``), else ``{}``."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return ((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}) if raw else {}


def init_ray(cluster: ClusterConfig | None = None) -> None:
    """Connect to (or start) Ray once per process."""
    if ray.is_initialized():
        return
    cluster = cluster or ClusterConfig()
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    for k, v in _LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    env_vars = {k: os.environ[k] for k in (*_LOCAL_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                           "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                if k in os.environ}
    env_vars.setdefault("HF_HUB_OFFLINE", "1")
    for k in _job_env_vars():  # Ray refuses a ray.init that sets a variable the job's runtime env sets too
        env_vars.pop(k, None)
    if address:
        if "://" not in address and address != "auto":  # a GCS address: the State API is found through it
            env_vars.setdefault("RAY_API_SERVER_ADDRESS", address)  # (why: see the embedded case below)
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    else:
        # The dashboard serves the State API, which Ray Train's placement-group cleaner needs to free the
        # resources of a run whose controller was killed (e.g. a trial stopped early by ASHA). Its workers find
        # the State API by auto-detection, which fails ("Found multiple active Ray instances") when another Ray
        # runs on the host: the cleaner's thread dies, the placement group leaks and the next trial waits for
        # its CPUs for ever. So the workers are told this cluster's dashboard address.
        port = free_ports(1)[0]
        env_vars.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
        ray.init(num_cpus=cluster.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, runtime_env={"env_vars": env_vars}, log_to_driver=True)
