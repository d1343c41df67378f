"""quantize → register → load by alias → promote through the gate → rollback, on a sqlite MLflow under tmp_path,
with a real teacher cache (``tiny_cached``) and a student built from the tiny teacher."""

import json
from pathlib import Path

import pytest
import torch

from raydistill.tasks.config import ConfigError, load_config
from raydistill.tasks.quantize import load_quantized
from raydistill.workflows import promote, quantize, register, stage, tracking

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cfg(tiny_cached, tmp_path_factory):
    """A run dir with the cache of ``tiny_cached`` and a finished 'train' stage (student = teacher layer 0)."""
    from raydistill.tasks.students import build_student, save_student
    from raydistill.tasks.teacher import load_teacher, load_tokenizer

    run_dir = tmp_path_factory.mktemp("registry") / "run"
    cfg = load_config("tiny", [f"run_dir={run_dir}", f"cache.dir={tiny_cached.cache_dir}",
                               "quantize.measure_rss=true"])  # the preset skips it (a process per method)
    teacher, _ = load_teacher(cfg.teacher)
    student_dir = cfg.stage_dir("train") / "student"
    save_student(build_student(cfg.student, teacher), load_tokenizer(cfg.teacher), student_dir)
    stage.record(cfg, "train", "test-train-key", {"student_dir": str(student_dir)}, paths=[student_dir])
    return cfg


@pytest.fixture(scope="module")
def registered(cfg):
    report = quantize.run(cfg, None)
    return report, register.run(cfg, None)


def test_quantize_report_and_resume(cfg, registered):
    report, _ = registered
    saved = json.loads(Path(cfg.run_dir, "quantize", "report.json").read_text())
    assert saved["fp32"] == report["fp32"] and saved["int8"] == report["int8"]
    fp32, int8, teacher = report["fp32"], report["candidates"]["int8_dynamic"], report["teacher"]
    assert report["int8"] == report["quantized"] == {k: v for k, v in report["candidates"][report["method"]].items()
                                                      if k in report["quantized"]}  # the chosen method's metrics
    for m in (fp32, int8, report["int8"]):
        assert m["heldout_loss"] > 0 and 0 <= m["top1_agreement"] <= 1 and m["kl_to_teacher"] >= 0
        assert m["tokens_per_s"] > 0 and m["decode_ms_per_token"] > 0
    assert teacher["heldout_loss"] > 0 and teacher["top1_agreement"] == 1.0
    assert report["ratios"]["size"] < 0.6
    assert abs(int8["heldout_loss"] - fp32["heldout_loss"]) < 0.1
    for row in [fp32, *report["candidates"].values()]:  # measured, each in a fresh process
        assert row["rss_mb"] > 0 and row["tokens_per_s_spread"] >= 0 and row["speed_rounds"] == 3
    assert report["candidates"]["int4_weight_only"]["rss_mb"] < report["candidates"]["bf16"]["rss_mb"]
    from raydistill.tasks.quantize.choice import choose
    assert choose(report["candidates"]) == (report["method"], report["reason"])  # the same rows, the same choice
    assert "the smallest" in report["reason"] and "passes the gate" in report["reason"]
    # the chosen method's standard exports, each loaded back by plain transformers
    exports, checks = report["exports"], report["export_checks"]
    assert Path(exports["hf"]["path"]) == Path(cfg.run_dir, "export", "hf")
    assert Path(exports["gguf"]["path"]) == Path(cfg.run_dir, "export", f"{cfg.registry.model_name}.gguf")
    assert checks["hf"]["loads"] and checks["gguf"]["loads"] and checks["gguf"]["max_rel_diff"] < 0.02
    before = stage.read(cfg, "quantize")["finished_at"]
    assert quantize.run(cfg, None)["int8"] == report["int8"]  # same inputs: not redone
    assert stage.read(cfg, "quantize")["finished_at"] == before


def test_register_lineage_and_idempotence(cfg, registered, tiny_cached):
    from raydistill.tasks.teacher import teacher_identity

    report, reg = registered
    client = tracking.client(cfg)
    name = cfg.registry.model_name
    mv = client.get_model_version(name, str(reg["version"]))
    tags = mv.tags
    assert tags["teacher.weights_sha256"] == teacher_identity(cfg.teacher)["weights_sha256"]
    assert tags["cache.key"] == stage.read(tiny_cached, "cache")["key"]
    assert tags["train.stage_key"] == "test-train-key"
    assert tags["quantize.stage_key"] == stage.read(cfg, "quantize")["key"]
    assert tags["raydistill.config_sha256"] == register.config_hash(cfg)
    assert float(tags["metric.int8.heldout_loss"]) == pytest.approx(report["int8"]["heldout_loss"])
    assert client.get_model_version_by_alias(name, "challenger").version == mv.version
    run = client.get_run(mv.run_id)
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.metrics["int8.kl_to_teacher"] == pytest.approx(report["int8"]["kl_to_teacher"])
    assert json.loads(Path(cfg.run_dir, "register", "version.json").read_text())["version"] == reg["version"]
    # the standard exports are artifacts of the version, and its tags say what they hold
    assert tags["export.hf.loads"] == tags["export.gguf.loads"] == "true" and tags["export.notes"]
    assert tags["export.gguf.types"].startswith(("Q4_0", "Q8_0", "BF16", "F32"))
    local, _ = tracking.download_version(cfg.tracking_uri, tracking.model_uri(name, version=mv.version),
                                         Path(cfg.run_dir) / "downloaded")
    assert [p.name for p in local.rglob("*.gguf")] == [f"{cfg.registry.model_name}.gguf"]
    assert any(p.name == "config.json" and "compressed-tensors" in p.read_text() for p in local.rglob("config.json"))
    again = register.run(cfg, None)
    assert again["version"] == reg["version"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_load_registered_by_alias_round_trip(cfg, registered):
    _, reg = registered
    name = cfg.registry.model_name
    model, tokenizer, info = register.load_registered(cfg.tracking_uri, tracking.model_uri(name, alias="challenger"))
    assert info["version"] == reg["version"] and info["alias"] == "challenger"
    local = load_quantized(Path(cfg.run_dir, "quantize", stage.read(cfg, "quantize")["outputs"]["method"]))
    ids = torch.tensor([tokenizer("ROMEO.\nBut soft, what light", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, local(input_ids=ids).logits)
    with pytest.raises(LookupError, match="nosuchalias"):
        register.load_registered(cfg.tracking_uri, tracking.model_uri(name, alias="nosuchalias"))
    with pytest.raises(ValueError, match=r"not a registry URI \(models:/name@alias"):
        register.load_registered(cfg.tracking_uri, "runs:/abc/student")


def test_pyfunc_from_code_loads_without_pickle(cfg, registered, tmp_path):
    import mlflow

    from raydistill.tasks.generate import complete

    tracking.setup(cfg)
    uri = tracking.model_uri(cfg.registry.model_name, alias="challenger")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))
    files = [p.name for p in local.rglob("*") if p.is_file()]
    assert "mlflow_model.py" in files and "model.safetensors" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".bin", ".pt"))]
    out = mlflow.pyfunc.load_model(uri).predict(["ROMEO."], params={"max_tokens": 3, "temperature": 0.0})
    model, tokenizer, _ = register.load_registered(cfg.tracking_uri, uri)
    assert out[0]["text"] == complete(model, tokenizer, ["ROMEO."], max_tokens=3)[0]["text"]


def test_a_pickle_file_planted_in_a_registered_version_is_refused_by_every_registry_loader(cfg, registered, tmp_path):
    """``load_registered`` (Serve, the gate), the logged pyfunc and ``train.init_from`` (continual) all refuse it."""
    from urllib.parse import unquote, urlparse

    import mlflow
    import yaml

    from raydistill.tasks.guard import PickleRefusedError
    from raydistill.tasks.warmstart import load_init_weights
    from raydistill.workflows import continual

    _, reg = registered
    client, name = tracking.client(cfg), cfg.registry.model_name
    root = Path(unquote(urlparse(client.get_model_version_download_uri(name, str(reg["version"]))).path))
    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    planted = root / mlmodel["flavors"]["python_function"]["artifacts"]["model"]["path"] / "pytorch_model.bin"
    planted.write_bytes(b"planted: unpickling this could run code")
    try:
        uri = tracking.model_uri(name, version=reg["version"])
        with pytest.raises(PickleRefusedError, match=r"pytorch_model\.bin"):
            register.load_registered(cfg.tracking_uri, uri)
        tracking.setup(cfg)
        with pytest.raises(PickleRefusedError, match=r"pytorch_model\.bin"):
            mlflow.pyfunc.load_model(uri)
        warm = load_config("tiny", [f"run_dir={tmp_path / 'warm'}", f"registry.tracking_uri={cfg.tracking_uri}",
                                    f"train.init_from={uri}"])
        with pytest.raises(PickleRefusedError, match=r"pytorch_model\.bin"):
            load_init_weights(continual.resolve(warm)["dir"])
    finally:
        planted.unlink()
    assert register.load_registered(cfg.tracking_uri, uri)[2]["version"] == reg["version"]  # loads again without


def test_promote_gate_then_rollback(cfg, registered):
    _, reg = registered
    client, name, v1 = tracking.client(cfg), cfg.registry.model_name, reg["version"]
    strict = load_config("tiny", [f"run_dir={cfg.run_dir}", f"cache.dir={cfg.cache_dir}",
                                  "registry.gate.max_heldout_loss=0.01"])
    failed = promote.run(strict, None)
    assert not failed["promoted"] and "heldout_loss" in failed["reason"]
    assert tracking.alias_version(client, name, "champion") is None
    assert client.get_model_version(name, str(v1)).tags["gate.passed"] == "false"

    assert promote.run(cfg, None)["champion_version"] == v1
    assert client.get_model_version(name, str(v1)).tags["gate.passed"] == "true"
    assert promote.run(cfg, None)["reason"] == "already @champion"

    # a second version (another quantize config → another stage key), promoted by number
    cfg2 = load_config("tiny", [f"run_dir={cfg.run_dir}", f"cache.dir={cfg.cache_dir}", "quantize.eval_max_windows=2"])
    quantize.run(cfg2, None)
    v2 = register.run(cfg2, None)["version"]
    assert v2 == v1 + 1
    chosen = load_config("tiny", [f"run_dir={cfg.run_dir}", f"cache.dir={cfg.cache_dir}",
                                  f"registry.promote_version={v2}"])
    assert promote.run(chosen)["champion_version"] == v2
    assert int(client.get_model_version_by_alias(name, "previous").version) == v1

    back = promote.run(cfg2, "rollback")
    assert back["champion_version"] == v1 and back["rolled_back_from"] == v2
    assert int(client.get_model_version_by_alias(name, "champion").version) == v1
    assert tracking.alias_version(client, name, "previous") is None
    with pytest.raises(ConfigError, match="no previous champion"):
        promote.run(cfg2, "rollback")
    with pytest.raises(ConfigError, match="no version 99"):
        promote.run(load_config("tiny", [f"run_dir={cfg.run_dir}", "registry.promote_version=99"]))


def test_the_generation_metric_reaches_the_quantize_report_the_versions_tags_and_the_gate(cfg, registered):
    """registry.gate.gen_prompts: quantize scores every model's greedy answers by the teacher, register tags the
    chosen one's, and promote scores the candidate and the champion on the same prompts and gates on it."""
    over = [f"run_dir={cfg.run_dir}", f"cache.dir={cfg.cache_dir}", "registry.gate.gen_prompts=3",
            "registry.gate.gen_max_tokens=4", "quantize.methods=[int8_weight_only]", "quantize.export=false"]
    gcfg = load_config("tiny", over)
    report = quantize.run(gcfg, None)
    for row in (report["teacher"], report["fp32"], report["candidates"]["int8_weight_only"]):
        assert row["gen_teacher_nll"] > 0 and 0 <= row["gen_length"] <= 4 and row["gen_answers"] == 3, row
    v = register.run(gcfg, None)["version"]
    client, name = tracking.client(cfg), cfg.registry.model_name
    nll = float(client.get_model_version(name, str(v)).tags["metric.int8.gen_teacher_nll"])
    assert nll == pytest.approx(report["int8"]["gen_teacher_nll"])

    strict = load_config("tiny", over + [f"registry.promote_version={v}", f"registry.gate.max_gen_teacher_nll={nll / 2}"])
    failed = promote.run(strict, None)
    assert not failed["promoted"] and "gen_teacher_nll" in failed["reason"], failed
    assert failed["candidate"]["gen_teacher_nll"] == pytest.approx(nll, rel=1e-4)  # the same prompts as quantize
    assert failed["champion"]["gen_teacher_nll"] > 0  # the champion, registered without it, scored now
    lenient = load_config("tiny", over + [f"registry.promote_version={v}", "registry.gate.max_gen_teacher_nll=1000",
                                          "registry.gate.max_gen_nll_regression=1000"])
    done = promote.run(lenient, None)
    assert done["promoted"], done
    assert any(r.startswith("gen_teacher_nll") and "champion" in r for r in done["reasons"]), done["reasons"]


def test_a_lora_student_registers_and_loads_as_quantized_base_plus_adapter(tiny_cached, tmp_path):
    """``quantize.lora: adapter``: the version holds the int4 base and the float32 LoRA adapter in one directory;
    the registry loader and the logged pyfunc rebuild both and give the quantize stage's logits."""
    import mlflow

    from raydistill.tasks.generate import complete
    from raydistill.tasks.students import build_student, save_student
    from raydistill.tasks.teacher import load_teacher, load_tokenizer

    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"cache.dir={tiny_cached.cache_dir}",
                               "student.peft.method=lora", "quantize.method=int4_weight_only", "quantize.lora=adapter",
                               "quantize.bench_tokens=0", "registry.model_name=tiny-lora-student"])
    teacher, _ = load_teacher(cfg.teacher)
    student = build_student(cfg.student, teacher)
    with torch.no_grad():  # a "trained" adapter (LoRA's B starts at zero: the identity)
        for _, p in student.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    student_dir = cfg.stage_dir("train") / "student"
    save_student(student, load_tokenizer(cfg.teacher), student_dir)
    stage.record(cfg, "train", "lora-train-key", {"student_dir": str(student_dir)}, paths=[student_dir])
    report = quantize.run(cfg, None)
    assert report["method"] == "int4_weight_only"
    reg = register.run(cfg, None)
    uri = tracking.model_uri(cfg.registry.model_name, version=reg["version"])
    model, tokenizer, info = register.load_registered(cfg.tracking_uri, uri)
    assert info["version"] == reg["version"] and model._raydistill_quant["adapter_kind"] == "lora"
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        local = load_quantized(report["model_dir"])
        assert torch.equal(model(input_ids=ids).logits, local(input_ids=ids).logits)
        with model.disable_adapter():  # the adapter is really applied on top of the base
            assert not torch.equal(model(input_ids=ids).logits, local(input_ids=ids).logits)
    tracking.setup(cfg)
    out = mlflow.pyfunc.load_model(uri).predict(["ROMEO."], params={"max_tokens": 3, "temperature": 0.0})
    assert out[0]["text"] == complete(model, tokenizer, ["ROMEO."], max_tokens=3, temperature=0.0)[0]["text"]
