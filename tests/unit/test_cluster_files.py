"""Cluster and infra files stay consistent with the code: they parse, name real verbs, presets, keys, imports."""

import importlib
import json
import shlex
from pathlib import Path

import pytest
import yaml

from raydistill.tasks.config import load_config
from raydistill.workflows.verbs import VERBS

ROOT = Path(__file__).resolve().parents[2]
YAMLS = sorted([*ROOT.glob("cluster/**/*.yaml"), *ROOT.glob("infra/**/*.yaml")])


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_presets_match_their_stage(stage):
    cfg = json.loads((ROOT / "cluster" / "deepspeed" / f"zero{stage}.json").read_text())
    assert cfg["zero_optimization"]["stage"] == stage


def test_rayjob_entrypoint_is_a_valid_command():
    job = yaml.safe_load((ROOT / "cluster/kuberay/rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "raydistill" and argv[1] in VERBS
    preset = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[2:] if "=" in a]
    cfg = load_config(preset, overrides)  # raises on any unknown key
    assert cfg.run_dir.startswith("/mnt/shared")


def test_rayservice_import_path_resolves():
    svc = yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    module, attr = serve_cfg["applications"][0]["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
