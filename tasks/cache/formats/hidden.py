"""``hidden``: the teacher's final normalised hidden state per row (bf16, ``2·d_model`` bytes) plus its output head
stored once per cache (:mod:`tasks.cache.head`): exact teacher logits ``h·Wᵀ (+ b)`` rebuilt at training time,
at any temperature, for every loss, at a fraction of ``full``'s ``2·V`` bytes per token.

Rebuilt logits differ from the teacher's own by the rounding of ``h`` to bf16 (a bf16 teacher's ``h`` is stored
as it is; its own logits are rounded to bf16 besides, the rebuilt ones are float32). The loss rebuilds them chunk
by chunk, fused with the loss (:func:`tasks.losses.distillation_loss`), so no ``[B, L, V]`` tensor of targets exists.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import ClassVar

import numpy as np
import torch

from raydistill.tasks.cache.head import OutputHead, head_bytes, head_file
from raydistill.tasks.cache.masked import select
from raydistill.tasks.cache.targets import CachedTargets, HiddenTargets
from raydistill.tasks.config import CacheConfig
from raydistill.tasks.device import module_device

_CHECKED: "weakref.WeakSet" = weakref.WeakSet()


@dataclasses.dataclass(frozen=True)
class Params:
    """A ``hidden`` cache has no parameters of its own (the manifest's ``params`` is ``{}``)."""

    format: ClassVar[str] = "hidden"

    @classmethod
    def from_config(cls, cfg: CacheConfig) -> "Params":
        return cls()


def encode(logits: torch.Tensor, params: Params, temperature: float, generators: list[torch.Generator] | None = None,
           labels: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """For this format the first argument is the teacher's final normalised hidden state ``[B, L, d]`` (not logits):
    → ``hidden`` uint16 ``[B*L, d]`` (the bf16 bits). ``temperature``, ``generators`` and ``labels`` are unused (the
    held-out statistics need the head: :func:`encode_hidden_shard` computes them)."""
    h = logits.to(torch.bfloat16).reshape(-1, logits.shape[-1])
    return {"hidden": h.view(torch.int16).cpu().numpy().view(np.uint16)}


def _base(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None:
        raise ValueError(f"cache.format=hidden: {type(model).__name__} has no base model "
                         f"({getattr(model, 'base_model_prefix', None)!r}); use cache.format=sampled")
    return base


def check_head(model: torch.nn.Module, device: torch.device) -> None:
    """Refuse a teacher whose logits are not ``head(final hidden state)`` (a logit soft-cap or scale after the
    head): compared once per model on a short input."""
    if model in _CHECKED:
        return
    x = torch.arange(1, 9, device=device).unsqueeze(0)
    with torch.inference_mode():
        want = model(input_ids=x, use_cache=False).logits.float()
        got = model.get_output_embeddings()(_base(model)(input_ids=x, use_cache=False).last_hidden_state).float()
    if not torch.allclose(got, want, atol=1e-3 * float(want.abs().max()) + 1e-4):
        raise ValueError(f"cache.format=hidden: {type(model).__name__}'s logits are not its output head applied to "
                         "its final hidden state (a logit soft-cap or scale?); use cache.format=sampled")
    _CHECKED.add(model)


def encode_hidden_shard(model: torch.nn.Module, tokens: np.ndarray, split: str, params: Params,
                        batch_size: int, mask: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict, int]:
    """The ``hidden`` branch of :func:`tasks.cache.encode.encode_shard`: the base model's forward (no output head on
    a train shard), bf16 hidden states to the host; on a held-out shard the head too, for the teacher statistics.
    ``fields`` also carry the head's safetensors bytes (``head``) and sha256 (``head_sha256``, ASCII), which
    :func:`tasks.cache.shards.commit_shard` writes once per cache dir. With ``mask`` (a chat shard) only the
    masked-in rows' states are kept (:mod:`tasks.cache.masked`)."""
    device = module_device(model)
    check_head(model, device)
    base, lm_head = _base(model), model.get_output_embeddings()
    data, sha = head_bytes(model)
    vocab = lm_head.weight.shape[0]
    parts, nll_sum, correct, forwards = [], 0.0, 0, 0
    for i in range(0, tokens.shape[0], batch_size):
        x = torch.tensor(tokens[i: i + batch_size], dtype=torch.long)
        if int(x.max()) >= vocab:
            raise ValueError(f"token id {int(x.max())} >= teacher vocab size {vocab}: tokenizer and teacher do not "
                             "match")
        with torch.inference_mode():
            h = base(input_ids=x[:, :-1].to(device), use_cache=False).last_hidden_state
            forwards += 1
            rows = None if mask is None else torch.from_numpy(np.array(mask[i: i + batch_size], dtype=bool))
            h = select(h, rows)
            part = encode(h, params, 1.0)
            if split == "heldout":
                logits = lm_head(h).float()
                labels = select(x[:, 1:], rows).to(device)
                lse = torch.logsumexp(logits, dim=-1)
                nll = lse - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                top1 = logits.argmax(dim=-1)
                part["teacher_top1"] = top1.reshape(-1).to(torch.int32).cpu().numpy()
                part["teacher_nll"] = nll.reshape(-1).cpu().numpy().astype(np.float32)
                nll_sum += float(nll.double().sum())
                correct += int((top1 == labels).sum())
        parts.append(part)
    fields = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    fields["head"] = np.frombuffer(data, np.uint8)
    fields["head_sha256"] = np.frombuffer(sha.encode(), np.uint8)
    return fields, {"vocab_size": vocab, "teacher_nll_sum": nll_sum, "teacher_top1_correct": correct}, forwards


def to_disk(fields: dict[str, np.ndarray], tokens: np.ndarray, vocab_size: int,
            params: Params) -> tuple[dict[str, np.ndarray], dict, tuple[str, ...]]:
    """The hidden states stored raw (bf16 bits compress by < 10 % and LZMA would cost more than the forward); the
    header names the head file (``head``: file, sha256), which the commit writes once per cache dir."""
    sha = bytes(fields["head_sha256"]).decode()
    stored = {k: v for k, v in fields.items() if k not in ("head", "head_sha256")}
    extra = {"head": {"file": head_file(sha), "sha256": sha}, "d_model": int(fields["hidden"].shape[-1])}
    return stored, extra, ("hidden",)


def from_disk(stored: dict[str, np.ndarray], tokens: np.ndarray, vocab_size: int, params: Params,
              header: dict) -> dict[str, np.ndarray]:
    """The stored arrays, plus the :class:`~tasks.cache.head.OutputHead` the reader put in ``stored["head"]``."""
    if not isinstance(stored.get("head"), OutputHead):
        raise KeyError("head (the reader did not load the teacher's output head)")
    if stored["hidden"].shape != (tokens.shape[0] * (tokens.shape[1] - 1), header["d_model"]):
        raise ValueError(f"hidden states of shape {stored['hidden'].shape} for {tokens.shape} tokens")
    return stored


def entries(fields: dict[str, np.ndarray]) -> int:
    """Stored values: d_model per row (the head, stored once, is not counted)."""
    return int(fields["hidden"].size)


def decode(fields: dict[str, np.ndarray], row_slice: slice, seq_len: int, params: Params, temperature: float,
           vocab_size: int | None) -> CachedTargets:
    """Rows ``row_slice`` (window-aligned) → :class:`CachedTargets` with ``hidden`` bf16 ``[w, L, d]`` and ``head``."""
    h = torch.from_numpy(np.ascontiguousarray(fields["hidden"][row_slice]).view(np.int16)).view(torch.bfloat16)
    return CachedTargets("hidden", temperature, None, None, vocab_size=vocab_size,
                         hidden=h.reshape(-1, seq_len, h.shape[-1]), head=fields["head"])


def at_temperature(targets: CachedTargets, temperature: float) -> HiddenTargets:
    """Exact at any temperature: the loss rebuilds ``log_softmax(h·Wᵀ/T)`` chunk by chunk (``cache.temperature``
    plays no part: the stored state is the teacher's, not a distribution)."""
    return HiddenTargets(targets.hidden, targets.head, temperature)


def restrict_vocab(cached: CachedTargets, vocab_size: int) -> CachedTargets:
    """Exact: the head's rows ≥ ``vocab_size`` are dropped, so the rebuilt distribution is the teacher's conditioned
    on the kept ids."""
    if cached.head.rows <= vocab_size:
        return cached
    return dataclasses.replace(cached, head=cached.head.restrict(vocab_size), vocab_size=vocab_size)
