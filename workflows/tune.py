"""Search alpha, T, lr, the KD loss (and LoRA rank/alpha, student layers) over one teacher cache with Ray Tune.

    raydistill tune --config smollm2-shakespeare tune.num_samples=8 tune.steps=40
    raydistill tune --config tiny tune.search=optuna tune.num_samples=6        # Optuna TPE, seeded

Train V2 pattern: every trial runs ``tune_trial`` (a driver function, no CPUs of its own) which builds a
``TorchTrainer`` through ``workflows.train.train_driver``; ``TuneReportCallback`` forwards the workers'
held-out evaluations to Tune so ASHA can stop weak trials early. Every trial reads the same cache and is an
MLflow child run of one parent run (a retried trial reuses its run and continues from its last checkpoint).
The best trial, the lowest held-out loss among trials that pass the gate's thresholds (:func:`choose_best`),
goes to ``<run_dir>/tune/best.json`` with every trial; ``pipeline`` trains the final student with its settings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from raydistill.tasks.config import PipelineConfig, from_dict, resolve_paths, to_dict
from raydistill.tasks.fileio import atomic_write_json
from raydistill.tasks.gate import violations
from raydistill.tasks.trainloop import report_steps
from raydistill.workflows import stage, tracking

METRIC, MODE = "heldout_loss", "min"
TUNED_FIELDS = ("alpha", "temperature", "lr", "loss")
"""Always searched (fields of ``train``)."""
OPTIONAL_FIELDS = {"lora_r": ("student", "peft", "r"), "lora_alpha": ("student", "peft", "lora_alpha"),
                   "student_layers": ("student", "layers")}
"""Searched when their ``tune`` list is not empty: the trial parameter → the config field it sets."""


def param_space(cfg: PipelineConfig) -> dict:
    """Tune's search space. Student layer lists are choices of strings (``"0,29"``): Optuna's categorical
    distribution takes only scalars."""
    t = cfg.tune
    space = {
        "alpha": tune.choice(t.alpha),
        "temperature": tune.choice(t.temperature),
        "lr": tune.loguniform(*t.lr) if t.lr[0] < t.lr[1] else t.lr[0],
        "loss": tune.choice(t.loss),
    }
    if t.lora_r:
        space["lora_r"] = tune.choice(t.lora_r)
    if t.lora_alpha:
        space["lora_alpha"] = tune.choice(t.lora_alpha)
    if t.student_layers:
        space["student_layers"] = tune.choice([",".join(map(str, layers)) for layers in t.student_layers])
    return space


def searcher(cfg: PipelineConfig):
    """``tune.search``: None (Tune's random sampling, seeded through :func:`_seed_search`) or Optuna's TPE
    sampler seeded with ``tune.seed`` (the same seed suggests the same first trials)."""
    if cfg.tune.search == "random":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=cfg.tune.seed, n_startup_trials=cfg.tune.optuna_startup_trials)
    return OptunaSearch(metric=METRIC, mode=MODE, sampler=sampler)


def asha_limits(cfg: PipelineConfig) -> tuple[int, int]:
    """ASHA's ``(max_t, grace_period)``, counted in results a trial reports: exactly the report steps train uses
    (every ``eval_every``, every ``checkpoint_every``, the last step; :func:`tasks.trainloop.report_steps`).

    ``max_t`` sits one past the last report: a trial that reaches its budget finishes on its own (a trial
    stopped by Tune at ``max_t`` would kill its Train run mid-export).
    """
    reports = len(report_steps(cfg.train, cfg.tune.steps))
    return reports + 1, min(cfg.tune.grace_period, reports)


def apply_params(cfg: PipelineConfig, params: dict) -> PipelineConfig:
    """A copy of ``cfg`` with the searched ``params`` set (train fields, LoRA rank/alpha, student layers),
    validated again."""
    data = to_dict(cfg)
    data["train"].update({k: params[k] for k in TUNED_FIELDS if k in params})
    for name, (*parents, leaf) in OPTIONAL_FIELDS.items():
        if name in params:
            value = params[name]
            if name == "student_layers":
                value = [int(x) for x in str(value).split(",")]
            node = data
            for p in parents:
                node = node[p]
            node[leaf] = value
    return from_dict(data)


def searched(params: dict) -> dict:
    """The searched entries of a trial's config (what MLflow and ``best.json`` record)."""
    return {k: params[k] for k in (*TUNED_FIELDS, *OPTIONAL_FIELDS) if k in params}


def tune_trial(config: dict, base: dict, parent_run_id: str) -> None:
    """One trial: a driver function that launches a distributed training run (Train V2 + Tune).

    ``config`` holds the sampled hyperparameters; ``base`` (the whole pipeline config) and the MLflow
    parent run come through ``tune.with_parameters`` so they stay out of the trial table. A trial Tune retries
    (``tune.max_failures``) finds its MLflow child run by its trial id and its Train run by name, so it
    continues from the last checkpoint in the same child run; worker deaths inside the trial are retried by
    Ray Train itself (``train.max_failures``), also from the last checkpoint.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydistill.workflows import train

    cfg = apply_params(from_dict(base), config)
    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(cfg.run_dir, "tune", "trials", trial_id)
    tracking.setup(cfg)
    existing = tracking.find_child_run(cfg, parent_run_id, "raydistill.trial_id", trial_id)
    active = tracking.resume_run(cfg, existing) if existing else tracking.start_run(
        cfg, run_name=f"trial-{trial_id}", parent_run_id=parent_run_id,
        tags={"raydistill.stage": "tune", "raydistill.trial_id": trial_id})
    with active as run:
        if not existing:
            tracking.log_params(searched(config))
        result = train.train_driver(
            cfg,
            run_name=f"trial-{trial_id}",
            storage_path=str(Path(cfg.run_dir, "tune", "ray").resolve()),
            callbacks=[TuneReportCallback()],
            steps=cfg.tune.steps,
            output_dir=str(trial_dir),
            mlflow_run_id=run.info.run_id,
            # a trial searching student.layers starts from its own initial student
            init_dir=str(train.prepare_student(cfg, trial_dir / "init")) if "student_layers" in config else None,
        )
        final = {k: v for k, v in (result.get("metrics") or {}).items() if isinstance(v, (int, float))}
        if final:
            tracking.log_metrics({f"final_{k}": float(v) for k, v in final.items()})


def choose_best(trials: list[dict], gate) -> tuple[dict | None, str]:
    """The trial with the lowest held-out loss among those passing the gate's absolute thresholds
    (``registry.gate``: max held-out loss, min top-1 agreement, max KL; a trial missing a metric the gate needs
    does not pass, as at promote), and a sentence saying how it was chosen.

    When no trial passes, the lowest held-out loss of all is best and the sentence says so. Failed trials
    (no metric) are never best.
    """
    scored = [t for t in trials if isinstance(t.get(METRIC), (int, float))]
    if not scored:
        return None, "no trial reported a held-out loss"
    passing = [t for t in scored if not gate_violations(t, gate)]
    pool = passing or scored
    best = min(pool, key=lambda t: t[METRIC])
    if passing:
        return best, f"lowest {METRIC} of the {len(passing)}/{len(scored)} trials passing the gate's thresholds"
    return best, (f"NO trial passes the gate's thresholds ({'; '.join(gate_violations(best, gate))} for the best): "
                  f"lowest {METRIC} of all {len(scored)} trials")


def gate_violations(metrics: dict, gate) -> list[str]:
    """The gate's absolute checks ``metrics`` fail, a missing metric included
    (:func:`raydistill.tasks.gate.violations`: promotion judges with the same function, so the best trial is one
    promotion would accept on the same numbers; the champion comparison is promote's). The generation check
    (``max_gen_teacher_nll``) is left to quantize and promote: trials do not score the gate's prompts."""
    if gate.max_gen_teacher_nll is not None:
        gate = dataclasses.replace(gate, max_gen_teacher_nll=None)
    return violations(metrics, gate)


def trial_rows(grid, steps: int) -> list[dict]:
    """One row per trial: its searched params, last held-out metrics, reports made and whether ASHA stopped it
    (its last report short of the ``steps`` budget, without an error).

    Stopped is read from the step, not from the reports Tune counted: a trial Tune retried (its driver died)
    starts counting again at its restart, though its Train run continues from its checkpoint."""
    rows = []
    for r in grid:
        m = r.metrics or {}
        reports = int(m.get("training_iteration") or 0)
        rows.append({"trial_id": m.get("trial_id") or getattr(r, "path", "").rsplit("/", 1)[-1],
                     "params": searched(r.config), METRIC: m.get(METRIC),
                     "top1_agreement": m.get("top1_agreement"), "kl_to_teacher": m.get("kl_to_teacher"),
                     "step": m.get("step"), "reports": reports,
                     "stopped": r.error is None and int(m.get("step") or 0) < steps,
                     "error": str(r.error) if r.error else None})
    return rows


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    cfg = resolve_paths(cfg)  # trials run in their own working directories
    started = stage.start(cfg, "tune", ray=True)
    if started.done:
        print(f"[tune] already done for these inputs: best {started.done['outputs']['params']}")
        return started.done["outputs"]
    key = started.key
    from raydistill.workflows import train

    if not cfg.tune.student_layers:
        train.prepare_student(cfg)  # the init student is built once; every trial loads it
    out_dir = Path(cfg.run_dir, "tune")
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking.setup(cfg)
    with tracking.start_run(cfg, run_name="tune", tags={"raydistill.stage": "tune",
                                                        "raydistill.stage_key": key}) as parent:
        tracking.log_params(tracking.flat_params(to_dict(cfg.tune), "tune."))
        grid = _fit(cfg, parent.info.run_id, out_dir)
        if grid.errors and len(grid.errors) == len(grid):
            raise RuntimeError(f"every tune trial failed; first error: {grid.errors[0]}")
        trials = trial_rows(grid, cfg.tune.steps)
        best, choice = choose_best(trials, cfg.registry.gate)
        if best is None:
            raise RuntimeError(f"tune: {choice}; see the trials in {out_dir / 'ray'}")
        params = best["params"]
        metrics = {k: best[k] for k in (METRIC, "top1_agreement", "kl_to_teacher", "step")
                   if isinstance(best.get(k), (int, float))}
        tracking.log_params({f"best.{k}": v for k, v in params.items()})
        tracking.log_metrics({f"best_{k}": float(v) for k, v in metrics.items()})
        parent_id = parent.info.run_id

    outputs = {"params": params, "metrics": metrics, "best_trial": best["trial_id"], "choice": choice,
               "trials": trials, "mlflow_parent_run_id": parent_id}
    atomic_write_json(out_dir / "best.json", outputs, default=str)
    stopped = sum(bool(t["stopped"]) for t in trials)
    print(f"[tune] {len(trials)} trials ({stopped} stopped by ASHA); best {params} → {METRIC}="
          f"{metrics.get(METRIC)} ({choice})")
    stage.record(cfg, "tune", key, outputs, paths=[out_dir / "best.json"])
    return outputs


def _fit(cfg: PipelineConfig, parent_run_id: str, out_dir: Path):
    """Run the search: ``tune.search`` with ASHA, at most ``tune.max_concurrent_trials`` at once."""
    max_t, grace_period = asha_limits(cfg)
    cpus_per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker
    fits = max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_trial)
    concurrent = cfg.tune.max_concurrent_trials or fits
    trainable = tune.with_parameters(tune_trial, base=to_dict(cfg), parent_run_id=parent_run_id)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0, "memory": 1e6}),
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, num_samples=cfg.tune.num_samples, search_alg=searcher(cfg),
            max_concurrent_trials=concurrent,
            scheduler=ASHAScheduler(max_t=max_t, grace_period=grace_period),
        ),
        run_config=tune.RunConfig(name="search", storage_path=str(out_dir.resolve() / "ray"), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures)),
    )
    _seed_search(cfg.tune.seed)
    return tuner.fit()


def _seed_search(seed: int) -> None:
    """Random search draws from Python's and numpy's RNG on the driver: seed both for repeatable trials."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
