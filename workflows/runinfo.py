"""Stage records in the run directory: how ``pipeline`` knows a stage is done for the same inputs.

``<run_dir>/stages/<stage>.json`` holds the stage's content key and its outputs. A stage is skipped when
its record exists with the same key and every output path it lists still exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from raydistill.tasks.config import PipelineConfig
from raydistill.tasks.fileio import atomic_write_json


def _record_path(cfg: PipelineConfig, stage: str) -> Path:
    return Path(cfg.run_dir) / "stages" / f"{stage}.json"


def read_stage(cfg: PipelineConfig, stage: str) -> dict | None:
    """The record a finished stage left, or None."""
    p = _record_path(cfg, stage)
    if not p.exists():
        return None
    return json.loads(p.read_text())


def stage_done(cfg: PipelineConfig, stage: str, key: str) -> dict | None:
    """The record if ``stage`` finished with content key ``key`` and its outputs still exist."""
    rec = read_stage(cfg, stage)
    if not rec or rec.get("key") != key:
        return None
    for path in rec.get("paths", []):
        if "://" not in path and not Path(path).exists():
            return None
    return rec


def record_stage(cfg: PipelineConfig, stage: str, key: str, outputs: dict, paths: list[str] = ()) -> dict:
    """Atomically write a stage record."""
    rec = {"stage": stage, "key": key, "finished_at": time.time(), "paths": [str(x) for x in paths],
           "outputs": outputs}
    atomic_write_json(_record_path(cfg, stage), rec, default=str)
    return rec


def require_stage(cfg: PipelineConfig, stage: str, needed_by: str) -> dict:
    """The record of an upstream stage, or a clear error telling the user what to run first."""
    rec = read_stage(cfg, stage)
    if rec is None:
        raise SystemExit(f"raydistill {needed_by}: no finished '{stage}' stage in {cfg.run_dir}; "
                         f"run `raydistill {stage}` (or `raydistill pipeline`) with the same config first")
    return rec
