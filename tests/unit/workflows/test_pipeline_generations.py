"""pipeline.generations: generation k's config (no Ray: the stages themselves run in tests/integration)."""

from raydistill.tasks.config import load_config, resolve_paths
from raydistill.workflows.pipeline import generation_config


def test_generation_k_is_taught_by_generation_k_minus_1_in_its_own_run_dir_cache_and_shared_registry(tmp_path):
    cfg = resolve_paths(load_config("tiny", [f"run_dir={tmp_path}", "pipeline.generations=3",
                                             "student.init=born_again"]))
    assert generation_config(cfg, 0, None) is cfg
    g1 = generation_config(cfg, 1, str(tmp_path / "train" / "student"))
    assert g1.run_dir == str(tmp_path / "gen-1") and g1.cache_dir == str(tmp_path / "gen-1" / "cache")
    assert g1.teacher.source == str(tmp_path / "train" / "student")
    assert g1.tracking_uri == cfg.tracking_uri  # one registry for every generation
    assert g1.student == cfg.student and g1.train == cfg.train
    shared = resolve_paths(load_config("tiny", [f"run_dir={tmp_path}", f"cache.dir={tmp_path}/caches"]))
    assert generation_config(shared, 2, "x").cache_dir == f"{tmp_path}/caches/gen-2"  # one cache per teacher


def test_every_later_generation_is_gated_on_generation_0s_heldout_set(tmp_path):
    cfg = resolve_paths(load_config("tiny", [f"run_dir={tmp_path}", "pipeline.generations=3"]))
    assert cfg.registry.gate.heldout_cache is None  # generation 0: its own cache
    for g in (1, 2):  # not its own teacher's targets: that teacher is the champion it would replace
        assert generation_config(cfg, g, "x").registry.gate.heldout_cache == cfg.cache_dir
    assert generation_config(cfg, 2, "x").registry.gate == generation_config(cfg, 1, "x").registry.gate


def test_the_summary_table_shows_the_generation_metric_only_when_it_was_measured(capsys):
    from raydistill.workflows.pipeline import _row, print_summary

    base = {"heldout_loss": 5.0, "perplexity": 148.4, "top1_agreement": 0.3, "size_bytes": 2**20, "tokens_per_s": 99.0}
    summary = {"rows": [_row("teacher", base), _row("student fp32", base)], "cache": {
        "shards_total": 1, "tokens": 10, "bytes_per_token": 35.0, "teacher_forwards": 0}, "promoted": True,
        "model": "x version 1", "promotion_reason": "gate passed", "run_dir": "r", "mlflow_tracking_uri": "sqlite:///m",
        "stage_seconds": {}}
    print_summary(summary)
    assert "gen NLL" not in capsys.readouterr().out
    summary["rows"][1] = _row("student fp32", {**base, "gen_teacher_nll": 3.25, "gen_length": 31.0})
    print_summary(summary)
    out = capsys.readouterr().out
    teacher = next(line for line in out.splitlines() if line.startswith("teacher"))
    assert "gen NLL  gen len" in out and "    3.250     31.0" in out and teacher.endswith("        -        -")
