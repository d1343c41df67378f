"""The teacher online: dense KD targets and hidden states computed inside training; the per-micro-batch objective.

    python -m pytest tests/unit/test_online.py

``train.teacher_mode: online``: every worker loads the teacher once (eval mode, frozen) and, for each
micro-batch — the same windows, in the same order, as cache mode reads from the cache's shards — runs it under
``torch.inference_mode`` for its full softmax at temperature T (:func:`teacher_outputs`, a ``DenseTargets``).
Teacher logit rows past the student's are cut off and the rest renormalised (the teacher distribution
conditioned on the ids the student has; see :mod:`tasks.data`); student rows past the teacher's get teacher
mass 0 in :func:`tasks.losses.distillation_loss`.

Hidden-state matching (``train.hidden_loss``: ``mse`` | ``cosine``, online only): for each
``[student_layer, teacher_layer]`` pair (:func:`resolve_layer_map`) a ``Linear(D_s → D_t)`` projection
(identity when the widths are equal; :func:`make_projections`) maps the student layer's output onto the teacher
layer's. Layer outputs are taken with forward hooks on the decoder blocks (:func:`capture_layer_outputs`): the
residual stream *before* the final norm for every layer. (``output_hidden_states=True`` would give the same
tensors except for the last layer, which Hugging Face replaces by the final-norm output — a student's last layer
would then be compared post-norm against a teacher middle layer pre-norm.) The projections are replicated on
every worker, outside DeepSpeed (a few D_s×D_t matrices): :func:`step_projections` averages their gradients
over ranks and applies their AdamW step. They are training-only: checkpointed with the optimizer state,
never exported.

:func:`training_loss` is the one objective every path uses: cache mode, online mode, the benchmark.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from raydistill.tasks.config import ConfigError, TrainConfig
from raydistill.tasks.losses import distillation_loss, hidden_state_loss
from raydistill.tasks.students import forward_logits
from raydistill.tasks.cache.targets import DenseTargets


def resolve_layer_map(layer_map: list[list[int]] | None, *, copied: list[int] | None, n_student: int,
                      n_teacher: int) -> list[tuple[int, int]]:
    """``[(student_layer, teacher_layer), …]`` with negative indices resolved and ranges checked.

    Args:
        layer_map: ``train.hidden_layer_map`` (None: the default below).
        copied: for a layer-subset student, the teacher layer each student layer was copied from (default map:
            student layer i ↔ ``copied[i]``); None for ``init: config`` (default: student layer i of n ↔ teacher
            layer ⌈(i+1)·m/n⌉−1 of m).
        n_student, n_teacher: decoder layers of each model.
    """
    if layer_map is None:
        if copied is not None:
            return list(enumerate(copied))
        return [(i, math.ceil((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]
    out = []
    for s, t in layer_map:
        for name, i, n in (("student", s, n_student), ("teacher", t, n_teacher)):
            if not -n <= i < n:
                raise ConfigError(f"train.hidden_layer_map: {name} layer {i} does not exist (the {name} has {n} "
                                  f"layers: valid indices are {-n}..{n - 1})")
        out.append((s % n_student, t % n_teacher))
    return out


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks (``….layers`` ModuleList) of a causal LM, also inside PEFT / DeepSpeed wrappers."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] == "layers":
            return module
    raise ValueError(f"{type(model).__name__} has no decoder-layer list (a ModuleList named 'layers')")


@contextlib.contextmanager
def capture_layer_outputs(model: torch.nn.Module, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record, during forwards inside the block, the output of each decoder layer in ``layers``.

    Yields a dict ``layer index → (B, L', D)`` output (L' includes any virtual tokens prompt tuning prepends),
    filled by the forward; the hooks are removed on exit. ``layers`` empty: nothing is hooked.
    """
    states: dict[int, torch.Tensor] = {}
    if not layers:
        yield states
        return
    blocks = decoder_layers(model)

    def hook(i):
        def record(module, args, output):
            states[i] = output[0] if isinstance(output, tuple) else output
        return record

    handles = [blocks[i].register_forward_hook(hook(i)) for i in sorted(set(layers))]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def make_projections(n_pairs: int, student_dim: int, teacher_dim: int, *, seed: int = 0) -> torch.nn.ModuleList:
    """``n_pairs`` bias-free ``Linear(student_dim → teacher_dim)``: identity when the dims are equal, else a seeded
    default init (the same on every worker)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = torch.nn.ModuleList(torch.nn.Linear(student_dim, teacher_dim, bias=False) for _ in range(n_pairs))
    if student_dim == teacher_dim:
        with torch.no_grad():
            for h in heads:
                h.weight.copy_(torch.eye(teacher_dim))
    return heads


def teacher_outputs(teacher: torch.nn.Module, input_ids: torch.Tensor, *, temperature: float,
                    vocab_size: int | None = None, layers: list[int] = ()) -> tuple[DenseTargets, list[torch.Tensor]]:
    """The teacher's distribution at ``temperature`` and the outputs of its decoder ``layers``, without autograd.

    Args:
        teacher: a causal LM in eval mode.
        input_ids (torch.Tensor): ``(B, L)``.
        vocab_size: the student's logit rows; teacher rows past it are cut and the rest renormalised.
        layers: teacher layers whose outputs to return (in this order, repeats allowed).
    Returns:
        ``(DenseTargets(logprobs (B, L, min(V_t, vocab_size))), [(B, L, D_t) per entry of layers])``; ordinary
        (not inference-mode) tensors, so autograd may save them.
    """
    with torch.inference_mode(), capture_layer_outputs(teacher, list(layers)) as states:
        logits = teacher(input_ids=input_ids, use_cache=False).logits
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return DenseTargets(logprobs.clone()), [states[i].clone() for i in layers]


@dataclass
class OnlineTeacher:
    """What online training carries besides the student: the frozen teacher, and for hidden-state matching the
    resolved layer pairs and their projections (``layer_map`` empty, ``projections`` None: no hidden term)."""

    model: torch.nn.Module
    layer_map: list[tuple[int, int]]
    projections: torch.nn.ModuleList | None = None


def online_teacher(teacher: torch.nn.Module, student: torch.nn.Module, tc: TrainConfig,
                   layer_map: list[tuple[int, int]]) -> OnlineTeacher:
    """Freeze ``teacher``; with ``tc.hidden_loss`` on, build one projection per pair of ``layer_map``."""
    teacher.eval().requires_grad_(False)
    if tc.hidden_loss == "none":
        return OnlineTeacher(teacher, [])
    heads = make_projections(len(layer_map), student.config.hidden_size, teacher.config.hidden_size, seed=tc.seed)
    return OnlineTeacher(teacher, list(layer_map), heads)


def training_loss(model, batch, tc: TrainConfig, online: OnlineTeacher | None = None) -> dict[str, torch.Tensor]:
    """The objective of one micro-batch: ``α·CE + (1−α)·T²·KD [+ hidden_weight·hidden]``.

    Args:
        model: the student (plain, PEFT or a DeepSpeed engine).
        batch: ``tasks.data.Batch``: ``input_ids``/``labels`` ``(B, L)``; ``targets`` the cached targets at T
            (ignored, may be None, with an online teacher).
        tc: ``alpha``, ``temperature``, ``loss``, ``beta``, ``skew``, ``hidden_loss``, ``hidden_weight``.
        online: the teacher run here (None: cache mode).
    Returns:
        dict: ``total``, ``ce``, ``kd``, ``hidden`` (0 without hidden matching), ``tokens``.
    """
    pairs = online.layer_map if online is not None and online.projections is not None else []
    length = batch.input_ids.shape[1]
    with capture_layer_outputs(model, [s for s, _ in pairs]) as student_states:
        logits = forward_logits(model, batch.input_ids)
    targets, teacher_states = batch.targets, []
    if online is not None:
        targets, teacher_states = teacher_outputs(online.model, batch.input_ids, temperature=tc.temperature,
                                                  vocab_size=logits.shape[-1], layers=[t for _, t in pairs])
    out = distillation_loss(logits, batch.labels, targets, alpha=tc.alpha, temperature=tc.temperature,
                            loss=tc.loss, beta=tc.beta, skew=tc.skew)
    out["hidden"] = torch.zeros((), dtype=torch.float32)
    if pairs:
        states = [student_states[s][:, -length:] for s, _ in pairs]
        out["hidden"] = hidden_state_loss(states, teacher_states, online.projections, tc.hidden_loss,
                                          mask=batch.labels != -100)
        out["total"] = out["total"] + tc.hidden_weight * out["hidden"]
    return out


def step_projections(projections: torch.nn.ModuleList, optimizer: torch.optim.Optimizer, *, lr: float,
                     grad_clip: float) -> None:
    """One optimizer step of the (replicated) projections: gradients averaged over ranks, clipped, AdamW at ``lr``."""
    params = [p for p in projections.parameters() if p.grad is not None]
    if not params:
        return
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p.grad))
    for group in optimizer.param_groups:
        group["lr"] = lr
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

