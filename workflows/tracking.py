"""The one place raydistill talks to MLflow: tracking (runs, params, metrics, artifacts, models) and the registry.

Default backend: sqlite at ``<run_dir>/mlflow.db`` with artifacts under ``<run_dir>/mlartifacts``; any
tracking URI (e.g. the PostgreSQL-backed server in ``infra/``) by ``registry.tracking_uri``.

Every other module goes through these functions (``tests/unit/test_conventions.py`` checks that nothing else
imports mlflow). The one exception is ``workflows/mlflow_model.py``, the model code logged with each version,
which MLflow itself imports when the model is loaded. Registry URIs are built and read only here
(:func:`model_uri`, :func:`parse_model_uri`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raydistill.tasks.config import PipelineConfig, check_name
from raydistill.tasks.guard import redact

# alembic/mlflow print migration chatter on every new sqlite db
logging.getLogger("alembic").setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

MAX_PARAMS_PER_CALL = 100  # MLflow rejects a log_params call with more
URI_SCHEME = "models:/"


# ------------------------------------------------------------------------------------------- runs (tracking)

def setup(cfg: PipelineConfig) -> str:
    """Point this process at the run's tracking store and experiment; returns the experiment id."""
    uri = cfg.tracking_uri
    if redact(uri, env={}) != uri:  # MLflow prints "View run at <tracking URI>": never with its password in it
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
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
    except MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(cfg.registry.experiment).experiment_id


def client(cfg: PipelineConfig) -> MlflowClient:
    """A tracking + registry client for ``cfg.tracking_uri`` (the experiment exists afterwards)."""
    setup(cfg)
    return MlflowClient(cfg.tracking_uri)


def start_run(cfg: PipelineConfig, run_name: str, parent_run_id: str | None = None, tags: dict | None = None):
    """Start (and make active) an MLflow run, optionally as the child of ``parent_run_id``; a context manager."""
    exp_id = setup(cfg)
    return mlflow.start_run(experiment_id=exp_id, run_name=run_name, parent_run_id=parent_run_id,
                            tags=tags or {})


def resume_run(cfg: PipelineConfig, run_id: str):
    """Make the existing run ``run_id`` active again (an interrupted stage continues in it); a context manager."""
    setup(cfg)
    return mlflow.start_run(run_id=run_id)


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


def log_params(params: dict) -> None:
    """Params of the active run (secrets redacted), in calls of at most :data:`MAX_PARAMS_PER_CALL`."""
    items = sorted(redact(params).items())
    for i in range(0, len(items), MAX_PARAMS_PER_CALL):
        mlflow.log_params(dict(items[i:i + MAX_PARAMS_PER_CALL]))


def log_metrics(metrics: dict) -> None:
    """Metrics of the active run (no step: one value each)."""
    mlflow.log_metrics(metrics)


def log_dict(data: dict, artifact_file: str) -> None:
    """``data`` as a JSON (or YAML, by extension) artifact of the active run (secrets redacted)."""
    mlflow.log_dict(redact(data), artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    """``text`` as an artifact file of the active run (secrets redacted)."""
    mlflow.log_text(redact(text), artifact_file)


def log_file(path: str | os.PathLike, artifact_dir: str | None = None) -> None:
    """A local file as an artifact of the active run, under ``artifact_dir`` (text files: secrets redacted)."""
    path = Path(path)
    if path.suffix in (".json", ".yaml", ".yml", ".txt", ".log"):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            clean = Path(tmp) / path.name
            clean.write_text(redact(path.read_text(errors="replace")))
            mlflow.log_artifact(str(clean), artifact_dir)
        return
    mlflow.log_artifact(str(path), artifact_dir)


def log_pyfunc_model(name: str, python_model: str | os.PathLike, artifacts: dict, code_paths: list[str],
                     pip_requirements: list[str], params_example: dict):
    """Log a "models from code" pyfunc (``python_model`` is the file defining it) to the active run.

    Its signature takes a list of prompts and the generation params of ``params_example`` (MLflow drops params a
    signature lacks). Returns MLflow's ``ModelInfo`` (``model_uri``, ``model_id``).
    """
    from mlflow.models import infer_signature

    return mlflow.pyfunc.log_model(name=name, python_model=str(python_model), artifacts=artifacts,
                                   code_paths=code_paths, pip_requirements=pip_requirements,
                                   signature=infer_signature(["ROMEO.\nBut soft"], params=params_example))


class MetricSink:
    """Per-step metrics to one MLflow run (rank 0 of a Train run); steps already logged before a restart are
    skipped. With no ``uri``/``run_id`` (other ranks, or tracking off) it logs nothing."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.client, self.run_id, self.last = None, run_id, 0
        if uri and run_id:
            self.client = MlflowClient(uri)
            self.last = max((m.step for m in self.client.get_metric_history(run_id, "loss")), default=0)

    def log(self, metrics: dict, step: int) -> None:
        """Log the numeric entries of ``metrics`` at ``step`` (step 0: the initial evaluation, always logged)."""
        if self.client is None or (step <= self.last and step > 0):
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as e:  # metrics are a side channel: never fail training over them
            logging.getLogger(__name__).warning("MLflow logging failed at step %d: %s", step, e)


# ------------------------------------------------------------------------------------------------ registry

class ModelRef(NamedTuple):
    """What a ``models:/`` URI names: a registered model and exactly one of an alias or a version."""

    name: str
    """Registered model name (``registry.model_name``)."""
    alias: str | None
    """``champion``, ``challenger``, …; None when the URI names a version."""
    version: int | None
    """Version number (1, 2, …); None when the URI names an alias."""


def model_uri(name: str, version: int | str | None = None, alias: str | None = None) -> str:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>``; exactly one of ``version`` and ``alias``."""
    if not name or "@" in name:
        raise ValueError(f"model_uri: bad registered model name {name!r} (non-empty, no '@'); "
                         "use registry.model_name")
    if (version is None) == (alias is None):
        raise ValueError(f"model_uri({name!r}): pass exactly one of version= (e.g. 3) or alias= (e.g. 'champion')")
    if alias is not None:
        if not alias or "@" in alias or "/" in alias:
            raise ValueError(f"model_uri({name!r}): bad alias {alias!r} (non-empty, no '@' or '/'), e.g. 'champion'")
        return f"{URI_SCHEME}{name}@{alias}"
    if not str(version).isdigit() or int(version) < 1:
        raise ValueError(f"model_uri({name!r}): version must be a positive integer, got {version!r}")
    return f"{URI_SCHEME}{name}/{int(version)}"


def parse_model_uri(uri: str) -> ModelRef:
    """``models:/name@alias`` → ``ModelRef(name, alias, None)``; ``models:/name/3`` → ``ModelRef(name, None, 3)``.

    Anything else (another scheme, an empty part, a version that is not a positive integer) is a ``ValueError``
    that shows the two accepted forms.
    """
    if not isinstance(uri, str) or not uri.startswith(URI_SCHEME):
        raise ValueError(f"{uri!r} is not a registry URI (models:/name@alias or models:/name/version)")
    rest = uri[len(URI_SCHEME):]
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return ModelRef(name, alias, None)
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit() and int(version) >= 1:
            return ModelRef(name, None, int(version))
    raise ValueError(f"{uri!r}: expected models:/name@alias or models:/name/<version number>, "
                     "e.g. models:/tiny-student@champion")


def ensure_registered_model(client: MlflowClient, name: str, description: str) -> None:
    """Create the registered model ``name`` unless it exists (safe against a concurrent creator)."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:  # created concurrently
            client.get_registered_model(name)


def get_version(client: MlflowClient, name: str, version: int | str):
    """The ``ModelVersion`` ``version`` of ``name``; ``LookupError`` if there is none."""
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise LookupError(f"{name} has no version {version}") from None


def alias_version(client: MlflowClient, name: str, alias: str):
    """The ``ModelVersion`` that ``name@alias`` points at, or None when the alias is not set."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(client: MlflowClient, name: str, alias: str, version: int | str | None) -> None:
    """Point ``name@alias`` at ``version``; ``version=None`` removes the alias (if set)."""
    if version is not None:
        client.set_registered_model_alias(name, alias, str(version))
    elif alias_version(client, name, alias) is not None:
        client.delete_registered_model_alias(name, alias)


def search_versions(client: MlflowClient, name: str, tags: dict[str, str] | None = None) -> list:
    """Versions of ``name`` whose tags equal ``tags``; names and values are checked before they enter the filter
    string (no quotes can close it)."""
    check_name("registry.model_name", name)
    clauses = [f"name = '{name}'"]
    for k, v in (tags or {}).items():
        if "`" in k or "'" in str(v) or "\\" in str(v):
            raise ValueError(f"search_versions: tag {k!r}={v!r} would break the filter string")
        clauses.append(f"tags.`{k}` = '{v}'")
    return list(client.search_model_versions(" and ".join(clauses)))


LOCK_SUFFIX = ".promote-lock"
LOCK_LEASE_S = 120.0


@contextlib.contextmanager
def registry_lock(client: MlflowClient, name: str, timeout_s: float = 60.0, lease_s: float = LOCK_LEASE_S):
    """Hold the promotion lock of registered model ``name`` for the ``with`` block; yields the lock's token.

    MLflow has no compare-and-set on aliases, so the lock is built from the one atomic, server-side primitive it
    has: creating a registered model whose name already exists fails (``RESOURCE_ALREADY_EXISTS``, a unique key
    in the backend database). The lock is the registered model ``<name>.promote-lock``, created with a unique
    token and a lease expiry as tags, deleted on exit only if it still carries our token.

    Guarantee: two raydistill processes (any hosts, one tracking server) never hold the lock of the same model
    at the same time while the holder finishes within ``lease_s``, so a check of ``@champion`` and the move
    that depends on it, both inside the block, form a compare-and-set. Limits, said plainly: a holder stalled
    past its lease can be overtaken (its contender deletes the expired lock), and with two contenders breaking
    the same expired lock at the same instant one may delete the other's fresh lock; anything that moves the
    alias without this lock (the MLflow UI, another tool) is not excluded. ``TimeoutError`` after ``timeout_s``.
    """
    lock, token = name + LOCK_SUFFIX, uuid.uuid4().hex
    check_name("registry.model_name", lock)
    deadline = time.time() + timeout_s
    while True:
        try:
            client.create_registered_model(lock, tags={"raydistill.lock_token": token,
                                                       "raydistill.lock_expires": repr(time.time() + lease_s)},
                                           description=f"raydistill: promotion lock of {name} (transient)")
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            _break_expired_lock(client, lock)
            if time.time() > deadline:
                raise TimeoutError(f"registry lock {lock} still held after {timeout_s:.0f} s: another promotion "
                                   "of this model is running (or raise registry.gate.lock_timeout_s)") from None
            time.sleep(0.05 + 0.2 * random.random())
    try:
        yield token
    finally:
        _release_lock(client, lock, token)


def _lock_tags(client: MlflowClient, lock: str) -> dict | None:
    try:
        return dict(client.get_registered_model(lock).tags)
    except MlflowException:
        return None


def _break_expired_lock(client: MlflowClient, lock: str) -> None:
    tags = _lock_tags(client, lock)
    if tags and float(tags.get("raydistill.lock_expires", "inf")) < time.time():
        _release_lock(client, lock, tags.get("raydistill.lock_token"))


def _release_lock(client: MlflowClient, lock: str, token: str | None) -> None:
    tags = _lock_tags(client, lock)
    if tags is not None and tags.get("raydistill.lock_token") == token:
        with contextlib.suppress(MlflowException):  # already released by a contender that found it expired
            client.delete_registered_model(lock)


def resolve_version(tracking_uri: str, uri: str):
    """The ``ModelVersion`` a registry URI points at now (clear error if the alias or version is unknown)."""
    ref = parse_model_uri(uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, str(ref.version))
    except MlflowException as e:
        raise LookupError(f"{uri} not found in {tracking_uri}: {e.message}") from None


def download_run_artifact(tracking_uri: str, run_id: str, artifact_file: str, dst: str | os.PathLike) -> Path:
    """The artifact ``artifact_file`` of run ``run_id``, downloaded under ``dst``; ``LookupError`` if it is not
    there."""
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{artifact_file}",
                                                        dst_path=str(dst), tracking_uri=tracking_uri))
    except (MlflowException, OSError) as e:
        raise LookupError(f"run {run_id} has no artifact {artifact_file}: {e}") from None


def load_run_dict(tracking_uri: str, run_id: str, artifact_file: str) -> dict:
    """The JSON artifact ``artifact_file`` of run ``run_id``; ``LookupError`` if it is not there."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="raydistill-artifact-") as tmp:
        return json.loads(download_run_artifact(tracking_uri, run_id, artifact_file, tmp).read_text())


def download_version(tracking_uri: str, uri: str, dst: str | os.PathLike) -> tuple[Path, object]:
    """Download the artifacts of the version ``uri`` points at into ``dst``; ``(local dir, ModelVersion)``.

    Goes to the version's storage location (file://, s3://, …) directly: no ``models:/`` resolution through
    MLflow's global state, so the alias is resolved once, here.
    """
    mv = resolve_version(tracking_uri, uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    location = client.get_model_version_download_uri(mv.name, mv.version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst), tracking_uri=tracking_uri)
    return Path(local), mv


# ------------------------------------------------------------------------------------- reading runs back (report)

def metric_histories(cfg: PipelineConfig, run_id: str, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), …]}`` of run ``run_id``, sorted by step, one value per step (the last logged)."""
    c = MlflowClient(cfg.tracking_uri)
    out = {}
    for key in keys:
        by_step = {m.step: m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
        out[key] = sorted(by_step.items())
    return out


def child_runs(cfg: PipelineConfig, parent_run_id: str) -> list[dict]:
    """The child runs of ``parent_run_id`` (Tune's trials): ``{"run_id", "name", "tags", "params"}`` each."""
    c = MlflowClient(cfg.tracking_uri)
    parent = c.get_run(parent_run_id)
    runs = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                         max_results=1000)
    return [{"run_id": r.info.run_id, "name": r.info.run_name, "tags": dict(r.data.tags),
             "params": dict(r.data.params)} for r in runs]


def find_child_run(cfg: PipelineConfig, parent_run_id: str, tag: str, value: str) -> str | None:
    """The id of the child run of ``parent_run_id`` tagged ``tag=value`` (a retried trial reuses it), or None."""
    setup(cfg)
    found = [r for r in child_runs(cfg, parent_run_id) if r["tags"].get(tag) == value]
    return found[0]["run_id"] if found else None


def log_artifacts_to(cfg: PipelineConfig, run_id: str, local_dir: str | os.PathLike, artifact_path: str) -> None:
    """Every file under ``local_dir`` as artifacts of the (finished) run ``run_id`` under ``artifact_path``."""
    setup(cfg)
    MlflowClient(cfg.tracking_uri).log_artifacts(run_id, str(local_dir), artifact_path)
