"""The teacher forward that feeds the formats' encoders — the device part of caching a shard — and the in-memory
encode → decode round trip benchmarks and tests use.

:func:`encode_shard` runs on the teacher's device, one batch of windows at a time: the forward, then the format's
encoder on the same device (draws, top-k, held-out statistics); only what the shard stores (draws, top-k, hidden
states) and the held-out statistics cross to the host, never the ``[.., V]`` logits of a sampled or top-k cache.
The host part — entropy coding (the format's ``to_disk``), packing, the store — is
:func:`tasks.cache.shards.commit_shard`, so a caller can overlap it with the next shard's forward.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from raydistill.tasks.cache.draws import owned
from raydistill.tasks.cache.formats import get_format
from raydistill.tasks.cache.masked import select
from raydistill.tasks.cache.targets import CachedTargets
from raydistill.tasks.device import module_device


def window_generator(key: str, window: int) -> torch.Generator:
    """RNG of one window's draws: seeded by the shard key (which includes cache.seed) and the window index. A CPU
    generator on every device: the draws' uniforms are the same wherever the teacher runs."""
    seed = int.from_bytes(hashlib.sha256(f"{key}:{window}".encode()).digest()[:8], "little") & (2 ** 63 - 1)
    return torch.Generator().manual_seed(seed)


def _check_vocab(x: torch.Tensor, vocab: int) -> None:
    if int(x.max()) >= vocab:
        raise ValueError(f"token id {int(x.max())} >= teacher vocab size {vocab}: tokenizer and teacher do not match")


def encode_shard(model: torch.nn.Module, tokens: np.ndarray, split: str, params, temperature: float,
                 batch_size: int, key: str, mask: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict, int]:
    """Run the teacher over one shard and encode its targets in the format of ``params`` (its ``Params``) on the
    teacher's device.

    tokens: int32 ``[W, L+1]``. The model's output logits are the sampler's to overwrite (``draws.owned``): a
    model that hands out views of a tensor it keeps must return copies. Returns (fields: arrays over the ``W*L`` rows,
    stats: vocab_size,
    teacher_nll_sum, teacher_top1_correct, forwards performed). Held-out shards also get ``teacher_top1`` and
    ``teacher_nll`` per row, so no later stage needs the teacher for evaluation; the statistics are computed on
    held-out shards only (a train shard's sums are 0: only held-out totals are reported, and an argmax over V per
    row costs as much as the draws). ``hidden`` train shards skip the output head altogether.

    mask: uint8 ``[W, L]`` (a chat shard, :mod:`tasks.cache.masked`): every window is read whole, but only the
    masked-in rows are encoded (each window's rows with its own generator), so the arrays cover those rows only.
    """
    fmt = get_format(params.format)  # before any teacher forward
    if params.format == "hidden":
        from raydistill.tasks.cache.formats.hidden import encode_hidden_shard

        return encode_hidden_shard(model, tokens, split, params, batch_size, mask)
    device = module_device(model)
    parts, nll_sum, correct, forwards, vocab = [], 0.0, 0, 0, None
    for i in range(0, tokens.shape[0], batch_size):
        x = torch.tensor(tokens[i: i + batch_size], dtype=torch.long)  # copy: Ray hands read-only arrays
        labels = x[:, 1:]
        with torch.inference_mode():
            logits = model(input_ids=x[:, :-1].to(device), use_cache=False).logits  # [b, L, V]
            forwards += 1
            vocab = logits.shape[-1]
            _check_vocab(x, vocab)
            # encoded on the teacher's device; what the encoder returns is on the host
            enc, kept = _encode_batch(fmt, logits, labels if split == "heldout" else None, params, temperature, key,
                                      i, None if mask is None else mask[i: i + batch_size])
            del logits
        for e, y in zip(enc, kept):
            if y is not None:
                nll_sum += float(e["teacher_nll"].astype(np.float64).sum())
                correct += int((e["teacher_top1"] == y.numpy()).sum())
            parts.append(e)
    fields = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    stats = {"vocab_size": vocab, "teacher_nll_sum": nll_sum, "teacher_top1_correct": correct}
    return fields, stats, forwards


def _encode_batch(fmt, logits: torch.Tensor, labels: torch.Tensor | None, params, temperature: float, key: str,
                  start: int, mask: np.ndarray | None) -> tuple[list[dict], list]:
    """The format's encoding of one batch's logits ``[b, L, V]`` (windows ``start …``): one part for the whole
    batch, or with ``mask`` one per window of its masked-in rows; and the labels each part's held-out statistics
    are over (None without ``labels``)."""
    if mask is None:
        with owned():  # the logits are used once: the sampler may overwrite them (no copy of [b, L, V])
            enc = fmt.encode(logits, params, temperature,
                             [window_generator(key, start + b) for b in range(logits.shape[0])], labels=labels)
        return [enc], [None if labels is None else labels.reshape(-1)]
    keep = torch.from_numpy(np.array(mask, dtype=bool))  # a copy: Ray hands read-only arrays
    parts, kept = [], []
    for b in range(logits.shape[0]):
        rows = keep[b:b + 1]
        if not rows.any():
            continue
        with owned():  # the selected rows are a copy of their own
            parts.append(fmt.encode(select(logits[b:b + 1], rows), params, temperature,
                                    [window_generator(key, start + b)],
                                    labels=None if labels is None else select(labels[b:b + 1], rows)))
        kept.append(None if labels is None else labels[b][keep[b]])
    return parts, kept


def encode_targets(logits: torch.Tensor, params, *, temperature: float = 1.0,
                   generators: list[torch.Generator] | None = None) -> CachedTargets:
    """Teacher logits ``[B, L, V]`` → the targets a cache with ``params`` would give back for these ``B`` windows.

    The in-memory round trip (encode, then decode) that benchmarks and tests use in place of a cache on disk
    The one difference from a stored ``sampled`` shard: its log-probs are exact
    here, the shard keeps them to within ``LOGP_STEP/2`` (:mod:`tasks.cache.sampledpack`). Draws use one generator
    per window (default: :func:`window_generator` of ``"encode_targets"``).
    """
    B, L, V = logits.shape
    fmt = get_format(params.format)
    if generators is None:
        generators = [window_generator("encode_targets", b) for b in range(B)]
    fields = fmt.encode(logits, params, temperature, generators)
    return fmt.decode(fields, slice(0, B * L), L, params, temperature, V)
