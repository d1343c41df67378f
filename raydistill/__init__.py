"""raydistill: distill large language models into small, fast, quantized ones, as a distributed workflow on Ray.

One import namespace over the repository's three layers (``pyproject.toml`` maps the top-level folders in):

- ``raydistill.tasks`` (``tasks/``) — *what* is computed: pure Python + torch/transformers/peft;
- ``raydistill.workflows`` (``workflows/``) — *when and where*: thin Ray drivers, one module per CLI verb;
- ``raydistill.cluster`` (``cluster/``) — *on what compute*: the one ``ray.init``, DeepSpeed presets, YAML.

Installing raydistill claims this one top-level name. ``docs/internals.md`` maps every module.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("raydistill")
except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0+unknown"
