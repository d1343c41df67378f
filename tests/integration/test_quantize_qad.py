"""The quantize stage with quantization-aware distillation on Ray Train workers, from a real tiny teacher cache:
QAD's int4 student scores better on the held-out split than the round-to-nearest int4 model it starts from,
and the stage's choice, report and saved candidates follow the measurements."""

import json
from pathlib import Path

import pytest

from raydistill.tasks.config import load_config
from raydistill.tasks.quantize import load_quantized, read_quantization_info
from raydistill.tasks.quantize.choice import choose
from raydistill.workflows import quantize, stage

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a Ray Train run: ~2 min idle, 6 min loaded


@pytest.fixture(scope="module")
def report(tiny_cached, tmp_path_factory):
    """Student = teacher layer 0 (the tiny teacher's own weights: a peaked distribution int4 visibly hurts)."""
    from raydistill.tasks.students import build_student, save_student
    from raydistill.tasks.teacher import load_teacher, load_tokenizer

    run_dir = tmp_path_factory.mktemp("qad") / "run"
    cfg = load_config("tiny", [f"run_dir={run_dir}", f"cache.dir={tiny_cached.cache_dir}",
                               "quantize.methods=[int4_weight_only,qad]", "quantize.qad_steps=12",
                               "quantize.qad_lr=0.001", "quantize.size_budget=0.5", "train.num_workers=1"])
    teacher, _ = load_teacher(cfg.teacher)
    student_dir = cfg.stage_dir("train") / "student"
    save_student(build_student(cfg.student, teacher), load_tokenizer(cfg.teacher), student_dir)
    stage.record(cfg, "train", "test-train-key", {"student_dir": str(student_dir)}, paths=[student_dir])
    return cfg, quantize.run(cfg, None)


def test_qad_through_ray_train_lowers_the_heldout_loss_of_the_int4_ptq_it_starts_from(report):
    """On the tiny random teacher the KL to it hardly moves in 12 steps (measured: 8.0206 vs 8.0194 with
    alpha 0, 8.0235 vs 8.0194 with alpha 0.5), so this end-to-end test checks the held-out loss (measured 10.52
    vs 10.79); QAD's KL recovery is checked on the mechanism in tests/unit/test_quantize_methods.py and
    measured on the trained default student by benchmarks/quantize.py (docs/benchmarks.md)."""
    cfg, out = report
    rows = out["candidates"]
    assert set(rows) == {"int4_weight_only", "qad"}
    assert rows["qad"]["heldout_loss"] < rows["int4_weight_only"]["heldout_loss"], rows
    assert Path(cfg.stage_dir("quantize"), "qad_train", "student", "model.safetensors").exists()  # Ray Train's export
    assert read_quantization_info(Path(cfg.stage_dir("quantize"), "qad"))["method"] == "qad"
    assert rows["qad"]["size_ratio"] == pytest.approx(rows["int4_weight_only"]["size_ratio"], rel=1e-3)


def test_the_report_names_the_choice_and_it_is_what_was_saved(report):
    cfg, out = report
    saved = json.loads(Path(cfg.stage_dir("quantize"), "report.json").read_text())
    assert saved["method"] == out["method"] in {"int4_weight_only", "qad"}
    assert saved["model_dir"] == saved["int8_dir"] == str(Path(cfg.stage_dir("quantize"), out["method"]))
    assert saved["quantized"] == saved["int8"] and saved["reason"]
    for row in saved["candidates"].values():
        assert row["gate_passed"] and row["within_budget"]  # tiny gate, budget 0.5: both qualify
        assert row["higher_precision"]  # norms at least
    # the reproducible rule (tasks/quantize/choice.py): the smallest passing candidate, then the lowest KL; the
    # report's reason says so, and the saved rows give the same answer again
    assert (saved["method"], saved["reason"]) == choose(saved["candidates"])
    assert load_quantized(saved["model_dir"]) is not None
