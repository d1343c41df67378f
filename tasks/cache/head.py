"""The teacher's output head, stored once per cache for the ``hidden`` format (content-hashed safetensors).

    python -m pytest tests/unit/cache/test_hidden.py -q

A ``hidden`` cache stores per token the teacher's final normalised hidden state ``h`` (bf16); the logits are
``h·Wᵀ (+ b)`` with the head ``W`` ``[V, d]`` (and bias ``b``) stored once as ``heads/<sha16>.safetensors`` in the
cache dir: the file's name is its content's sha256, so every shard, every run and every cache of the same teacher
refer to one file, written with a create-if-absent (never replaced). Each shard header names the file and its
sha256; a reader verifies the sha256 and keeps the parsed head in memory (one read per process and head).
"""

from __future__ import annotations

import hashlib
import threading
import weakref

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

HEAD_DIR = "heads"
_BY_MODEL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model → (head bytes, sha256)
_BY_SHA: dict[str, "OutputHead"] = {}  # sha256 → parsed head (a reader's memo)
_WRITTEN: set[tuple[str, str]] = set()  # (cache dir, file) written by this process
_LOCK = threading.Lock()


class OutputHead:
    """The teacher's output head: ``logits(h) = h·Wᵀ + b`` in float32, exactly as the cache rebuilds them.

    Not a tensor nor a dataclass, so :func:`tasks.device.to_device` leaves it alone; :meth:`on` moves it once per
    device (a batch's targets reference it, they do not carry a copy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sha256: str, rows: int | None = None):
        self.weight, self.bias, self.sha256 = weight, bias, sha256
        self.rows = weight.shape[0] if rows is None else rows
        """Vocabulary ids kept (a restricted head uses the first ``rows`` of ``weight``)."""
        self._moved: dict[tuple, tuple] = {}

    def restrict(self, rows: int) -> "OutputHead":
        """The head over ids ``< rows`` only (the teacher's distribution conditioned on them, once normalised)."""
        return OutputHead(self.weight, self.bias, self.sha256, min(rows, self.rows))

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W [rows, d], b [rows] or None)`` float32 on ``device`` (moved and upcast once, then kept)."""
        key = (str(device), self.rows)
        if key not in self._moved:
            w = self.weight[: self.rows].to(device=device, dtype=torch.float32)
            b = None if self.bias is None else self.bias[: self.rows].to(device=device, dtype=torch.float32)
            self._moved[key] = (w, b)
        return self._moved[key]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[..., d]`` (any float dtype) → float32 logits ``[..., rows]``."""
        w, b = self.on(hidden.device)
        return torch.nn.functional.linear(hidden.float(), w, b)


def head_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The output head of a Hugging Face causal LM: ``{"weight": [V, d]}`` (+ ``"bias"``), as the model holds it."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        raise ValueError(f"cache.format=hidden needs a teacher whose output head is a Linear layer; "
                         f"{type(model).__name__} has {type(head).__name__}: use cache.format=sampled")
    out = {"weight": head.weight.detach()}
    if head.bias is not None:
        out["bias"] = head.bias.detach()
    return out


def head_bytes(model: torch.nn.Module) -> tuple[bytes, str]:
    """``(safetensors bytes of the head, their sha256)``, computed once per model object (the head of a loaded
    teacher does not change while it caches)."""
    with _LOCK:
        if model not in _BY_MODEL:
            tensors = {k: v.to("cpu").contiguous() for k, v in head_tensors(model).items()}
            data = st_save(tensors)
            _BY_MODEL[model] = (data, hashlib.sha256(data).hexdigest())
        return _BY_MODEL[model]


def head_file(sha256: str) -> str:
    """Where a head lives in a cache dir: named by its content."""
    return f"{HEAD_DIR}/{sha256[:16]}.safetensors"


def write_once(store, rel: str, data) -> None:
    """Create ``rel`` with ``data`` unless it is there (a content-addressed file: an existing one is the same
    bytes). Once per (cache dir, file) and process: no store request for the shards after the first."""
    key = (store.url(), rel)
    if key in _WRITTEN:
        return
    if not store.exists(rel):
        store.create(rel, bytes(data))
    _WRITTEN.add(key)


def parse_head(data, sha256: str) -> OutputHead:
    """The :class:`OutputHead` in safetensors ``data`` whose sha256 must be ``sha256`` (ValueError otherwise);
    parsed once per process and sha256."""
    with _LOCK:
        if sha256 in _BY_SHA:
            return _BY_SHA[sha256]
    raw = bytes(data) if not isinstance(data, bytes) else data
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"teacher head: sha256 mismatch (expected {sha256[:16]}…): the head file is corrupted")
    tensors = st_load(raw)
    head = OutputHead(tensors["weight"], tensors.get("bias"), sha256)
    with _LOCK:
        _BY_SHA[sha256] = head
    return head


def load_head(store, ref: dict) -> OutputHead:
    """The head a shard header's ``ref`` (``{"file", "sha256"}``) names, read from ``store`` and verified (once per
    process); FileNotFoundError when the file is missing."""
    with _LOCK:
        if ref["sha256"] in _BY_SHA:
            return _BY_SHA[ref["sha256"]]
    return parse_head(np.frombuffer(store.read(ref["file"]), np.uint8), ref["sha256"])
