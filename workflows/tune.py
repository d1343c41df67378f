"""Search alpha, T, lr and the KD loss over one teacher cache with Ray Tune (ASHA).

    raydistill tune --config smollm2-shakespeare tune.num_samples=8 tune.steps=40

Train V2 pattern: every trial runs ``tune_trial`` (a driver function, no CPUs of its own) which builds a
``TorchTrainer`` through ``workflows.train.train_driver``; ``TuneReportCallback`` forwards the workers'
held-out evaluations to Tune so ASHA can stop weak trials early. Every trial reads the same cache and is an
MLflow child run of one parent run. The best trial's hyperparameters go to ``<run_dir>/tune/best.json``;
``pipeline`` trains the final student with them.
"""

from __future__ import annotations

from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from raydistill.tasks.config import PipelineConfig, from_dict, resolve_paths, to_dict
from raydistill.tasks.fileio import atomic_write_json
from raydistill.tasks.trainloop import report_steps
from raydistill.workflows import stage, tracking

METRIC, MODE = "heldout_loss", "min"
TUNED_FIELDS = ("alpha", "temperature", "lr", "loss")


def param_space(cfg: PipelineConfig) -> dict:
    t = cfg.tune
    return {
        "alpha": tune.choice(t.alpha),
        "temperature": tune.choice(t.temperature),
        "lr": tune.loguniform(*t.lr) if t.lr[0] < t.lr[1] else t.lr[0],
        "loss": tune.choice(t.loss),
    }


def asha_limits(cfg: PipelineConfig) -> tuple[int, int]:
    """ASHA's ``(max_t, grace_period)``, counted in results a trial reports: exactly the report steps train uses
    (every ``eval_every``, every ``checkpoint_every``, the last step; :func:`tasks.trainloop.report_steps`).

    ``max_t`` sits one past the last report: a trial that reaches its budget finishes on its own (a trial
    stopped by Tune at ``max_t`` would kill its Train run mid-export).
    """
    reports = len(report_steps(cfg.train, cfg.tune.steps))
    return reports + 1, min(cfg.tune.grace_period, reports)


def apply_params(cfg: PipelineConfig, params: dict) -> PipelineConfig:
    """A copy of ``cfg`` with the tuned fields of ``params`` set on ``cfg.train`` (validated again)."""
    data = to_dict(cfg)
    data["train"].update({k: params[k] for k in TUNED_FIELDS if k in params})
    return from_dict(data)


def tune_trial(config: dict, base: dict, parent_run_id: str) -> None:
    """One trial: a driver function that launches a distributed training run (Train V2 + Tune).

    ``config`` holds the sampled hyperparameters; ``base`` (the whole pipeline config) and the MLflow
    parent run come through ``tune.with_parameters`` so they stay out of the trial table.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydistill.workflows import train

    cfg = apply_params(from_dict(base), config)
    trial_id = tune.get_context().get_trial_id()
    tracking.setup(cfg)
    with tracking.start_run(cfg, run_name=f"trial-{trial_id}", parent_run_id=parent_run_id,
                            tags={"raydistill.stage": "tune", "raydistill.trial_id": trial_id}) as run:
        tracking.log_params({k: config[k] for k in TUNED_FIELDS})
        result = train.train_driver(
            cfg,
            run_name=f"trial-{trial_id}",
            storage_path=str(Path(cfg.run_dir, "tune", "ray").resolve()),
            callbacks=[TuneReportCallback()],
            steps=cfg.tune.steps,
            output_dir=str(Path(cfg.run_dir, "tune", "trials", trial_id)),
            mlflow_run_id=run.info.run_id,
        )
        final = {k: v for k, v in (result.get("metrics") or {}).items() if isinstance(v, (int, float))}
        if final:
            tracking.log_metrics({f"final_{k}": float(v) for k, v in final.items()})


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    cfg = resolve_paths(cfg)  # trials run in their own working directories
    started = stage.start(cfg, "tune", ray=True)
    if started.done:
        print(f"[tune] already done for these inputs: best {started.done['outputs']['params']}")
        return started.done["outputs"]
    key = started.key
    from raydistill.workflows import train

    train.prepare_student(cfg)  # the init student is built once; every trial loads it

    out_dir = Path(cfg.run_dir, "tune")
    out_dir.mkdir(parents=True, exist_ok=True)
    max_t, grace_period = asha_limits(cfg)
    cpus_per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker
    concurrent = max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_trial)

    tracking.setup(cfg)
    with tracking.start_run(cfg, run_name="tune", tags={"raydistill.stage": "tune",
                                                        "raydistill.stage_key": key}) as parent:
        tracking.log_params(tracking.flat_params(to_dict(cfg.tune), "tune."))
        trainable = tune.with_parameters(tune_trial, base=to_dict(cfg), parent_run_id=parent.info.run_id)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"CPU": 0, "memory": 1e6}),
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, num_samples=cfg.tune.num_samples,
                max_concurrent_trials=concurrent,
                scheduler=ASHAScheduler(max_t=max_t, grace_period=grace_period),
            ),
            run_config=tune.RunConfig(name="search", storage_path=str(out_dir.resolve() / "ray"), verbose=1),
        )
        _seed_search(cfg.tune.seed)
        grid = tuner.fit()
        if grid.errors and len(grid.errors) == len(grid):
            raise RuntimeError(f"every tune trial failed; first error: {grid.errors[0]}")
        best = grid.get_best_result(metric=METRIC, mode=MODE)
        params = {k: best.config[k] for k in TUNED_FIELDS}
        metrics = {k: v for k, v in (best.metrics or {}).items()
                   if k in (METRIC, "top1_agreement", "ce", "kd", "step") and isinstance(v, (int, float))}
        trials = [{"params": {k: r.config[k] for k in TUNED_FIELDS},
                   METRIC: (r.metrics or {}).get(METRIC), "error": str(r.error) if r.error else None}
                  for r in grid]
        tracking.log_params({f"best.{k}": v for k, v in params.items()})
        tracking.log_metrics({f"best_{k}": float(v) for k, v in metrics.items()})
        parent_id = parent.info.run_id

    outputs = {"params": params, "metrics": metrics, "trials": trials, "mlflow_parent_run_id": parent_id}
    atomic_write_json(out_dir / "best.json", outputs, default=str)
    print(f"[tune] {len(trials)} trials; best {params} → {METRIC}={metrics.get(METRIC)}")
    stage.record(cfg, "tune", key, outputs, paths=[out_dir / "best.json"])
    return outputs


def _seed_search(seed: int) -> None:
    """Random search draws from Python's and numpy's RNG on the driver: seed both for repeatable trials."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
