"""Train the student from the teacher cache: Ray Train (TorchTrainer; NCCL on GPUs, gloo on CPUs) + DeepSpeed ZeRO
per worker.

    raydistill train --config tiny train.steps=10 train.zero_stage=3
    raydistill train --config tiny train.teacher_mode=online train.hidden_loss=mse

Roles: ``prepare_student(cfg)`` (driver, once) loads the teacher, checks the student's tokenizer against it and
writes the initial student to ``<run_dir>/train/init``; ``train_driver(cfg, …)`` builds the ``TorchTrainer``;
``train_fn_per_worker(config)`` is the loop every worker runs. Workers stream the cache's windows
(:mod:`tasks.data`) through the shared step loop (:func:`tasks.trainloop.train_steps` on the DeepSpeed engine)
and minimise :func:`tasks.objective.training_loss`, ``α·CE + (1−α)·T²·KD``: with cached soft targets
(``train.teacher_mode: cache``), or with a teacher each worker loads once and runs on the same windows
(``online``; the only mode that adds ``hidden_weight·hidden``). DeepSpeed owns the student and its projection
heads as one module (:class:`tasks.online.StudentWithHeads`): one optimizer, one checkpoint; the export writes
only the student.

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
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from raydistill.tasks.config import (ConfigError, PeftConfig, PipelineConfig, TrainConfig, from_dict, section_key,
                                     to_dict)
from raydistill.tasks.data import DataPosition, heldout_shards, train_batches
from raydistill.tasks.device import DeviceError, resolve_device, resolve_dtype
from raydistill.tasks.evaluate import evaluate_sums, finalize
from raydistill.tasks.fileio import atomic_write_json
from raydistill.tasks.online import StudentWithHeads, online_teacher, resolve_layer_map, student_with_heads
from raydistill.tasks.students import load_student, wrap_peft
from raydistill.tasks.trainloop import Step, checkpoint_step, eval_window_budget, temperature_warning, train_steps
from raydistill.workflows import checkpoint as ckpt

PRESET_DIR = Path(__file__).resolve().parent.parent / "cluster" / "deepspeed"


# ---------------------------------------------------------------------------------------------- driver side

def prepare_student(cfg: PipelineConfig, init_dir: str | Path | None = None) -> Path:
    """Build the initial student from the teacher once (``init_dir``, default ``<run_dir>/train/init``; a Tune
    trial searching ``student.layers`` has its own); reused while the key holds.

    With ``train.init_from`` its weights are those of the resolved version or directory
    (:func:`workflows.continual.resolve`). ``init_key.json`` also records both models' shapes, the copied teacher
    layers (:func:`init_info`) and ``init_from`` (where the weights came from, or null).
    """
    from raydistill.tasks.fileio import replace_dir
    from raydistill.tasks.students import write_init_student
    from raydistill.workflows.continual import resolve

    init_dir = Path(init_dir or Path(cfg.run_dir, "train", "init"))
    spec = {k: v for k, v in to_dict(cfg.student).items() if k != "peft"}  # adapters are added per worker
    warm = resolve(cfg)  # train.init_from: None, or the weights the student starts from (weights_sha256 keys them)
    warm_key = warm and {k: warm.get(k) for k in ("source", "version", "weights_sha256")}
    key = section_key(cfg, "teacher", extra={**spec, "seed": cfg.train.seed, "layout": 2, "init_from": warm_key})
    key_file = init_dir / "init_key.json"
    if key_file.exists() and json.loads(key_file.read_text()).get("key") == key:
        return init_dir
    with replace_dir(init_dir) as tmp:
        info = write_init_student(cfg.teacher, dataclasses.replace(cfg.student, peft=PeftConfig()), tmp,
                                  seed=cfg.train.seed, init_from=warm and warm["dir"])
        (tmp / "init_key.json").write_text(json.dumps({"key": key, "info": {**info, "init_from": warm}}))
    return init_dir


def init_info(cfg: PipelineConfig, init_dir: Path) -> dict:
    """Shapes recorded by :func:`prepare_student`, plus the resolved hidden-state ``layer_map`` (pairs)."""
    info = json.loads((init_dir / "init_key.json").read_text())["info"]
    info["layer_map"] = [] if cfg.train.hidden_loss == "none" else resolve_layer_map(
        cfg.train.hidden_layer_map, copied=info["copied"], n_student=info["student"]["num_hidden_layers"],
        n_teacher=info["teacher"]["num_hidden_layers"])
    return info


def deepspeed_config(tc: TrainConfig, world_size: int, device: str = "cpu") -> dict:
    """The DeepSpeed JSON (``train.deepspeed_config`` or the preset for ``zero_stage``) with sizes from ``tc`` and
    the precision of ``train.dtype`` on ``device`` (``bf16.enabled``; fp16 is never used: it needs loss scaling).
    A JSON whose own ``bf16``/``fp16`` switch says otherwise is a :class:`ConfigError` (one truth: ``train.dtype``).
    """
    name = "zero3_offload" if tc.offload and tc.zero_stage == 3 else f"zero{tc.zero_stage}"
    path = Path(tc.deepspeed_config) if tc.deepspeed_config else PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: {path} does not exist")
    ds = json.loads(path.read_text())
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", tc.zero_stage) != tc.zero_stage:
        raise ConfigError(f"{path} sets ZeRO stage {zero['stage']} but train.zero_stage is {tc.zero_stage}")
    zero["stage"] = tc.zero_stage
    # DeepSpeed's ZeRO-3 "memory efficient linear" replaces torch.nn.functional.linear for the whole process and
    # never restores it; torchao's quantized tensors (quantize methods, warm starts) registered against the real
    # one then fail in that process. Off unless the JSON turns it on.
    zero.setdefault("memory_efficient_linear", False)
    if tc.offload and "offload_optimizer" not in zero:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    ds.update(train_micro_batch_size_per_gpu=tc.micro_batch_size, gradient_accumulation_steps=tc.grad_accum,
              train_batch_size=tc.micro_batch_size * tc.grad_accum * world_size, gradient_clipping=tc.grad_clip,
              zero_force_ds_cpu_optimizer=False)
    dtype = resolve_dtype(tc.dtype, device, "train.dtype")
    if dtype == "bfloat16" and device != "cuda":
        raise DeviceError("train.dtype=bfloat16 needs the workers on CUDA (cluster.device); on CPU use "
                          "train.dtype=auto or float32")
    want = {"bf16": dtype == "bfloat16", "fp16": False}
    for name, on in want.items():
        if ds.get(name, {}).get("enabled", on) != on:
            raise ConfigError(f"{path} sets {name}.enabled={ds[name]['enabled']} but train.dtype={tc.dtype} gives "
                              f"{name}.enabled={on} on {device}: drop {name!r} from the JSON (train.dtype sets it)")
        ds[name] = {**ds.get(name, {}), "enabled": on}
    return ds


def scaling(tc: TrainConfig, device: str, spread: bool = False) -> tuple:
    """``(ScalingConfig, TorchConfig)`` of the workers: one GPU each and NCCL on CUDA, gloo on CPU; ``spread``
    places them on different nodes where possible (``cluster.spread``)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    gpu = device == "cuda"
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    return (ScalingConfig(num_workers=tc.num_workers, use_gpu=gpu, resources_per_worker=resources,
                          placement_strategy="SPREAD" if spread else "PACK"),
            TorchConfig(backend="nccl" if gpu else "gloo"))


def train_driver(cfg: PipelineConfig, *, run_name: str, storage_path: str, callbacks=(), steps: int | None = None,
                 output_dir: str | None = None, mlflow_run_id: str | None = None, init_dir: str | None = None,
                 qad: dict | None = None) -> dict:
    """Run distributed training; returns ``{"metrics", "student_dir", "metrics_path", "checkpoint", "steps"}``.

    Everything trial-specific is in ``cfg`` (Tune applies hyperparameters to ``cfg.train``); ``steps``
    overrides ``cfg.train.steps``; the student goes to ``output_dir`` (default ``<run_dir>/train``).
    ``init_dir`` starts from that student instead of the teacher-built one; ``qad`` (``{"bits", "group_size"}``)
    fake-quantizes its linear layers (quantization-aware distillation, :func:`qad_train`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raydistill.cluster.ray_init import cluster_device
    from raydistill.tasks.cache.manifest import check_compatible
    from raydistill.tasks.cache.shards import config_cache

    tc = cfg.train
    cache = config_cache(cfg)
    check_compatible(cache, cfg.teacher, cfg.cache, cfg.corpus)
    warning = temperature_warning(cfg)  # cfg.cache matches the cache's manifest (checked above)
    if warning:
        print(f"[train] warning: {warning}", flush=True)
    n_train = len(cache.shards("train"))
    if n_train < tc.num_workers:
        raise ConfigError(f"the cache has {n_train} train shards but train.num_workers={tc.num_workers}")
    init_dir = Path(init_dir) if init_dir else prepare_student(cfg)
    # a directory prepare_student built (the run's or a Tune trial's own) says which teacher layers map to which
    # student layers; a trained student handed in to continue from (QAD) has no hidden-state heads to train
    built = (init_dir / "init_key.json").exists()
    info = init_info(cfg, init_dir) if built else {"layer_map": []}
    out = Path(output_dir or Path(cfg.run_dir, "train")).resolve()
    device = cluster_device(cfg.cluster)
    scaling_config, torch_config = scaling(tc, device, cfg.cluster.spread)
    loop_config = {"cfg": to_dict(cfg), "steps": steps or tc.steps, "init_dir": str(init_dir.resolve()),
                   "cache": cache.location,  # the workers open this very cache (no teacher hashing per worker)
                   "device": device,
                   "output_dir": str(out), "tracking_uri": cfg.tracking_uri if mlflow_run_id else None,
                   "mlflow_run_id": mlflow_run_id, "layer_map": info["layer_map"], "qad": qad}
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config,
        run_config=RunConfig(name=run_name, storage_path=storage_path, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        torch_config=torch_config,
    )
    result = trainer.fit()
    metrics = json.loads((out / "metrics.json").read_text())
    return {"metrics": metrics, "student_dir": str(out / "student"), "metrics_path": str(out / "metrics.json"),
            "checkpoint": result.checkpoint.path if result.checkpoint else None, "steps": metrics["step"],
            "init_from": info.get("init_from")}


# ---------------------------------------------------------------------------------------------- worker side

def _log(message: str) -> None:
    """One progress line from a worker (plain stdout: Ray Train's print patch would emit it twice)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _student(config: dict, cfg: PipelineConfig, teacher_dim: int | None) -> StudentWithHeads:
    """The initial student (PEFT adapters seeded alike on every worker) with its projection heads, if any."""
    torch.manual_seed(cfg.train.seed)
    student = wrap_peft(load_student(config["init_dir"]).train(), cfg.student.peft)
    if config.get("qad"):  # same parameters, fake-quantized forward (straight-through gradients)
        from raydistill.tasks.quantize import fake_quantize_model

        fake_quantize_model(student, config["qad"]["bits"], config["qad"]["group_size"])
    if teacher_dim is None:
        return StudentWithHeads(student)
    return student_with_heads(student, cfg.train, [tuple(p) for p in config["layer_map"]], teacher_dim)


def _evaluate(engine, cache, tc: TrainConfig, rank: int, world: int, generation=None) -> dict:
    """Held-out metrics over all ranks. ZeRO-3 forwards are collective, so there every rank runs all shards.
    ``generation``: ``(OnPolicy, prompts)`` adds the teacher-scored metrics of the student's greedy answers."""
    split = tc.zero_stage != 3 and world > 1
    vocab = engine.module.student.config.vocab_size
    budget = eval_window_budget(tc, world)
    shards = heldout_shards(cache, rank=rank if split else 0, world_size=world if split else 1, vocab_size=vocab,
                            max_windows=budget)
    max_windows = -(-budget // world) if split else budget
    sums = evaluate_sums(engine.module, shards, max_windows=max_windows, batch_size=tc.micro_batch_size,
                         device=engine.device)
    if split:  # NCCL reduces device tensors only
        sums = sums.to(engine.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    rename = {"tokens": "eval_tokens", "tokens_per_s": "eval_tokens_per_s"}  # keep training's tokens_per_s
    out = {rename.get(k, k): v for k, v in finalize(sums).items()}
    if generation is not None:  # every rank the same prompts: under ZeRO-3 each forward is a collective
        out.update(_generation_metrics(engine, *generation))
    return out


def _progress(s: Step, total: int, start: int, began: float) -> str:
    m = s.metrics
    eta = (time.perf_counter() - began) / (s.step - start) * (total - s.step)
    hidden = f" hidden {m['hidden']:.4f}" if "hidden" in m else ""
    hidden += " on-policy: KD only" if m.get("on_policy") else ""
    return (f"[train] step {s.step}/{total} loss {m['loss']:.4f} (ce {m['ce']:.3f} kd {m['kd']:.4f}{hidden}) "
            f"lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s {s.seconds:.1f} s/step eta {int(eta // 60)}m"
            f"{int(eta % 60):02d}s")


def _report(engine, s: Step, *, cfg: PipelineConfig, cache, rank: int, world: int, total: int, init: dict,
            sink, generation=None) -> dict:
    """At a report step: held-out eval (every report carries it: ASHA's metric), then the report to Ray Train,
    with a checkpoint at ``checkpoint_every`` and at the last step. Returns the reported metrics."""
    import ray.train

    tc = cfg.train
    evaluation = _evaluate(engine, cache, tc, rank, world, generation)
    metrics = {**s.window, **evaluation, "step": s.step}
    sink.log(evaluation, s.step)
    if rank == 0:
        gen = f" gen_teacher_nll {evaluation['gen_teacher_nll']:.4f}" if "gen_teacher_nll" in evaluation else ""
        _log(f"[train] eval step {s.step}: heldout_loss {evaluation['heldout_loss']:.4f} "
             f"top1_agreement {evaluation['top1_agreement']:.3f}{gen}")
    if not checkpoint_step(tc, s.step, total):
        ray.train.report(metrics)
        return metrics
    extra = {"init": init, "metrics": metrics}
    ckpt_dir = ckpt.write_checkpoint(engine, tc.zero_stage, rank, s.step, s.position, extra)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics


def _engine(model: StudentWithHeads, tc: TrainConfig, rank: int, world: int, checkpoint, device: str) -> tuple:
    """``(DeepSpeed engine over model, checkpoint state, data position)``, resumed from ``checkpoint`` if any:
    weights (heads included) go into the module before DeepSpeed partitions it, AdamW moments after."""
    import deepspeed

    state, optim, position = {"step": 0}, None, DataPosition()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state, optim, position = ckpt.read_checkpoint(d, model, rank, tc.zero_stage)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                                  weight_decay=tc.weight_decay)  # one AdamW: the student and its heads
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(tc, world, device))
    if optim is not None:
        ckpt.load_optimizer_tensors(engine, optim)
    return engine, state, position


def _metric_sink(config: dict):
    """Rank 0's per-step MLflow sink; the other ranks get a sink that drops everything without importing MLflow."""
    if not (config.get("tracking_uri") and config.get("mlflow_run_id")):
        return SimpleNamespace(log=lambda metrics, step: None)
    from raydistill.workflows.tracking import MetricSink

    return MetricSink(config["tracking_uri"], config["mlflow_run_id"])


def _on_policy(cfg: PipelineConfig, online, cache, device, rank: int) -> tuple:
    """``(OnPolicy, (OnPolicy, held-out prompts))`` for ``train.on_policy`` (``(None, None)`` when off): the teacher
    is the online one, or loaded here once (frozen, outside DeepSpeed); the prompts, the same on every rank, are
    the first ``eval_prompts`` held-out windows' prefixes (``None`` when 0)."""
    from raydistill.tasks.generate import eos_ids
    from raydistill.tasks.onpolicy import OnPolicy, generation_prompts
    from raydistill.tasks.teacher import load_teacher, load_tokenizer

    opc = cfg.train.on_policy
    if opc.fraction == 0:
        return None, None
    teacher = online.model if online else load_teacher(cfg.teacher, device)[0].requires_grad_(False)
    op = OnPolicy(teacher, opc, eos_ids(teacher, load_tokenizer(cfg.teacher)), cfg.train.seed, rank)
    if not opc.eval_prompts:
        return op, None
    prompts = generation_prompts(heldout_shards(cache), opc.eval_prompts, opc.prompt_tokens)
    return op, (op, [p.to(device) for p in prompts])


def _generation_metrics(engine, op, prompts: list) -> dict:
    from raydistill.tasks.evaluate import generation_scores

    return generation_scores(engine, op.teacher, prompts, max_new_tokens=op.opc.max_new_tokens, eos=op.eos,
                             batch_size=len(prompts))


def train_fn_per_worker(config: dict) -> None:
    """One worker: build the student (+ heads) and teacher, resume, run the shared step loop, export."""
    if config.get("device", "cpu") == "cpu":  # DeepSpeed would pick CUDA wherever it sees a GPU
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch

    from raydistill.tasks.cache.shards import open_cache
    from raydistill.tasks.teacher import load_teacher

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # 90 s JIT build; only used for inference
    cfg = from_dict(config["cfg"])
    tc, total = cfg.train, int(config["steps"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc.cpus_per_worker)
    device = resolve_device(config.get("device", "cpu"))  # DeviceError: planned cuda, but none here
    if device.type == "cuda":  # Ray Train's GPU for this worker (its local rank's), where DeepSpeed puts the model
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    cache = open_cache(config["cache"])
    online = None
    if tc.teacher_mode == "online":  # loaded once per worker; frozen, outside DeepSpeed
        online = online_teacher(load_teacher(cfg.teacher, device)[0], tc, [tuple(p) for p in config["layer_map"]])
    on_policy, generation = _on_policy(cfg, online, cache, device, rank)
    model = _student(config, cfg, online.model.config.hidden_size if online else None)
    engine, state, position = _engine(model, tc, rank, world, ray.train.get_checkpoint(), device.type)

    start, metrics = state["step"], state.get("metrics", {})
    sink = _metric_sink(config if rank == 0 else {})
    if start == 0:
        state["init"] = _evaluate(engine, cache, tc, rank, world, generation)
        sink.log({f"init_{k}": v for k, v in state["init"].items()}, step=0)
    if rank == 0:
        _log(f"[train] {'resuming at step ' + str(start) if start else 'starting'}: {total} steps, {world} workers, "
             f"ZeRO-{tc.zero_stage}, teacher {tc.teacher_mode}, loss {tc.loss}, alpha {tc.alpha}, T {tc.temperature}"
             + (f", hidden {tc.hidden_loss} x{tc.hidden_weight} on {config['layer_map']}" if model.layers else "")
             + (f", on-policy {tc.on_policy.fraction:g} of steps after {tc.on_policy.start_step}" if on_policy else ""))
    stream = train_batches(cache, rank=rank, world_size=world, micro_batch_size=tc.micro_batch_size,
                           temperature=tc.temperature, seed=tc.seed, start=position, targets=online is None,
                           vocab_size=model.student.config.vocab_size)
    began = time.perf_counter()
    for s in train_steps(engine, stream, tc, total=total, start=start, online=online, on_policy=on_policy):
        sink.log(s.metrics, s.step)
        if rank == 0:
            _log(_progress(s, total, start, began))
        if s.window is not None:
            metrics = _report(engine, s, cfg=cfg, cache=cache, rank=rank, world=world, total=total,
                              init=state.get("init"), sink=sink, generation=generation)

    fresh = lambda: _student(config, cfg, None).student  # noqa: E731  (the exported structure: no heads)
    nodes = [ray.get_runtime_context().get_node_id()] * world  # each rank's Ray node, for the stage record
    if dist.is_initialized():
        dist.all_gather_object(nodes, nodes[0])
    ckpt.export_student(engine, tc.zero_stage, rank, config["output_dir"], fresh, config["init_dir"],
                        {**metrics, "step": total, "init": state.get("init"), "worker_nodes": nodes})
    if rank == 0:
        _log(f"[train] student → {Path(config['output_dir']) / 'student'}")
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------- the verb

def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """``raydistill train``: train (or resume) the student; skipped when done for the same inputs."""
    from raydistill.workflows import stage, tracking

    started = stage.start(cfg, "train", ray=True)
    if started.done:
        print(f"[train] already done for these inputs: {started.done['outputs']['student_dir']}")
        return started.done["outputs"]
    key = started.key
    train_dir = Path(cfg.run_dir, "train")
    train_dir.mkdir(parents=True, exist_ok=True)
    run_file = train_dir / "mlflow_run.json"  # an interrupted run continues in the same MLflow run
    previous = json.loads(run_file.read_text()) if run_file.exists() else {}
    if previous.get("key") == key:
        active = tracking.resume_run(cfg, previous["run_id"])
    else:
        active = tracking.start_run(cfg, "train", tags={"raydistill.stage": "train", "raydistill.stage_key": key})
    with active as mlrun:
        atomic_write_json(run_file, {"key": key, "run_id": mlrun.info.run_id})
        tracking.log_params(tracking.flat_params(to_dict(cfg.train), "train."))
        tracking.log_params(tracking.flat_params(to_dict(cfg.student), "student."))
        result = train_driver(cfg, run_name=f"train-{key[:12]}", storage_path=str((train_dir / "ray").resolve()),
                              mlflow_run_id=mlrun.info.run_id)
        final = {f"final_{k}": float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))}
        tracking.log_metrics(final)
    outputs = {**result, "mlflow_run_id": mlrun.info.run_id}
    stage.record(cfg, "train", key, outputs, paths=[result["student_dir"]])
    m = result["metrics"]
    print(f"[train] done: heldout_loss {m['heldout_loss']:.4f} (init {m['init']['heldout_loss']:.4f}), "
          f"top1_agreement {m['top1_agreement']:.3f}; student → {result['student_dir']}")
    return outputs
