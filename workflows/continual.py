"""Where a warm-started student begins (``train.init_from``): a registry version or a local directory.

    raydistill pipeline --config tiny corpus.path=my-texts/ corpus.max_tokens=null train.init_from=champion

Continual distillation: add corpus files and run the pipeline again. The cache computes only the new files'
shards (``tasks/corpus.py``: one stream per file), the train key changes with the cache's content
(``workflows/stage.py``), the student starts from the current ``@champion`` (dequantized from its registered
int8 weights, ``tasks/warmstart.py``), is registered as ``@challenger``, and ``promote`` gates it against the
champion. :func:`resolve` turns the setting into a local directory once per training; the registry is reached only
through ``workflows/tracking.py``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml

from raydistill.tasks.config import ConfigError, PipelineConfig
from raydistill.tasks.fileio import replace_dir
from raydistill.tasks.warmstart import weights_digest

CHAMPION = "champion"


def resolve(cfg: PipelineConfig) -> dict | None:
    """``None`` (build the student from the teacher) or where it starts: ``{"source", "dir", "weights_sha256"}``
    plus ``name``/``version``/``run_id`` for a registry version. ``champion`` with no champion yet is ``None``."""
    from raydistill.workflows import tracking

    spec = cfg.train.init_from
    if not spec:
        return None
    if spec == CHAMPION or spec.startswith(tracking.URI_SCHEME):
        return _from_registry(cfg, spec)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"train.init_from {spec!r}: no such directory; use champion, models:/NAME@ALIAS, "
                          "models:/NAME/VERSION or a student directory (e.g. <run_dir>/train/student)")
    return {"source": str(path.resolve()), "dir": str(path.resolve()), "weights_sha256": weights_digest(path)}


def _from_registry(cfg: PipelineConfig, spec: str) -> dict | None:
    from raydistill.workflows import tracking

    uri = tracking.model_uri(cfg.registry.model_name, alias=CHAMPION) if spec == CHAMPION else spec
    try:
        mv = tracking.resolve_version(cfg.tracking_uri, uri)
    except LookupError as e:
        if spec == CHAMPION:
            print(f"[train] train.init_from=champion: no {uri} yet; building the student from the teacher")
            return None
        raise ConfigError(f"train.init_from {spec!r}: {e}; check the name and alias/version "
                          f"(registry {cfg.tracking_uri})") from None
    dest = Path(cfg.run_dir, "train", "init_from", f"v{int(mv.version)}")
    if not (dest / "config.json").is_file():
        _download(cfg, tracking.model_uri(mv.name, version=mv.version), dest)
    return {"source": uri, "dir": str(dest.resolve()), "weights_sha256": weights_digest(dest), "name": mv.name,
            "version": int(mv.version), "run_id": mv.run_id}


def _download(cfg: PipelineConfig, uri: str, dest: Path) -> None:
    """The int8 model directory of version ``uri`` (the ``model`` artifact of its pyfunc) copied to ``dest``."""
    from raydistill.workflows import tracking

    tmp = tempfile.mkdtemp(prefix="raydistill-init-")
    try:
        local, _ = tracking.download_version(cfg.tracking_uri, uri, tmp)
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        model_dir = local / mlmodel["flavors"]["python_function"]["artifacts"]["model"]["path"]
        with replace_dir(dest) as staging:
            for f in model_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, staging / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
