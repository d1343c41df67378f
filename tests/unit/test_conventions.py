"""One convention per cross-cutting concern: MLflow only through workflows/tracking.py, registry URIs built and read
only there (``model_uri``/``parse_model_uri``), atomic writes only through tasks/fileio.py."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ("tasks", "workflows", "cluster")
MLFLOW_ALLOWED = {"workflows/tracking.py", "workflows/mlflow_model.py"}


def _files(*tops: str):
    for top in tops:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _imported_modules(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def _code_strings(tree: ast.AST):
    """String constants of the code: docstrings and other bare string statements are prose, not code."""
    prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            yield node.lineno, node.value


def _builds_registry_uri(tree: ast.AST):
    """Lines where a string (or the head of an f-string) starts with ``models:/``: a URI built or matched by hand.
    Prose that mentions the scheme mid-sentence (CLI help) does not count."""
    for lineno, value in _code_strings(tree):
        if value.startswith("models:/"):
            yield lineno


def test_only_tracking_and_the_logged_model_code_import_mlflow():
    offenders = [f"{rel}: {mod}" for rel, tree in _files(*PACKAGE) if rel not in MLFLOW_ALLOWED
                 for mod in _imported_modules(tree) if mod.split(".")[0] == "mlflow"]
    assert offenders == [], "import mlflow only in workflows/tracking.py (add a function there)"


def test_nothing_reaches_mlflow_through_the_tracking_module_attribute():
    """``tracking.mlflow.log_params(...)`` would bypass the functions tracking.py offers."""
    offenders = [f"{rel}:{node.lineno}" for rel, tree in _files(*PACKAGE, "benchmarks")
                 for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and node.attr in ("mlflow", "MlflowClient")
                 and isinstance(node.value, ast.Name) and node.value.id == "tracking"]
    assert offenders == []


def test_registry_uris_are_built_only_by_tracking_model_uri():
    trees = list(_files(*PACKAGE, "benchmarks", "tests"))
    assert any(rel == "workflows/tracking.py" and list(_builds_registry_uri(tree)) for rel, tree in trees)
    mine = {"workflows/tracking.py", "tests/unit/test_tracking.py", "tests/unit/test_conventions.py"}
    offenders = [f"{rel}:{line}" for rel, tree in trees if rel not in mine for line in _builds_registry_uri(tree)]
    assert offenders == [], "build registry URIs with tracking.model_uri(name, version=…|alias=…)"


def test_files_are_replaced_atomically_only_through_fileio():
    """``os.replace`` outside tasks/fileio.py is a hand-written atomic write (the cache's store has its own)."""
    allowed = {"tasks/fileio.py", "tasks/cache/store.py"}
    offenders = [f"{rel}:{node.lineno}" for rel, tree in _files(*PACKAGE) if rel not in allowed
                 for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename")
                 and isinstance(node.value, ast.Name) and node.value.id == "os"]
    assert offenders == [], "use raydistill.tasks.fileio (atomic_write_text/_json, replace_dir)"


def test_every_test_module_has_a_name_no_other_test_module_has():
    """The test folders have no __init__.py, so pytest imports test modules by basename: two files of one name
    (tests/unit/test_x.py and tests/integration/test_x.py) stop the whole suite at collection."""
    seen: dict[str, str] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if path.name in seen:
            clashes.append(f"{seen[path.name]} and {rel}")
        seen.setdefault(path.name, rel)
    assert not clashes, f"test modules share a basename (rename one): {clashes}"
