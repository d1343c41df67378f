"""The objective every training path minimises: cache mode, online mode, the benchmarks.

    python -m pytest tests/unit/test_objective.py

Per micro-batch: ``α·CE + (1−α)·T²·KD [+ hidden_weight·hidden]``. KD compares the student's logits with the
teacher's distribution at T — the cached targets of the batch (``train.teacher_mode: cache``) or the teacher run
here on the same windows (``online``, :func:`tasks.online.teacher_outputs`). The hidden term (online only) compares
the projected student layers that :class:`tasks.online.StudentWithHeads` returns with the teacher's layers.
"""

from __future__ import annotations

import torch

from raydistill.tasks.config import TrainConfig
from raydistill.tasks.losses import distillation_loss, hidden_state_loss
from raydistill.tasks.online import OnlineTeacher, teacher_outputs


def training_loss(model, batch, tc: TrainConfig, online: OnlineTeacher | None = None) -> dict[str, torch.Tensor]:
    """The objective of one micro-batch: ``α·CE + (1−α)·T²·KD [+ hidden_weight·hidden]``.

    Args:
        model: a :class:`tasks.online.StudentWithHeads` (the only kind that can match hidden states), a plain or
            PEFT student, or an engine wrapping either (its forward is called).
        batch: ``tasks.data.Batch``: ``input_ids``/``labels`` ``(B, L)``; ``targets`` the cached targets at T
            (ignored, may be None, with an online teacher).
        tc: ``alpha``, ``temperature``, ``loss``, ``beta``, ``skew``, ``hidden_loss``, ``hidden_weight``.
        online: the teacher run here (None: cache mode).
    Returns:
        dict of scalars: ``total``, ``ce``, ``kd``, ``hidden`` (0 without hidden matching), ``tokens``.
    """
    length = batch.input_ids.shape[1]
    out = model(input_ids=batch.input_ids, use_cache=False)
    logits = out.logits[:, -length:]  # drops the virtual tokens prompt tuning prepends
    projected = getattr(out, "projected", None) or []
    targets, teacher_states = batch.targets, []
    if online is not None:
        targets, teacher_states = teacher_outputs(online.model, batch.input_ids, temperature=tc.temperature,
                                                  vocab_size=logits.shape[-1], layers=online.layers)
    losses = distillation_loss(logits, batch.labels, targets, alpha=tc.alpha, temperature=tc.temperature,
                               loss=tc.loss, beta=tc.beta, skew=tc.skew)
    losses["hidden"] = torch.zeros((), dtype=torch.float32)
    if online is not None and online.layers:
        losses["hidden"] = hidden_state_loss(projected, teacher_states, None, tc.hidden_loss,
                                             mask=batch.labels != -100)
        losses["total"] = losses["total"] + tc.hidden_weight * losses["hidden"]
    return losses
