"""tasks/ is pure: importing every tasks module leaves ray, mlflow and deepspeed unimported."""

import pkgutil
import subprocess
import sys

import tasks


def test_tasks_import_no_ray_mlflow_deepspeed():
    modules = sorted(m.name for m in pkgutil.iter_modules(tasks.__path__))
    assert "config" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('tasks.' + m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'mlflow', 'deepspeed'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"tasks imported: {out.stdout.strip()}"
