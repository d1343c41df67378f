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
from raydistill.tasks.device import plan_device

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
    # the stores a cache actor or Train worker opens retry as long as the driver's (cluster.store_retry_s)
    env_vars.setdefault("RAYDISTILL_STORE_RETRY_S", str(cluster.store_retry_s))
    for k in _job_env_vars():  # Ray refuses a ray.init that sets a variable the job's runtime env sets too
        env_vars.pop(k, None)
    if address:
        if "://" not in address and address != "auto":  # a GCS address (a job's driver): the workers find the
            env_vars.setdefault("RAY_API_SERVER_ADDRESS", address)  # State API through it (why: see below)
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    else:
        # The dashboard serves the State API, which Ray Train's placement-group cleaner needs to free the
        # resources of a run whose controller was killed (e.g. a trial stopped early by ASHA). The cleaner calls
        # it without an address: Ray then looks for "the" local cluster and raises ConnectionError when this
        # machine runs more than one (or picks the last `ray start` one), the cleaner's thread dies, the stopped
        # trial's placement group is never removed and the next Train run waits for its CPUs forever. So every
        # worker of this cluster is told its own API server. Not this driver's environment: the variable
        # overrides the address of every Jobs/State client in the process, and outlives this cluster (a driver
        # asks the State API with address=ray.get_runtime_context().gcs_address).
        port = free_ports(1)[0]
        env_vars["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=cluster.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 runtime_env={"env_vars": env_vars}, log_to_driver=True)


def cluster_device(cluster: ClusterConfig) -> str:
    """``"cuda"`` or ``"cpu"`` for the cache actors and Train workers: ``cluster.device`` against the GPUs the
    (started) Ray cluster offers (a typed error when CUDA is asked for and absent)."""
    return plan_device(cluster.device, ray.cluster_resources().get("GPU", 0))
