"""Train the student from the teacher cache: Ray Train (TorchTrainer, gloo) + DeepSpeed ZeRO per worker.

    raydistill train --config tiny train.steps=10 train.zero_stage=3
    raydistill train --config tiny train.teacher_mode=online train.hidden_loss=mse

Roles: ``prepare_student(cfg)`` (driver, once) loads the teacher, checks the student's tokenizer against it and
writes the initial student to ``<run_dir>/train/init``; ``train_driver(cfg, …)`` builds the ``TorchTrainer``;
``train_fn_per_worker(config)`` is the loop every worker runs. Workers stream the cache's windows
(:mod:`tasks.data`) and minimise :func:`tasks.online.training_loss`, ``α·CE + (1−α)·T²·KD``: with cached soft
targets (``train.teacher_mode: cache``), or with a teacher each worker loads once and runs on the same windows
(``online``; the only mode that adds ``hidden_weight·hidden``, with projection heads trained alongside).

Every report to Ray Train carries held-out metrics (``heldout_loss``, ``top1_agreement``, …: ASHA in
``workflows.tune`` needs them); a checkpoint (weights + each rank's AdamW moments as safetensors, each rank's
data position as JSON; no pickle) rides on the reports at ``checkpoint_every`` and on the last step. A run
that finds a checkpoint (a worker failure, or the same ``run_name`` rerun after an interrupt) continues from
its step; MLflow gets each step once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from raydistill.tasks.config import (ConfigError, PeftConfig, PipelineConfig, TrainConfig, from_dict, section_key,
                                     to_dict)
from raydistill.tasks.data import DataPosition, heldout_shards, train_batches
from raydistill.tasks.evaluate import evaluate_sums, finalize
from raydistill.tasks.online import online_teacher, resolve_layer_map, step_projections, training_loss
from raydistill.tasks.students import load_student, wrap_peft
from raydistill.workflows import checkpoint as ckpt

PRESET_DIR = Path(__file__).resolve().parent.parent / "cluster" / "deepspeed"
STEP_KEYS = ("loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s")  # + "hidden" with hidden-state matching


# ---------------------------------------------------------------------------------------------- driver side

def prepare_student(cfg: PipelineConfig) -> Path:
    """Build the initial student from the teacher once (``<run_dir>/train/init``); reused while the key holds.

    ``init_key.json`` also records both models' shapes and the copied teacher layers (:func:`init_info`).
    """
    from raydistill.tasks.students import write_init_student

    init_dir = Path(cfg.run_dir, "train", "init")
    spec = {k: v for k, v in to_dict(cfg.student).items() if k != "peft"}  # adapters are added per worker
    key = section_key(cfg, "teacher", extra={**spec, "seed": cfg.train.seed, "layout": 2})
    key_file = init_dir / "init_key.json"
    if key_file.exists() and json.loads(key_file.read_text()).get("key") == key:
        return init_dir
    tmp = init_dir.with_name(f".init.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    info = write_init_student(cfg.teacher, dataclasses.replace(cfg.student, peft=PeftConfig()), tmp,
                              seed=cfg.train.seed)
    (tmp / "init_key.json").write_text(json.dumps({"key": key, "info": info}))
    shutil.rmtree(init_dir, ignore_errors=True)
    os.replace(tmp, init_dir)
    return init_dir


def init_info(cfg: PipelineConfig, init_dir: Path) -> dict:
    """Shapes recorded by :func:`prepare_student`, plus the resolved hidden-state ``layer_map`` (pairs)."""
    info = json.loads((init_dir / "init_key.json").read_text())["info"]
    info["layer_map"] = [] if cfg.train.hidden_loss == "none" else resolve_layer_map(
        cfg.train.hidden_layer_map, copied=info["copied"], n_student=info["student"]["num_hidden_layers"],
        n_teacher=info["teacher"]["num_hidden_layers"])
    return info


def deepspeed_config(tc: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON (``train.deepspeed_config`` or the preset for ``zero_stage``) with sizes from ``tc``."""
    name = "zero3_offload" if tc.offload and tc.zero_stage == 3 else f"zero{tc.zero_stage}"
    path = Path(tc.deepspeed_config) if tc.deepspeed_config else PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: {path} does not exist")
    ds = json.loads(path.read_text())
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", tc.zero_stage) != tc.zero_stage:
        raise ConfigError(f"{path} sets ZeRO stage {zero['stage']} but train.zero_stage is {tc.zero_stage}")
    zero["stage"] = tc.zero_stage
    if tc.offload and "offload_optimizer" not in zero:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    ds.update(train_micro_batch_size_per_gpu=tc.micro_batch_size, gradient_accumulation_steps=tc.grad_accum,
              train_batch_size=tc.micro_batch_size * tc.grad_accum * world_size, gradient_clipping=tc.grad_clip,
              zero_force_ds_cpu_optimizer=False)
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()  # never on a CPU
    ds["bf16"], ds["fp16"] = {"enabled": bool(bf16 and ds.get("bf16", {}).get("enabled", True))}, {"enabled": False}
    return ds


def lr_at(step: int, tc: TrainConfig, total: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine down to 10% of peak."""
    if step <= tc.warmup_steps:
        return tc.lr * step / max(1, tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    return tc.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def report_steps(tc: TrainConfig, steps: int) -> list[int]:
    """The steps at which workers report to Ray Train (held-out eval; a checkpoint rides on some of them).

    ``len(report_steps(...))`` is the number of results Tune sees per trial (ASHA's ``max_t``).
    """
    return [s for s in range(1, steps + 1) if s % tc.eval_every == 0 or s % tc.checkpoint_every == 0 or s == steps]


def temperature_warning(cfg: PipelineConfig) -> str | None:
    """Why training at ``train.temperature`` from this ``sampled`` cache gives a worse student (None: it does not)."""
    c, tc = cfg.cache, cfg.train
    if not cfg.retempers_sampled_cache(tc.temperature):
        return None
    return (f"train.temperature={tc.temperature} but the sampled cache drew its targets at T={c.temperature}; "
            f"re-weighting {c.num_samples} draws per position to another temperature is biased and loses the tail "
            f"(docs/cache-format.md): train at T={c.temperature} for the best student")


def train_driver(cfg: PipelineConfig, *, run_name: str, storage_path: str, callbacks=(), steps: int | None = None,
                 output_dir: str | None = None, mlflow_run_id: str | None = None) -> dict:
    """Run distributed training; returns ``{"metrics", "student_dir", "metrics_path", "checkpoint", "steps"}``.

    Everything trial-specific is in ``cfg`` (Tune applies hyperparameters to ``cfg.train``); ``steps``
    overrides ``cfg.train.steps``; the student goes to ``output_dir`` (default ``<run_dir>/train``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raydistill.tasks.cache.manifest import check_compatible
    from raydistill.tasks.cache.shards import open_cache

    tc = cfg.train
    cache = open_cache(cfg.cache_dir)
    check_compatible(cache, cfg.teacher, cfg.cache, cfg.corpus)
    warning = temperature_warning(cfg)  # cfg.cache matches the cache's manifest (checked above)
    if warning:
        print(f"[train] warning: {warning}", flush=True)
    n_train = len(cache.shards("train"))
    if n_train < tc.num_workers:
        raise ConfigError(f"the cache has {n_train} train shards but train.num_workers={tc.num_workers}")
    init_dir = prepare_student(cfg)
    out = Path(output_dir or Path(cfg.run_dir, "train")).resolve()
    loop_config = {"cfg": to_dict(cfg), "steps": steps or tc.steps, "init_dir": str(init_dir.resolve()),
                   "output_dir": str(out), "tracking_uri": cfg.tracking_uri if mlflow_run_id else None,
                   "mlflow_run_id": mlflow_run_id, "layer_map": init_info(cfg, init_dir)["layer_map"]}
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_path, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        torch_config=TorchConfig(backend="gloo"),
    )
    result = trainer.fit()
    metrics = json.loads((out / "metrics.json").read_text())
    return {"metrics": metrics, "student_dir": str(out / "student"), "metrics_path": str(out / "metrics.json"),
            "checkpoint": result.checkpoint.path if result.checkpoint else None, "steps": metrics["step"]}


# ---------------------------------------------------------------------------------------------- worker side

def _log(message: str) -> None:
    """One progress line from a worker (plain stdout: Ray Train's print patch would emit it twice)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _fresh_student(init_dir: str, peft_cfg: PeftConfig, seed: int):
    torch.manual_seed(seed)  # adapter initialisation: identical on every worker
    return wrap_peft(load_student(init_dir).train(), peft_cfg)


def _evaluate(engine, cache, tc: TrainConfig, rank: int, world: int, vocab: int) -> dict:
    """Held-out metrics over all ranks. ZeRO-3 forwards are collective, so there every rank runs all shards."""
    split = tc.zero_stage != 3 and world > 1
    shards = heldout_shards(cache, rank=rank if split else 0, world_size=world if split else 1, vocab_size=vocab)
    max_windows = None if tc.eval_windows is None else (-(-tc.eval_windows // world) if split else tc.eval_windows)
    sums = evaluate_sums(engine.module, shards, max_windows=max_windows, batch_size=tc.micro_batch_size)
    if split:
        dist.all_reduce(sums)
    rename = {"tokens": "eval_tokens", "tokens_per_s": "eval_tokens_per_s"}  # keep training's tokens_per_s
    return {rename.get(k, k): v for k, v in finalize(sums).items()}


class _MlflowSink:
    """Per-step metrics to one MLflow run from rank 0; steps already logged (before a restart) are skipped."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.client, self.run_id, self.last = None, run_id, 0
        if uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(uri)
            self.last = max((m.step for m in self.client.get_metric_history(run_id, "loss")), default=0)

    def log(self, metrics: dict, step: int) -> None:
        if self.client is None or (step <= self.last and step > 0):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as e:  # metrics are a side channel: never fail training over them
            logging.getLogger(__name__).warning("MLflow logging failed at step %d: %s", step, e)


def train_fn_per_worker(config: dict) -> None:
    """One worker's loop: resume, stream micro-batches, KD loss, ZeRO step, eval/report/checkpoint, export."""
    import deepspeed
    import ray.train

    from raydistill.tasks.cache.shards import open_cache
    from raydistill.tasks.teacher import load_teacher

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # 90 s JIT build; only used for inference
    cfg = from_dict(config["cfg"])
    tc, total = cfg.train, int(config["steps"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc.cpus_per_worker)
    cache = open_cache(cfg.cache_dir)

    # resume: weights go into the module before DeepSpeed partitions it; AdamW moments after
    model = _fresh_student(config["init_dir"], cfg.student.peft, tc.seed)
    vocab = model.config.vocab_size
    online = heads = heads_opt = None
    if tc.teacher_mode == "online":  # loaded once per worker; frozen, outside DeepSpeed
        online = online_teacher(load_teacher(cfg.teacher)[0], model, tc, [tuple(p) for p in config["layer_map"]])
        heads = online.projections
    if heads is not None:  # replicated projections with their own AdamW (tasks.online.step_projections)
        heads_opt = torch.optim.AdamW(heads.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    start, position, state, optim = 0, DataPosition(), {}, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state, optim, position = ckpt.read_checkpoint(d, model, rank, tc.zero_stage)
            if heads is not None:
                ckpt.read_heads(d, heads, heads_opt)
        start = state["step"]
    metrics = state.get("metrics", {})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                                  weight_decay=tc.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(tc, world))
    if optim is not None:
        ckpt.load_optimizer_tensors(engine, optim)
    sink = _MlflowSink(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else _MlflowSink(None, None)
    if start == 0:
        init_metrics = _evaluate(engine, cache, tc, rank, world, vocab)
        sink.log({f"init_{k}": v for k, v in init_metrics.items()}, step=0)
        state["init"] = init_metrics
    if rank == 0:
        _log(f"[train] {'resuming at step ' + str(start) if start else 'starting'}: {total} steps, {world} workers, "
             f"ZeRO-{tc.zero_stage}, teacher {tc.teacher_mode}, loss {tc.loss}, alpha {tc.alpha}, T {tc.temperature}"
             + (f", hidden {tc.hidden_loss} x{tc.hidden_weight} on {config['layer_map']}" if heads else ""))

    stream = train_batches(cache, rank=rank, world_size=world, micro_batch_size=tc.micro_batch_size,
                           temperature=tc.temperature, seed=tc.seed, start=position, targets=online is None,
                           vocab_size=vocab)
    keys = STEP_KEYS + (("hidden",) if heads is not None else ())
    window, began, reports = [], time.perf_counter(), set(report_steps(tc, total))
    for step in range(start + 1, total + 1):
        t0 = time.perf_counter()
        lr = lr_at(step, tc, total)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(5, dtype=torch.float64)  # total, ce, kd, hidden, tokens
        for _ in range(tc.grad_accum):
            batch, position = next(stream)
            out = training_loss(engine, batch, tc, online)
            engine.backward(out["total"])  # also the projections' gradients (scaled by 1/grad_accum like the rest)
            engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
            sums += torch.tensor([out[k].item() for k in ("total", "ce", "kd", "hidden")] + [batch.tokens],
                                 dtype=torch.float64)
        if heads is not None:
            step_projections(heads, heads_opt, lr=lr, grad_clip=tc.grad_clip)
        dist.all_reduce(sums)
        seconds = time.perf_counter() - t0
        grad_norm = engine.get_global_grad_norm()
        n = tc.grad_accum * world
        step_metrics = {"loss": sums[0].item() / n, "ce": sums[1].item() / n, "kd": sums[2].item() / n, "lr": lr,
                        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "tokens_per_s": sums[4].item() / seconds}
        if heads is not None:
            step_metrics["hidden"] = sums[3].item() / n
        sink.log(step_metrics, step)
        window.append(step_metrics)
        if rank == 0:
            eta = (time.perf_counter() - began) / (step - start) * (total - step)
            hidden = f" hidden {step_metrics['hidden']:.4f}" if heads is not None else ""
            _log(f"[train] step {step}/{total} loss {step_metrics['loss']:.4f} (ce {step_metrics['ce']:.3f} "
                 f"kd {step_metrics['kd']:.4f}{hidden}) lr {lr:.2e} {step_metrics['tokens_per_s']:.0f} tok/s "
                 f"{seconds:.1f} s/step eta {int(eta // 60)}m{int(eta % 60):02d}s")

        save = step % tc.checkpoint_every == 0 or step == total
        if step in reports:  # every report carries held-out metrics (ASHA's metric)
            evaluation = _evaluate(engine, cache, tc, rank, world, vocab)
            metrics = {**{k: sum(m[k] for m in window) / len(window) for k in keys}, **evaluation, "step": step}
            window = []
            sink.log(evaluation, step)
            if rank == 0:
                _log(f"[train] eval step {step}: heldout_loss {evaluation['heldout_loss']:.4f} "
                     f"top1_agreement {evaluation['top1_agreement']:.3f}")
            extra = {"init": state.get("init"), "metrics": metrics}
            ckpt_dir = ckpt.write_checkpoint(engine, tc.zero_stage, rank, step, position, extra,
                                             heads=(heads, heads_opt) if heads is not None else None) if save else None
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if save else None)
            if ckpt_dir:
                shutil.rmtree(ckpt_dir, ignore_errors=True)

    ckpt.export_student(engine, tc.zero_stage, rank, config["output_dir"],
                        lambda: _fresh_student(config["init_dir"], cfg.student.peft, tc.seed), config["init_dir"],
                        {**metrics, "step": total, "init": state.get("init")})
    if rank == 0:
        _log(f"[train] student → {Path(config['output_dir']) / 'student'}")
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------- the verb

def stage_key(cfg: PipelineConfig) -> str:
    return section_key(cfg, "teacher", "corpus", "cache", "student", "train")


def run(cfg: PipelineConfig, args=None) -> dict:
    """``raydistill train``: train (or resume) the student; skipped when done for the same inputs."""
    from raydistill.cluster.ray_init import init_ray
    from raydistill.workflows import runinfo, tracking

    key = stage_key(cfg)
    done = runinfo.stage_done(cfg, "train", key)
    if done:
        print(f"[train] already done for these inputs: {done['outputs']['student_dir']}")
        return done["outputs"]
    runinfo.require_stage(cfg, "cache", "train")
    init_ray(cfg.cluster)
    train_dir = Path(cfg.run_dir, "train")
    train_dir.mkdir(parents=True, exist_ok=True)
    run_file = train_dir / "mlflow_run.json"  # an interrupted run continues in the same MLflow run
    previous = json.loads(run_file.read_text()) if run_file.exists() else {}
    tracking.setup(cfg)
    if previous.get("key") == key:
        active = tracking.mlflow.start_run(run_id=previous["run_id"])
    else:
        active = tracking.start_run(cfg, "train", tags={"raydistill.stage": "train", "raydistill.stage_key": key})
    with active as mlrun:
        run_file.write_text(json.dumps({"key": key, "run_id": mlrun.info.run_id}))
        tracking.mlflow.log_params(tracking.flat_params(to_dict(cfg.train), "train."))
        tracking.mlflow.log_params(tracking.flat_params(to_dict(cfg.student), "student."))
        result = train_driver(cfg, run_name=f"train-{key[:12]}", storage_path=str((train_dir / "ray").resolve()),
                              mlflow_run_id=mlrun.info.run_id)
        final = {f"final_{k}": float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))}
        tracking.mlflow.log_metrics(final)
    outputs = {**result, "mlflow_run_id": mlrun.info.run_id}
    runinfo.record_stage(cfg, "train", key, outputs, paths=[result["student_dir"]])
    m = result["metrics"]
    print(f"[train] done: heldout_loss {m['heldout_loss']:.4f} (init {m['init']['heldout_loss']:.4f}), "
          f"top1_agreement {m['top1_agreement']:.3f}; student → {result['student_dir']}")
    return outputs
