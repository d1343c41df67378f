"""The training recipe around the objective: lr schedule, report steps, and the ONE step loop.

    python -m pytest tests/unit/test_trainloop.py

:func:`train_steps` runs optimizer steps over any *engine*: an object called like the model, with
``backward(loss)`` (scaled by 1/grad_accum), ``step()`` (applies the optimizer at the accumulation boundary),
``optimizer.param_groups`` (the loop sets the schedule's lr there) and ``get_global_grad_norm()``. The DeepSpeed
engine is one (Ray Train workers, ``workflows.train``); :class:`AdamWEngine` is the same surface over a plain
torch AdamW (benchmarks, unit tests). The loop is a generator: it yields after every step, so the caller decides
what happens between steps (logging, held-out eval, checkpoints, reports) without callbacks.

Report steps (:func:`report_steps`) are where a worker evaluates and reports to Ray Train; Tune counts the same
list for ASHA's ``max_t`` (``workflows.tune``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from raydistill.tasks.config import PipelineConfig, TrainConfig
from raydistill.tasks.device import module_device, to_device
from raydistill.tasks.objective import training_loss
from raydistill.tasks.online import OnlineTeacher
from raydistill.tasks.onpolicy import OnPolicy, is_on_policy, on_policy_batch


def lr_at(step: int, tc: TrainConfig, total: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine down to 10% of peak."""
    if step <= tc.warmup_steps:
        return tc.lr * step / max(1, tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    return tc.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def report_steps(tc: TrainConfig, steps: int) -> list[int]:
    """The steps at which workers report to Ray Train (held-out eval; a checkpoint rides on some of them).

    ``len(report_steps(...))`` is the number of results Tune sees per trial (ASHA's ``max_t`` counts them).
    """
    return [s for s in range(1, steps + 1) if s % tc.eval_every == 0 or checkpoint_step(tc, s, steps)]


def eval_window_budget(tc: TrainConfig, world: int) -> int:
    """Held-out windows per evaluation: ``train.eval_windows``, or about 10 % of the training compute between two
    evaluations — a step costs ~3 forwards (forward + backward) of its ``micro_batch_size × grad_accum × world``
    windows, an evaluation one forward per window: ``0.1 × 3 × eval_every × windows per step`` — and at least one
    micro-batch per worker."""
    if tc.eval_windows is not None:
        return tc.eval_windows
    per_step = tc.micro_batch_size * tc.grad_accum * world
    return max(tc.micro_batch_size * world, int(0.3 * tc.eval_every * per_step))


def checkpoint_step(tc: TrainConfig, step: int, total: int) -> bool:
    """Whether a checkpoint rides on the report of ``step`` (every ``checkpoint_every`` and the last step)."""
    return step % tc.checkpoint_every == 0 or step == total


def temperature_warning(cfg: PipelineConfig) -> str | None:
    """Why training at ``train.temperature`` from this ``sampled`` cache gives a worse student (None: it does not)."""
    c, tc = cfg.cache, cfg.train
    if not cfg.retempers_sampled_cache(tc.temperature):
        return None
    return (f"train.temperature={tc.temperature} but the sampled cache drew its targets at T={c.temperature}; "
            f"re-weighting {c.num_samples or 'the byte budget'} draws per position to another temperature is biased and loses the tail "
            f"(docs/cache-format.md): train at T={c.temperature} for the best student")


@dataclass
class StepSums:
    """Additive statistics of one optimizer step, summed over its micro-batches (then over ranks)."""

    total: float = 0.0
    """Sum of the micro-batches' objective values."""
    ce: float = 0.0
    """Sum of their cross-entropy terms."""
    kd: float = 0.0
    """Sum of their KD divergences."""
    hidden: float = 0.0
    """Sum of their hidden-state terms (0 without hidden matching)."""
    tokens: float = 0.0
    """Label tokens seen."""
    micro_batches: float = 0.0
    """Micro-batches summed (grad_accum × ranks after the all-reduce)."""

    def add(self, losses: dict[str, torch.Tensor], tokens: int) -> None:
        for k in ("total", "ce", "kd", "hidden"):
            setattr(self, k, getattr(self, k) + losses[k].item())
        self.tokens += tokens
        self.micro_batches += 1

    def all_reduce(self) -> StepSums:
        """The sums over all ranks (this one alone outside a process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        flat = torch.tensor(dataclasses.astuple(self), dtype=torch.float64)
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only (on this rank's current device)
            flat = flat.cuda()
        dist.all_reduce(flat)
        return StepSums(*flat.tolist())

    def means(self) -> dict[str, float]:
        """``loss`` (mean objective), ``ce``, ``kd``, ``hidden``: means per micro-batch."""
        n = max(1.0, self.micro_batches)
        return {"loss": self.total / n, "ce": self.ce / n, "kd": self.kd / n, "hidden": self.hidden / n}


@dataclass
class Step:
    """What :func:`train_steps` yields after each optimizer step."""

    step: int
    """1-based optimizer step just taken."""
    metrics: dict[str, float]
    """``loss``, ``ce``, ``kd``, ``lr``, ``grad_norm``, ``tokens_per_s`` (+ ``hidden`` with hidden matching)."""
    position: Any
    """Where the batch stream stands after this step (what a checkpoint stores to resume from)."""
    seconds: float
    """Wall time of the step on this rank."""
    window: dict[str, float] | None = None
    """At report steps: the mean of ``metrics`` over the steps since the previous report (None elsewhere)."""


def set_lr(engine, lr: float) -> None:
    """Set ``lr`` on every param group (DeepSpeed's ZeRO wrappers pass these through to the inner AdamW)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def train_steps(engine, batches: Iterator, tc: TrainConfig, *, total: int, start: int = 0,
                online: OnlineTeacher | None = None, on_policy: OnPolicy | None = None) -> Iterator[Step]:
    """Optimizer steps ``start+1 .. total`` of :func:`tasks.objective.training_loss` on ``engine``.

    Args:
        engine: see the module docstring (DeepSpeed engine or :class:`AdamWEngine`).
        batches: yields ``(Batch, position)`` per micro-batch (``tasks.data.train_batches``), already at the
            position of step ``start``; ``tc.grad_accum`` micro-batches make a step.
        tc: the objective's fields, the lr schedule, ``grad_accum``, ``eval_every``/``checkpoint_every``.
        online: the teacher run inside the step (None: the batches carry cached targets).
        on_policy: on the steps :func:`tasks.onpolicy.is_on_policy` picks, each micro-batch is replaced by the
            student's samples after its prefix, scored by this teacher (:func:`tasks.onpolicy.on_policy_batch`);
            the metrics then carry ``on_policy`` (1 on those steps, else 0).
    """
    hidden = online is not None and bool(online.layers)
    reports, window = set(report_steps(tc, total)), []
    device = module_device(engine)  # batches come from the CPU; the model may live on a GPU
    for step in range(start + 1, total + 1):
        t0 = time.perf_counter()
        lr = lr_at(step, tc, total)
        set_lr(engine, lr)
        sums = StepSums()
        own = on_policy is not None and is_on_policy(step, on_policy.opc)
        for micro in range(tc.grad_accum):
            batch, position = next(batches)
            batch = to_device(batch, device)
            if own:  # the student's own samples after the batch's prefixes, the teacher's targets on them
                batch = on_policy_batch(engine, batch, on_policy, tc, step, micro)
                losses = training_loss(engine, batch, on_policy.loss_config(tc), None)
            else:
                losses = training_loss(engine, batch, tc, online)
            engine.backward(losses["total"])
            engine.step()  # the optimizer runs at the accumulation boundary only
            sums.add(losses, batch.tokens)
        sums = sums.all_reduce()
        seconds = time.perf_counter() - t0
        grad_norm = engine.get_global_grad_norm()
        metrics = {**sums.means(), "lr": lr, "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                   "tokens_per_s": sums.tokens / seconds}
        if not hidden:
            del metrics["hidden"]
        if on_policy is not None:
            metrics["on_policy"] = float(own)
        window.append(metrics)
        mean = None
        if step in reports:
            mean, window = {k: sum(m[k] for m in window) / len(window) for k in metrics}, []
        yield Step(step, metrics, position, seconds, mean)


class AdamWEngine:
    """The engine surface of DeepSpeed over a plain ``torch.optim.AdamW`` (one process, no ZeRO).

    ``backward`` scales the loss by 1/grad_accum and ``step`` clips (``grad_clip`` > 0) and applies AdamW once
    every ``grad_accum`` calls, as DeepSpeed does with ``gradient_clipping`` and ``gradient_accumulation_steps``.
    """

    def __init__(self, module: torch.nn.Module, *, lr: float, weight_decay: float = 0.0, grad_clip: float = 0.0,
                 grad_accum: int = 1):
        self.module, self.grad_clip, self.grad_accum, self.micro_steps = module, grad_clip, grad_accum, 0
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                                           weight_decay=weight_decay)
        self._grad_norm: float | None = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        """Where the module's parameters are (inputs go there)."""
        return module_device(self.module)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self._grad_norm = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        """The gradient norm before clipping at the last optimizer step (None before the first)."""
        return self._grad_norm
