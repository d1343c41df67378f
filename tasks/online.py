"""The teacher online: dense KD targets and hidden states computed inside training, and the projection heads.

    python -m pytest tests/unit/test_online.py

``train.teacher_mode: online``: every worker loads the teacher once (eval mode, frozen; :func:`online_teacher`)
and, for each micro-batch — the same windows, in the same order, as cache mode reads from the cache's shards —
runs it under ``torch.inference_mode`` for its full softmax at temperature T (:func:`teacher_outputs`, a
``DenseTargets``). Teacher logit rows past the student's are cut off and the rest renormalised (the teacher
distribution conditioned on the ids the student has; see :mod:`tasks.data`); student rows past the teacher's get
teacher mass 0 in :func:`tasks.losses.distillation_loss`.

Hidden-state matching (``train.hidden_loss``: ``mse`` | ``cosine``, online only): for each
``[student_layer, teacher_layer]`` pair (:func:`resolve_layer_map`) a ``Linear(D_s → D_t)`` projection
(identity when the widths are equal; :func:`make_projections`) maps the student layer's output onto the teacher
layer's. Layer outputs are taken with forward hooks on the decoder blocks (:func:`capture_layer_outputs`): the
residual stream *before* the final norm for every layer. (``output_hidden_states=True`` would give the same
tensors except for the last layer, which Hugging Face replaces by the final-norm output — a student's last layer
would then be compared post-norm against a teacher middle layer pre-norm.) The projections live with the
student in one module, :class:`StudentWithHeads`, which the optimizer owns whole (DeepSpeed in the workers:
gradients averaged over ranks, one AdamW, one checkpoint); they are training-only and never exported.

The objective that combines these is :func:`tasks.objective.training_loss`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from raydistill.tasks.config import ConfigError, TrainConfig
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
    """The frozen teacher of online training and, for hidden-state matching, the teacher layer matched by each
    projection of the student's :class:`StudentWithHeads` (empty: no hidden term)."""

    model: torch.nn.Module
    """A causal LM in eval mode, ``requires_grad`` off."""
    layers: list[int]
    """Teacher layer of each layer pair, in the order of ``StudentWithHeads.layers``."""


def online_teacher(teacher: torch.nn.Module, tc: TrainConfig, layer_map: list[tuple[int, int]]) -> OnlineTeacher:
    """Freeze ``teacher``; with ``tc.hidden_loss`` on, it returns the outputs of the teacher side of ``layer_map``."""
    teacher.eval().requires_grad_(False)
    return OnlineTeacher(teacher, [] if tc.hidden_loss == "none" else [t for _, t in layer_map])


@dataclass
class StudentOutput:
    """What :class:`StudentWithHeads` returns for ``input_ids`` ``(B, L)``."""

    logits: torch.Tensor
    """``(B, L, V)``; positions of virtual tokens (prompt tuning) dropped."""
    projected: list[torch.Tensor]
    """Per projection, ``(B, L, D_t)`` float32: the projected output of its student layer (empty without heads)."""


class StudentWithHeads(torch.nn.Module):
    """The student and the projection heads of hidden-state matching as ONE module, so that whoever owns it
    (DeepSpeed in the workers: gradients, all-reduce, optimizer step, ZeRO partitions, checkpoint) owns both.

    The heads are training-only: export ``.student``. The forward runs the heads too, so that under ZeRO-3 every
    parameter is gathered inside the engine's forward. Without heads it is the student with a slimmer output.
    """

    def __init__(self, student: torch.nn.Module, projections: torch.nn.ModuleList | None = None,
                 layers: list[int] = ()):
        super().__init__()
        projections = projections if projections is not None else torch.nn.ModuleList()
        if len(projections) != len(layers):
            raise ValueError(f"{len(projections)} projections for {len(layers)} student layers: need one per layer")
        self.student, self.projections, self.layers = student, projections, list(layers)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> StudentOutput:
        length = input_ids.shape[1]
        with capture_layer_outputs(self.student, self.layers) as states:
            logits = self.student(input_ids=input_ids, use_cache=use_cache).logits[:, -length:]
        projected = [proj(states[i][:, -length:].float()) for i, proj in zip(self.layers, self.projections)]
        return StudentOutput(logits, projected)


def student_with_heads(student: torch.nn.Module, tc: TrainConfig, layer_map: list[tuple[int, int]],
                       teacher_dim: int) -> StudentWithHeads:
    """``student`` with one projection per pair of ``layer_map`` when ``tc.hidden_loss`` is on (none otherwise)."""
    if tc.hidden_loss == "none":
        return StudentWithHeads(student)
    heads = make_projections(len(layer_map), student.config.hidden_size, teacher_dim, seed=tc.seed)
    return StudentWithHeads(student, heads, [s for s, _ in layer_map])
