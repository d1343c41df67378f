"""The layers: tasks/ is pure (no ray, mlflow or deepspeed), and all three ship under one ``raydistill`` namespace."""

import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import raydistill.tasks as tasks


def test_tasks_import_no_ray_mlflow_deepspeed():
    modules = sorted(m.name for m in pkgutil.walk_packages(tasks.__path__, "raydistill.tasks."))
    assert "raydistill.tasks.config" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'mlflow', 'deepspeed'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"tasks imported: {out.stdout.strip()}"


ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("tasks", "workflows", "cluster")


def _python_files():
    for top in (*LAYERS, "benchmarks", "tests", "raydistill"):
        yield from (ROOT / top).rglob("*.py")


def test_every_subpackage_ships_in_the_raydistill_namespace():
    """A folder with ``__init__.py`` under a layer that pyproject does not list would be missing from the wheel."""
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {"raydistill"} | {
        "raydistill." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in LAYERS for init in (ROOT / top).rglob("__init__.py")}
    assert set(setuptools_cfg["packages"]) == found
    assert {k: v for k, v in setuptools_cfg["package-dir"].items()} == {
        "raydistill": "raydistill", **{f"raydistill.{top}": top for top in LAYERS}}


def test_code_imports_the_layers_only_through_the_raydistill_namespace():
    """``import tasks`` would load a second copy of a module (or another project's ``tasks``) once installed."""
    bare = re.compile(r"^\s*(from|import)\s+(tasks|workflows|cluster)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in _python_files() if bare.search(p.read_text())]
    assert offenders == []


def test_the_wheel_installs_only_the_raydistill_name(tmp_path):
    """Installing raydistill claims one top-level name; ``tasks``/``workflows``/``cluster`` live under it."""
    src = tmp_path / "src"  # build from a copy: setuptools leaves a build/ folder beside the sources it builds
    for top in ("raydistill", *LAYERS):
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("raydistill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"raydistill", wheel.name.split("-py")[0] + ".dist-info"}
    for needed in ("raydistill/tasks/config.py", "raydistill/workflows/cli.py", "raydistill/cluster/ray_init.py",
                   "raydistill/workflows/configs/tiny.yaml", "raydistill/cluster/deepspeed/zero2.json"):
        assert needed in names
