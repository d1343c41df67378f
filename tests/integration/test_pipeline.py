"""End to end: the whole pipeline on the tiny preset, for real (Ray, DeepSpeed, Tune, MLflow sqlite, Serve HTTP)."""

import json
from pathlib import Path

import pytest

from raydistill.cluster.local_cluster import free_ports
from raydistill.tasks.config import load_config

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_tiny_pipeline_end_to_end_then_rerun_is_free(tmp_path, ray_cluster, capsys, monkeypatch):
    from raydistill.tasks.config import resolve_paths
    from raydistill.workflows import pipeline

    # a relative run_dir, as a user types it: Tune trials and Ray workers run in other directories
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["run_dir=run", f"serve.port={free_ports(1)[0]}"])
    summary = pipeline.run(cfg)

    rows = {r["model"]: r for r in summary["rows"]}
    chosen = f"student {summary['quantization']}"  # the quantize stage's choice among quantize.methods
    assert set(rows) == {"teacher", "student fp32", chosen}
    assert rows[chosen]["size_mb"] < rows["student fp32"]["size_mb"]
    for r in rows.values():
        assert r["heldout_loss"] > 0 and r["perplexity"] > 1
    assert summary["cache"]["teacher_forwards"] > 0
    assert summary["tuned"] and set(summary["tuned"]) == {"alpha", "temperature", "lr", "loss"}
    assert summary["promoted"] is True and summary["champion"] is not None
    assert isinstance(summary["served"]["text"], str)
    assert len(summary["served"]["token_logprobs"]) > 0
    out = capsys.readouterr().out
    assert "raydistill summary" in out and chosen in out
    # the last step draws the report and prints its path (Ray's worker logs may still follow it)
    assert Path(summary["report"]).is_file() and f"\nreport: {summary['report']}\n" in out

    # the champion alias really is in the registry
    from mlflow.tracking import MlflowClient

    cfg = resolve_paths(cfg)
    client = MlflowClient(cfg.tracking_uri)
    champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert str(champion.version) == str(summary["champion"])
    assert json.loads(Path(cfg.run_dir, "summary.json").read_text())["champion"] == summary["champion"]

    # second run: every stage is skipped, the cache runs zero teacher forward passes
    again = pipeline.run(cfg)
    assert again["cache"]["teacher_forwards"] == 0
    assert again["cache"]["shards_computed"] == 0
    assert again["champion"] == summary["champion"]
    versions = client.search_model_versions(f"name='{cfg.registry.model_name}'")
    assert len(versions) == 1, "a rerun must not register a second version"
