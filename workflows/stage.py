"""Stage records in the run directory, and :func:`start`, the first call of every stage verb's ``run()``.

``<run_dir>/stages/<stage>.json`` holds the stage's content key, its outputs and a digest of its local output
files. A stage is done when its record exists with the same key and every output path it lists still exists.
The key covers the config fields the verb table declares the stage ``reads`` plus the *content* of what it
consumes from the stages it ``needs`` (``workflows/verbs.py``; a unit test checks the declaration against the
code), so changing anything a stage depends on reruns it and everything after it:

- the cache: the key of the cache as it is now (:func:`tasks.cache.manifest.cache_key` of the manifest in
  ``cache.dir``, a hash of its shard keys), not the cache stage's record: new corpus files, or a cache dir another
  run grew, change it even when this run dir's record is stale;
- any other stage: its record's key and the digest of the files it wrote (the trained student's weights, the
  quantized model and its report), so a retrained student re-quantizes and registers a new version;
- ``train.init_from`` naming a local directory: the digest of its weight files (a registry URI is keyed as written:
  a version is immutable, and an alias such as ``@champion`` is resolved when training starts, see
  ``workflows/continual.py``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from raydistill.tasks.config import PipelineConfig, section_key
from raydistill.tasks.errors import StageMissingError
from raydistill.tasks.guard import redact
from raydistill.tasks.fileio import atomic_write_json
from raydistill.workflows.verbs import VERBS


def _record_path(cfg: PipelineConfig, stage: str) -> Path:
    return Path(cfg.run_dir) / "stages" / f"{stage}.json"


def read(cfg: PipelineConfig, stage: str) -> dict | None:
    """The record a finished stage left, or None."""
    p = _record_path(cfg, stage)
    if not p.exists():
        return None
    return json.loads(p.read_text())


def consumed(cfg: PipelineConfig, need: str):
    """What a stage consumes of the earlier stage ``need``: the cache's content key (read from the cache itself),
    or the record's key and output digest; None when it has not run."""
    if need == "cache":
        from raydistill.tasks.cache.shards import config_cache

        try:
            return config_cache(cfg).key
        except FileNotFoundError:
            return None
    rec = read(cfg, need)
    return None if rec is None else {"key": rec.get("key"), "digest": rec.get("digest")}


def key(cfg: PipelineConfig, stage: str, extra: dict | None = None) -> str:
    """The content key of ``stage`` for ``cfg``: its declared ``reads`` and what it consumes of its ``needs``."""
    verb = VERBS[stage]
    upstream = {s: consumed(cfg, s) for s in verb.needs}
    init_from = getattr(cfg.train, "init_from", None) if "train" in verb.reads else None
    if init_from and "://" not in init_from and Path(init_from).expanduser().is_dir():
        from raydistill.tasks.warmstart import weights_digest

        upstream["init_from_weights"] = weights_digest(Path(init_from).expanduser())
    return section_key(cfg, *verb.reads, extra={**upstream, **(extra or {})} or None)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def digest(paths) -> str | None:
    """sha256 over the local files under ``paths`` (names and bytes, sorted); object-store paths are skipped."""
    h, seen = hashlib.sha256(), False
    for root in paths:
        root = Path(root)
        if "://" in str(root) or not root.exists():
            continue
        for f in sorted([root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())):
            seen = True
            h.update(str(f.relative_to(root.parent)).encode() + b"\0" + _file_sha256(f).encode())
    return h.hexdigest() if seen else None


def done(cfg: PipelineConfig, stage: str, stage_key: str) -> dict | None:
    """The record if ``stage`` finished with ``stage_key`` and its outputs still exist."""
    rec = read(cfg, stage)
    if not rec or rec.get("key") != stage_key:
        return None
    for path in rec.get("paths", []):
        if "://" not in path and not Path(path).exists():
            return None
    return rec


def record(cfg: PipelineConfig, stage: str, stage_key: str, outputs: dict, paths: list = ()) -> dict:
    """Atomically write a stage record (secrets redacted: records are shared, copied and shown)."""
    rec = {"stage": stage, "key": stage_key, "finished_at": time.time(), "paths": redact([str(x) for x in paths]),
           "digest": digest(paths), "outputs": redact(json.loads(json.dumps(outputs, default=str)))}
    atomic_write_json(_record_path(cfg, stage), rec, default=str)
    return rec


def require(cfg: PipelineConfig, stage: str, needed_by: str, alternative: str = "") -> dict:
    """The record of an earlier stage, or a :class:`StageMissingError` saying what to run first."""
    rec = read(cfg, stage)
    if rec is None:
        raise StageMissingError(f"{needed_by} needs a finished '{stage}' stage in {cfg.run_dir}: run "
                                f"`raydistill {stage}` (or `raydistill pipeline`) with the same config first"
                                + (f", or {alternative}" if alternative else ""))
    return rec


@dataclass
class Started:
    """What :func:`start` found: the stage's key, its finished record (if skipped) and the records it needs."""

    key: str
    done: dict | None = None
    needs: dict[str, dict] = field(default_factory=dict)


def start(cfg: PipelineConfig, stage: str, *, skip: bool = True, ray: bool = False) -> Started:
    """Begin ``stage``: when ``skip`` and it is done for this key, return its record and do nothing else;
    otherwise require the stages it needs (:class:`StageMissingError` naming the first missing one) and, with
    ``ray``, connect to or start Ray."""
    stage_key = key(cfg, stage)
    finished = done(cfg, stage, stage_key) if skip else None
    if finished:
        return Started(stage_key, finished)
    needs = {s: require(cfg, s, stage) for s in VERBS[stage].needs}
    if ray:
        from raydistill.cluster.ray_init import init_ray

        init_ray(cfg.cluster)
    return Started(stage_key, None, needs)
