"""``raydistill report``: ``<run_dir>/report/index.html`` and its PNG figures, from what the stages recorded.

    raydistill report --config tiny         # after `raydistill pipeline --config tiny` (pipeline's last step)

Reads the stage records (``<run_dir>/stages``), ``tune/best.json``, ``quantize/report.json``, the cache's
manifest and the per-step metric histories of the final training run and of every Tune trial (MLflow: with
the default tracking store that is ``<run_dir>/mlflow.db``, so the report needs no network). Missing stages
leave their section out. The figures are drawn by :mod:`tasks.report`; the folder is also logged as artifacts
(``report/``) of the registered version's MLflow run. Not a stage: it is cheap, so it is always redrawn.
"""

from __future__ import annotations

import json
from pathlib import Path

from raydistill.tasks import report as fig
from raydistill.tasks.config import PipelineConfig, generated_corpus, resolve_paths
from raydistill.tasks.errors import StageMissingError
from raydistill.tasks.fileio import replace_dir
from raydistill.workflows import stage
from raydistill.workflows.verbs import STAGES

CURVE_KEYS = ("loss", "heldout_loss", "init_heldout_loss")


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """Draw the report into ``<run_dir>/report`` (replaced whole) and log it to the registered version's run."""
    cfg = generated_corpus(resolve_paths(cfg))  # the cache the pipeline read: the answers with pipeline.generate
    records = {s: r for s in STAGES if (r := stage.read(cfg, s))}
    if not records:
        raise StageMissingError(f"report: no finished stage in {cfg.run_dir}: run `raydistill pipeline` (or a "
                                "stage such as `raydistill cache`) with the same config first")
    out = Path(cfg.run_dir, "report")
    with replace_dir(out) as tmp:
        sections = build_sections(cfg, records, tmp)
        subtitle = f"run_dir {Path(cfg.run_dir).resolve()} · stages {', '.join(records)}"
        (tmp / "index.html").write_text(fig.render_html("raydistill run report", sections, subtitle))
    figures = sorted(p.name for p in out.glob("*.png"))
    logged = _log_to_registered_run(cfg, records.get("register"), out)
    print(f"[report] {len(figures)} figures → {out / 'index.html'}" + (f" (logged to MLflow run {logged})"
                                                                         if logged else ""))
    return {"index": str(out / "index.html"), "figures": figures, "mlflow_run_id": logged}


def build_sections(cfg: PipelineConfig, records: dict, out: Path) -> list[fig.Section]:
    """Every section whose stage finished; figures are written under ``out``."""
    sections = []
    runs = _curves(cfg, records)
    if runs:
        note = ("Final run thick black (it repeats the best trial's settings, so it may hide that trial's line); "
                "Tune trials thin, dashed when ASHA stopped them.")
        sections.append(fig.Section("Training and held-out loss per step",
                                    [fig.curves_figure(runs, out / "curves.png")], note=note))
    if "quantize" in records:
        rows = model_rows(cfg, records["quantize"])
        g = cfg.registry.gate
        note = _gate_note(g)
        keys = [k for k, _ in fig.MODEL_METRICS if not k.startswith("gen_") or g.gen_prompts]
        table = [{"model": name, **{k: r.get(k) for k in keys}} for name, r in rows.items()]
        sections.append(fig.Section("Teacher, student and quantized students",
                                    [fig.models_figure(rows, out / "models.png")], table, note))
    tune = (records.get("tune") or {}).get("outputs")
    if tune and tune.get("trials"):
        best = tune.get("best_trial")
        trials = [{**t, "best": t.get("trial_id") == best if best else t.get("params") == tune.get("params")}
                  for t in tune["trials"]]
        searched = sorted({k for t in trials for k in t.get("params", {})})
        table = [{"trial": t.get("trial_id"), **t["params"], "heldout_loss": t.get("heldout_loss"),
                  "reports": t.get("reports"), "stopped": t.get("stopped"), "error": t.get("error")} for t in trials]
        sections.append(fig.Section("Tune trials", [fig.trials_figure(trials, searched, out / "trials.png")], table,
                                    note=tune.get("choice", "")))
    if "cache" in records:
        cache = _cache_facts(cfg, records["cache"]["outputs"])
        sections.append(fig.Section("Teacher cache", [fig.cache_figure(cache, out / "cache.png")], [cache]))
    if "register" in records:
        reg = records["register"]["outputs"]
        rows = [{"field": k, "value": reg.get(k)} for k in ("name", "version", "model_uri", "run_id", "alias")]
        rows += [{"field": k, "value": v} for k, v in sorted((reg.get("tags") or {}).items())]
        sections.append(fig.Section(f"Lineage of {reg.get('name')} version {reg.get('version')}", rows=rows))
    return sections


def _gate_note(g) -> str:
    checks = [f"heldout_loss <= {g.max_heldout_loss}", f"top1_agreement >= {g.min_top1_agreement}"]
    checks += [f"{k} <= {v}" for k, v in (("kl_to_teacher", g.max_kl_to_teacher),
                                          ("gen_teacher_nll", g.max_gen_teacher_nll)) if v is not None]
    note = "Held-out split. Gate: " + ", ".join(checks) + "."
    if g.gen_prompts:
        note += (f" Generation: the teacher's NLL of each model's greedy answers (at most {g.gen_max_tokens} "
                 f"tokens) to {g.gen_prompts} held-out prompts, and their length.")
    return note


def model_rows(cfg: PipelineConfig, quantize: dict) -> dict[str, dict]:
    """``{model: metrics}`` from the quantize report: the teacher (with its size on disk), the fp32 student and
    each quantized candidate once, named by its method, the chosen one marked ``(chosen)`` (the report's
    ``quantized``/``int8`` entries are aliases of the chosen row, not other models)."""
    path = Path((quantize.get("outputs") or {}).get("report") or cfg.stage_dir("quantize") / "report.json")
    report = json.loads(path.read_text())
    rows = {name: dict(report[key]) for name, key in (("teacher", "teacher"), ("student fp32", "fp32"))
            if isinstance(report.get(key), dict)}
    candidates = report.get("candidates") or {report.get("method"): report.get("quantized") or report.get("int8")}
    for method, row in candidates.items():
        if isinstance(row, dict) and row.get("heldout_loss") is not None:
            rows[f"student {method}" + (" (chosen)" if method == report.get("method") else "")] = dict(row)
    if "teacher" in rows:
        for k, v in _teacher_size_speed(cfg).items():
            rows["teacher"][k] = v if rows["teacher"].get(k) is None else rows["teacher"][k]
    return rows


def _curves(cfg: PipelineConfig, records: dict) -> list[fig.Curves]:
    """Per-step histories: every Tune trial (stopped ones marked) and the final training run."""
    from raydistill.workflows import tracking

    runs = []
    tune = (records.get("tune") or {}).get("outputs") or {}
    if tune.get("mlflow_parent_run_id"):
        stopped = {t.get("trial_id"): t.get("stopped") for t in tune.get("trials", [])}
        children = sorted(tracking.child_runs(cfg, tune["mlflow_parent_run_id"]), key=lambda r: r["name"] or "")
        for child in children:
            trial = child["tags"].get("raydistill.trial_id", child["name"])
            runs.append(fig.Curves(f"trial {trial}", tracking.metric_histories(cfg, child["run_id"], CURVE_KEYS),
                                   stopped=bool(stopped.get(trial))))
    train = (records.get("train") or {}).get("outputs") or {}
    if train.get("mlflow_run_id"):
        runs.append(fig.Curves("final", tracking.metric_histories(cfg, train["mlflow_run_id"], CURVE_KEYS),
                               final=True))
    for r in runs:  # the evaluation before training (logged as init_*, step 0) starts the held-out curve
        r.series["heldout_loss"] = r.series.pop("init_heldout_loss", []) + r.series.get("heldout_loss", [])
    return [r for r in runs if any(r.series.values())]


def _cache_facts(cfg: PipelineConfig, outputs: dict) -> dict:
    from raydistill.tasks.cache.shards import config_cache

    manifest = config_cache(cfg).manifest
    facts = {k: outputs.get(k) for k in ("bytes_per_token", "teacher_forwards", "shards_total", "shards_computed",
                                         "tokens", "bytes")}
    return {"format": manifest.get("format"), "vocab_size": manifest.get("vocab_size"), **facts}


def _teacher_size_speed(cfg: PipelineConfig) -> dict:
    """The teacher's weights on disk and its forward tokens/s (the cache stage's), as the pipeline summary has
    them; empty when the cache cannot say."""
    from raydistill.workflows import pipeline

    try:
        return pipeline._teacher_size_speed(cfg)
    except (OSError, KeyError):
        return {}


def _log_to_registered_run(cfg: PipelineConfig, register: dict | None, out: Path) -> str | None:
    """The report folder as ``report/`` artifacts of the registered version's run (None: nothing registered)."""
    run_id = ((register or {}).get("outputs") or {}).get("run_id")
    if not run_id:
        return None
    from raydistill.workflows import tracking

    tracking.log_artifacts_to(cfg, run_id, out, "report")
    return run_id

