"""The cache formats, one module each, all with the same functions (a unit test checks):

- ``Params``: a frozen dataclass of what the format stores (``Params.from_config(CacheConfig)``; ``Params.format``
  is the format's name; ``dataclasses.asdict`` of it is the manifest's ``params``, part of every shard key);
- ``encode(logits, params, temperature, generators, labels)``: teacher logits ``[B, L, V]`` → flat arrays;
- ``to_disk`` / ``from_disk``: those arrays ↔ what the shard file holds (and which arrays skip compression);
- ``entries(fields)``: stored entries, for byte accounting;
- ``decode(fields, row_slice, seq_len, params, temperature, vocab_size)`` → ``CachedTargets``;
- ``at_temperature(targets, T)`` → ``SparseTargets``/``DenseTargets``; ``restrict_vocab(targets, V)``.

A fifth format is one new module here plus its entry in :data:`FORMATS`.
"""

from __future__ import annotations

from types import ModuleType

from raydistill.tasks.cache.formats import full, hidden, sampled, topk
from raydistill.tasks.config import CacheConfig

FORMATS: dict[str, ModuleType] = {"sampled": sampled, "topk": topk, "full": full, "hidden": hidden}


def get_format(name: str) -> ModuleType:
    """The module of format ``name``; ValueError naming the valid ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown cache format {name!r}; expected one of {tuple(FORMATS)}") from None


def format_params(cfg: CacheConfig):
    """The typed parameters of ``cfg.format`` (the fields of ``cfg`` that change what is stored)."""
    return get_format(cfg.format).Params.from_config(cfg)
