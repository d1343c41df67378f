"""raydistill: distill large language models into small, fast, quantized ones, as a distributed workflow on Ray.

One import namespace over the repository's three layers (``pyproject.toml`` maps the top-level folders in):

- ``raydistill.tasks`` (``tasks/``) — *what* is computed: pure Python + torch/transformers/peft;
- ``raydistill.workflows`` (``workflows/``) — *when and where*: thin Ray drivers, one module per CLI verb;
- ``raydistill.cluster`` (``cluster/``) — *on what compute*: the one ``ray.init``, DeepSpeed presets, YAML.

Installing raydistill claims this one top-level name. ``docs/internals.md`` maps every module.
"""

import importlib
import logging
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("raydistill")
except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0+unknown"


LAYERS = ("tasks", "workflows", "cluster")

# peft imports torchao whenever it is installed (raydistill pins it for quantization); on a CPU-only torch, torchao
# warns on every import that its CUDA kernels failed to load and torch's pytree that torchao registers enums the
# old way. Neither is actionable for a user, so every command would open with four lines of noise: keep errors only.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def copy_package(dest: Path, layers: tuple[str, ...] = LAYERS) -> Path:
    """This raydistill laid out as installed, ``dest/{__init__.py, __main__.py, <layer>/…}``, whether it runs from
    a checkout (the layers are top-level folders there) or an install. For code that ships raydistill elsewhere:
    a job's working directory (``workflows.submit``), a logged model's code (``workflows.register``)."""
    ignore = shutil.ignore_patterns("__pycache__")
    dest.mkdir(parents=True)
    for name in ("__init__.py", "__main__.py"):
        shutil.copy(Path(__file__).with_name(name), dest / name)
    for layer in layers:
        shutil.copytree(Path(importlib.import_module(f"raydistill.{layer}").__file__).parent, dest / layer,
                        ignore=ignore)
    return dest
