"""The one place raydistill talks to MLflow (tracking and registry).

Default backend: sqlite at ``<run_dir>/mlflow.db`` with artifacts under ``<run_dir>/mlartifacts``; any
tracking URI (e.g. the PostgreSQL-backed server in ``infra/``) by ``registry.tracking_uri``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from raydistill.tasks.config import PipelineConfig

# alembic/mlflow print migration chatter on every new sqlite db
logging.getLogger("alembic").setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def setup(cfg: PipelineConfig) -> str:
    """Point this process at the run's tracking store and experiment; returns the experiment id."""
    uri = cfg.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:"):
        artifact_location = (Path(cfg.run_dir) / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(cfg.registry.experiment, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(cfg.registry.experiment).experiment_id


def client(cfg: PipelineConfig) -> MlflowClient:
    setup(cfg)
    return MlflowClient(cfg.tracking_uri)


def start_run(cfg: PipelineConfig, run_name: str, parent_run_id: str | None = None, tags: dict | None = None):
    """Start (and make active) an MLflow run, optionally as the child of ``parent_run_id``."""
    exp_id = setup(cfg)
    return mlflow.start_run(experiment_id=exp_id, run_name=run_name, parent_run_id=parent_run_id,
                            tags=tags or {})


def flat_params(d: dict, prefix: str = "") -> dict:
    """Flatten a nested config dict into MLflow params (``train.lr`` → value)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out
