"""``full``: all log-probs at T_c per row (float16): exact, and the largest by far."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch

from raydistill.tasks.cache.targets import CachedTargets, DenseTargets, heldout_stats
from raydistill.tasks.config import CacheConfig


@dataclasses.dataclass(frozen=True)
class Params:
    """A ``full`` cache has no parameters of its own (the manifest's ``params`` is ``{}``)."""

    format: ClassVar[str] = "full"

    @classmethod
    def from_config(cls, cfg: CacheConfig) -> "Params":
        return cls()


def encode(logits: torch.Tensor, params: Params, temperature: float, generators: list[torch.Generator] | None = None,
           labels: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """logits ``[B, L, V]`` → ``logprobs`` float16 ``[B*L, V]`` at T_c; with ``labels`` ``[B, L]`` also
    :func:`~tasks.cache.targets.heldout_stats`. ``generators`` is unused."""
    V = logits.shape[-1]
    out = {"logprobs": torch.log_softmax(logits.float().reshape(-1, V) / temperature, dim=-1).half().cpu().numpy()}
    return out if labels is None else {**out, **heldout_stats(logits, labels)}


def to_disk(fields: dict[str, np.ndarray], tokens: np.ndarray, vocab_size: int,
            params: Params) -> tuple[dict[str, np.ndarray], dict, tuple[str, ...]]:
    """The log-probs are stored raw: 100s of MB, where LZMA would dominate the run time."""
    return fields, {}, ("logprobs",)


def from_disk(stored: dict[str, np.ndarray], tokens: np.ndarray, vocab_size: int, params: Params,
              header: dict) -> dict[str, np.ndarray]:
    return stored


def entries(fields: dict[str, np.ndarray]) -> int:
    """Stored log-probs: V per row."""
    return int(fields["logprobs"].size)


def decode(fields: dict[str, np.ndarray], row_slice: slice, seq_len: int, params: Params, temperature: float,
           vocab_size: int | None) -> CachedTargets:
    """Arrays of rows ``row_slice`` (window-aligned) → :class:`CachedTargets` with ``logprobs`` ``[w, L, V]``."""
    lp = torch.from_numpy(fields["logprobs"][row_slice]).float()
    return CachedTargets("full", temperature, None, lp.reshape(-1, seq_len, lp.shape[-1]), None, None, None,
                         vocab_size)


def at_temperature(targets: CachedTargets, temperature: float) -> DenseTargets:
    """log_softmax(logprobs · T_c/T) — exact."""
    return DenseTargets(torch.log_softmax(targets.logprobs * (targets.cache_temperature / temperature), dim=-1))


def restrict_vocab(cached: CachedTargets, vocab_size: int) -> CachedTargets:
    """Log-probs ``[..., V']`` cut to ``[..., vocab_size]`` and renormalised."""
    if cached.logprobs.shape[-1] <= vocab_size:
        return cached
    return dataclasses.replace(cached, logprobs=torch.log_softmax(cached.logprobs[..., :vocab_size], dim=-1),
                               vocab_size=vocab_size)
