"""Register the quantized student in the MLflow model registry, with lineage, as ``@challenger``.

    raydistill register --config tiny

One MLflow run (params = the flattened config, metrics = teacher / student fp32 / student int8 on the held-out
split, artifacts = the quantize report, train metrics, the resolved config) logs the int8 student as a
"models from code" pyfunc (``workflows/mlflow_model.py`` + the safetensors directory + ``raydistill.tasks`` as code; no
pickle) and registers it as a new version of ``registry.model_name``. The version carries lineage tags and gets
the alias ``@challenger``; ``raydistill lineage models:/NAME/VERSION`` prints them as a chain:

- ``lineage.train_run_id`` / ``lineage.tune_parent_run_id``: the MLflow runs of the train and tune stages;
  ``lineage.init_from``: the version (or directory) a warm-started student began from (``train.init_from``);
- ``cache.key`` (the cache manifest digest), ``cache.shards_sha256`` (sorted shard keys) and
  ``cache.heldout_digest`` (the held-out set, as the gate names it); the run's artifact ``lineage/shards.arrow``
  is the cache's index: one row per shard (split, name, key, file sha256, size) the student was trained and scored
  on, logged as the file it is (digests streamed over it: ``tasks.cache.lineage``, bounded memory at any size);
- ``export.hf.format``, ``export.gguf.types``, ``export.notes`` (what a standard format could not hold exactly),
  ``export.<kind>.loads``: the quantize stage's standard exports, logged as the model's ``export_hf`` and
  ``export_gguf`` artifacts beside the raydistill directory;
- ``corpus.sha256`` (corpus settings + every shard's name, split and size in key order: the corpus as tokenized and windowed;
  the tokens themselves are pinned by the shard keys, which hash each shard's content),
  ``teacher.weights_sha256``, ``raydistill.quantization``, ``code.version`` (git commit, ``+dirty`` with
  uncommitted changes, else the package version), config hash, stage keys and metrics;
``raydistill promote`` moves ``@champion`` through the quality gate. Rerunning with the same inputs finds the
version by its ``raydistill.stage_key`` tag instead of creating a second one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import yaml

from raydistill import copy_package
from raydistill.tasks.config import PipelineConfig, dump_yaml, to_dict
from raydistill.tasks.fileio import atomic_write_json
from raydistill.tasks.guard import redact, refuse_pickle
from raydistill.workflows import stage, tracking

KEY_TAG = "raydistill.stage_key"
MODEL_ARTIFACT = "student"
SHARDS_ARTIFACT = "lineage/shards.arrow"
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "mlflow", "torchao", "peft")
METRIC_GROUPS = ("teacher", "fp32", "int8")


def config_hash(cfg: PipelineConfig) -> str:
    """sha256 of the resolved config without ``run_dir`` (where a run lives is not what it is)."""
    data = {k: v for k, v in to_dict(cfg).items() if k != "run_dir"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def find_version(client, name: str, key: str):
    """The model version of ``name`` registered with stage key ``key``, or None."""
    found = tracking.search_versions(client, name, {KEY_TAG: key})
    return max(found, key=lambda v: int(v.version)) if found else None


def code_version() -> str:
    """``git:<commit>`` of the raydistill checkout (``+dirty`` with uncommitted tracked changes), else
    ``raydistill==<version>`` of the installed package."""
    root = Path(__file__).resolve().parent.parent

    def git(*args) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    commit = git("rev-parse", "HEAD") if top and Path(top).resolve() == root else None
    if commit:
        return f"git:{commit}" + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    return f"raydistill=={importlib.metadata.version('raydistill')}"


def shard_lineage(cache, gate_windows: int | None) -> dict:
    """The digests naming what the student was trained and scored on (an opened
    :class:`~tasks.cache.shards.Cache`; :func:`tasks.cache.lineage.index_digests`, streamed over its index);
    ``heldout_digest`` names the held-out set a gate of ``gate_windows`` windows evaluates
    (``registry.gate.max_windows``)."""
    from raydistill.tasks.cache.lineage import corpus_settings, index_digests
    from raydistill.tasks.data import heldout_entries
    from raydistill.tasks.evaluate import heldout_digest

    return {"cache_key": cache.key, **index_digests(cache.index, corpus_settings(cache.manifest)),
            "heldout_digest": heldout_digest(heldout_entries(cache, gate_windows).keys(), gate_windows)}


def log_shard_index(cache) -> None:
    """The cache's index file as the run's :data:`SHARDS_ARTIFACT` (the file itself, streamed to the artifact
    store: no per-shard object is built)."""
    if cache.index.path is None:
        return
    with tempfile.TemporaryDirectory(prefix="raydistill-lineage-") as tmp:
        named = Path(tmp, Path(SHARDS_ARTIFACT).name)
        shutil.copyfile(cache.index.path, named)
        tracking.log_file(named, str(Path(SHARDS_ARTIFACT).parent))


def _cache_lineage(cfg: PipelineConfig) -> dict:
    """Teacher identity, cache key and shard digests, as the cache stage recorded them."""
    rec = stage.read(cfg, "cache") or {}
    out = rec.get("outputs") or {}
    from raydistill.tasks.cache.shards import config_cache

    try:
        cache = config_cache(cfg)  # local or object store
        manifest = cache.manifest
    except FileNotFoundError:
        cache, manifest = None, {}
    teacher = manifest.get("teacher") or out.get("teacher") or {}
    if not teacher.get("weights_sha256"):
        from raydistill.tasks.teacher import teacher_identity

        teacher = teacher_identity(cfg.teacher)
    return {"teacher.source": str(teacher.get("source", cfg.teacher.source)),
            "teacher.weights_sha256": str(teacher.get("weights_sha256")),
            "teacher.architecture": json.dumps(teacher.get("architecture"), sort_keys=True)[:5000],
            "cache.key": str(manifest.get("key") or out.get("cache_key") or rec.get("key")),
            "cache.format": str(manifest.get("format", cfg.cache.format)),
            "cache.stage_key": str(rec.get("key")), **_shard_tags(cache, cfg.registry.gate.max_windows)}


def _shard_tags(cache, gate_windows: int | None) -> dict:
    if cache is None:
        return {}
    lin = shard_lineage(cache, gate_windows)
    return {"cache.shards_sha256": lin["shards_sha256"], "cache.heldout_digest": lin["heldout_digest"],
            "cache.shards": str(lin["shards"]), "corpus.sha256": lin["corpus_sha256"],
            "lineage.shards_artifact": SHARDS_ARTIFACT}


def lineage_tags(cfg: PipelineConfig, key: str, report: dict) -> dict:
    stages = {s: (stage.read(cfg, s) or {}).get("key") for s in ("train", "tune", "quantize")}
    runs = {"lineage.train_run_id": ((stage.read(cfg, "train") or {}).get("outputs") or {}).get("mlflow_run_id"),
            "lineage.tune_parent_run_id": ((stage.read(cfg, "tune") or {}).get("outputs") or {})
            .get("mlflow_parent_run_id")}
    tags = {KEY_TAG: key, "raydistill.config_sha256": config_hash(cfg), "code.version": code_version(),
            "raydistill.quantization": str(report.get("method")), **_cache_lineage(cfg),
            **{k: str(v or "none") for k, v in runs.items()}}
    tags.update({f"{s}.stage_key": str(k) for s, k in stages.items()})
    tags["lineage.init_from"] = _init_from_tag(((stage.read(cfg, "train") or {}).get("outputs") or {}).get("init_from"))
    if report.get("exports"):  # what each standard export holds, could not hold, and whether it loaded
        from raydistill.tasks.quantize.export import export_tags

        tags.update(export_tags(report["exports"], report.get("export_checks")))
    for group in METRIC_GROUPS:
        for name, value in (report.get(group) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                tags[f"metric.{group}.{name}"] = repr(float(value))
    return tags


def _init_from_tag(init: dict | None) -> str:
    """Where a warm-started student began (``train.init_from``): ``models:/NAME/VERSION`` or ``dir:PATH``, with the
    weights' digest; ``none`` for a student built from the teacher."""
    if not init:
        return "none"
    where = tracking.model_uri(init["name"], version=init["version"]) if init.get("version") is not None \
        else f"dir:{init['dir']}"
    return f"{where} weights_sha256={init.get('weights_sha256')}"


def _requirements() -> list[str]:
    return [f"{p}=={importlib.metadata.version(p)}" for p in REQUIREMENTS]


def _log_run(cfg: PipelineConfig, key: str, report: dict, int8_dir: Path) -> tuple[str, object]:
    """One MLflow run with params, metrics, artifacts and the logged pyfunc model; ``(run_id, model_info)``."""
    with tracking.start_run(cfg, run_name="register", tags={"raydistill.stage": "register", KEY_TAG: key}) as run:
        tracking.log_params(tracking.flat_params(to_dict(cfg)))
        metrics = {f"{g}.{k}": float(v) for g in METRIC_GROUPS for k, v in (report.get(g) or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracking.log_metrics(metrics)
        tracking.log_dict(report, "quantize/report.json")
        tracking.log_text(dump_yaml(cfg), "config.yaml")
        try:
            from raydistill.tasks.cache.shards import config_cache

            log_shard_index(config_cache(cfg))
        except FileNotFoundError:  # no cache here (registering elsewhere): the tags still name it
            pass
        train_metrics = Path(cfg.stage_dir("train"), "metrics.json")
        if train_metrics.exists():
            tracking.log_file(train_metrics, "train")
        with warnings.catch_warnings():  # no input example on purpose: it would run the model at log time
            warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
            info = _log_model(int8_dir, export_artifacts(report))
        return run.info.run_id, info


def export_artifacts(report: dict) -> dict[str, str]:
    """The quantize stage's standard exports that exist, as pyfunc artifacts: ``export_hf`` (the compressed-
    tensors checkpoint directory) and ``export_gguf`` (the GGUF file)."""
    out = {}
    for kind, entry in (report.get("exports") or {}).items():
        if entry.get("path") and Path(entry["path"]).exists():
            out[f"export_{kind}"] = entry["path"]
    return out


def _log_model(int8_dir: Path, exports: dict[str, str] | None = None):
    """The int8 student as a pyfunc from code (``mlflow_model.py``); its params are the generation settings. The
    standard exports travel as further artifacts of the same model version."""
    from raydistill.workflows.mlflow_model import PARAM_DEFAULTS

    with tempfile.TemporaryDirectory(prefix="raydistill-code-") as tmp:
        return tracking.log_pyfunc_model(MODEL_ARTIFACT, Path(__file__).with_name("mlflow_model.py"),
                                         artifacts={"model": str(int8_dir), **(exports or {})},
                                         code_paths=[str(copy_package(Path(tmp) / "raydistill", ("tasks",)))],
                                         pip_requirements=_requirements(), params_example=PARAM_DEFAULTS)


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """Register the quantized student; the registry itself records it (a version tagged with this key)."""
    started = stage.start(cfg, "register", skip=False)
    key, quantize = started.key, started.needs["quantize"]
    client = tracking.client(cfg)
    name = cfg.registry.model_name
    mv = find_version(client, name, key)
    if mv is not None:
        print(f"[register] already registered for these inputs: {name} version {mv.version}")
    else:
        int8_dir = Path(quantize["outputs"].get("int8_dir") or cfg.stage_dir("quantize") / "int8")
        report = json.loads(Path(cfg.stage_dir("quantize"), "report.json").read_text())
        run_id, info = _log_run(cfg, key, report, int8_dir)
        tracking.ensure_registered_model(client, name, description="raydistill students (int8, safetensors)")
        mv = client.create_model_version(name, source=info.model_uri, run_id=run_id,
                                         tags=lineage_tags(cfg, key, report), model_id=info.model_id,
                                         description=f"int8 student distilled from {cfg.teacher.source}")
        print(f"[register] {name} version {mv.version} (run {run_id})")
    tracking.set_alias(client, name, "challenger", mv.version)
    outputs = {"name": name, "version": int(mv.version), "run_id": mv.run_id, "alias": "challenger",
               "model_uri": tracking.model_uri(name, version=mv.version), "tracking_uri": cfg.tracking_uri,
               "stage_key": key, "tags": dict(tracking.get_version(client, name, mv.version).tags)}
    out = atomic_write_json(Path(cfg.stage_dir("register"), "version.json"), redact(outputs))
    stage.record(cfg, "register", key, outputs, paths=[out])
    return outputs


# loading a registered version (Serve, tests): artifacts → tasks.quantize.load_quantized, no pickle

def load_registered(tracking_uri: str, uri: str):
    """``(model, tokenizer, info)`` for ``models:/name@alias`` or ``models:/name/N``: downloads the version's
    artifacts (:func:`tracking.download_version`) and rebuilds the int8 student with
    ``tasks.quantize.load_quantized``."""
    from transformers import AutoTokenizer

    from raydistill.tasks.quantize import load_quantized

    tmp = tempfile.mkdtemp(prefix="raydistill-model-")
    try:
        local, mv = tracking.download_version(tracking_uri, uri, tmp)
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        model_dir = refuse_pickle(local / mlmodel["flavors"]["python_function"]["artifacts"]["model"]["path"])
        model, tokenizer = load_quantized(model_dir), AutoTokenizer.from_pretrained(model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = {"name": mv.name, "version": int(mv.version), "alias": tracking.parse_model_uri(uri).alias,
            "run_id": mv.run_id, "model_uri": tracking.model_uri(mv.name, version=mv.version), "tags": dict(mv.tags)}
    return model, tokenizer, info
