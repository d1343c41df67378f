"""Masked shards (chat corpora): targets only on the rows whose label carries loss.

A shard planned from a chat file (:mod:`tasks.chatstream`) has a loss mask ``mask`` uint8 ``[W, L]``
(``mask[w, j]``: row j, the prediction of token j+1, is an assistant token). The teacher forward still reads every
window whole, but the format's encoder sees only the masked-in rows, in window-major order, as one pseudo-window
of ``R = mask.sum()`` rows: a masked shard stores targets (draws, top-k, log-probs or hidden states) for those R
rows only, plus the mask itself (the shard's ``mask`` array), and its entry counts R tokens.

The formats know nothing of this: they encode, store and decode R rows, and :func:`format_tokens` gives them the
``[1, R+1]`` tokens of that pseudo-window (the labels of the kept rows) where they look at the tokens. Reading
back, :func:`expand` lays the decoded rows out as ``[w, L, ...]`` again: a masked-out row holds a copy of a kept
row (a finite, valid target the loss never reads: its label is ``-100``, see :mod:`tasks.data`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from raydistill.tasks.cache.targets import CachedTargets

TARGET_TENSORS = ("ids", "logprobs", "counts", "tail_logmass", "hidden")


def format_tokens(tokens: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The tokens a format sees: ``tokens`` itself (no mask), else the ``[1, R+1]`` pseudo-window whose labels are
    the labels of the masked-in rows (see the module doc)."""
    if mask is None:
        return tokens
    labels = np.asarray(tokens)[:, 1:][np.asarray(mask, dtype=bool)]
    return np.concatenate([np.zeros(1, np.int32), labels.astype(np.int32)])[None]


def expand_rows(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``rows`` ``[R, ...]`` (the masked-in rows in window-major order) → ``[w, L, ...]`` with ``mask`` (bool
    ``[w, L]``, ``R`` True); masked-out rows hold a copy of the first row."""
    out = rows[:1].expand(*mask.shape, *rows.shape[1:]).clone()
    out[mask] = rows
    return out


def expand(compact: CachedTargets, mask: torch.Tensor) -> CachedTargets:
    """Targets decoded as one pseudo-window ``[1, R, ...]`` → ``[w, L, ...]`` (:func:`expand_rows` per tensor)."""
    return dataclasses.replace(compact, **{name: expand_rows(getattr(compact, name)[0], mask)
                                           for name in TARGET_TENSORS if getattr(compact, name) is not None})


def select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The masked-in rows of ``x`` ``[b, L, ...]`` as ``[1, R, ...]`` (``x`` itself without a mask)."""
    return x if mask is None else x[mask.to(x.device)].unsqueeze(0)
