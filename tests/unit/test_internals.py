"""docs/internals.md maps every module of the package: a new module without a line there fails here."""

import dataclasses
import re
from pathlib import Path

from raydistill.tasks.config import ClusterConfig

ROOT = Path(__file__).resolve().parents[2]


def _modules() -> list[str]:
    names = []
    for top in ("tasks", "workflows", "cluster"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if len(parts) > 1:  # the layer packages themselves have their own section
                names.append(".".join(parts))
    return names + ["raydistill", "raydistill.__main__"]


def test_every_module_has_an_entry_in_internals_md():
    doc = (ROOT / "docs" / "internals.md").read_text()
    missing = [name for name in _modules() if f"`{name}`" not in doc]
    assert missing == [], f"add these modules to docs/internals.md: {missing}"


def test_internals_md_names_no_module_that_does_not_exist():
    doc = (ROOT / "docs" / "internals.md").read_text()
    # config fields of the `cluster` section read like module names
    known = set(_modules()) | {f"cluster.{f.name}" for f in dataclasses.fields(ClusterConfig)}
    named = set(re.findall(r"`((?:tasks|workflows|cluster)\.[A-Za-z_.]*[A-Za-z_])`", doc))
    # a name may be a module or something in one (`tasks.cache.formats.FORMATS`)
    stale = sorted(n for n in named if n not in known and n.rsplit(".", 1)[0] not in known)
    assert stale == [], f"docs/internals.md names modules that no longer exist: {stale}"
