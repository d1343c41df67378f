"""Compact on-disk coding of the ``sampled`` format (see docs/cache-format.md, "Shard file").

    python -m pytest tests/unit/test_softtargets.py -q -k "round_trip or without"

The encoder (:func:`tasks.targetcodec.encode_sampled`) yields per-row unique ids (ascending), counts and
T=1 log-probs. On disk, ids become ranks in a per-shard frequency order (rebuilt by the reader from the
shard's tokens), sorted and delta-coded per row; log-probs become int16 multiples of ``LOGP_STEP``
relative to log(count/N). LZMA over byte planes (``tasks.cachestore.pack``) does the rest.
"""

from __future__ import annotations

import numpy as np

LOGP_STEP = 1.0 / 8.0
"""Quantisation step (nats) of stored T=1 log-probs: error ≤ 1/16 nat, i.e. ≤ 3% on a re-tempering weight at
T = 2·T_c — far below the sampling noise of the estimator itself."""


def _frequency_order(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """All ids, most frequent in this shard's tokens first (ties and absent ids by id). About half of the
    sampled ids occur in the shard's own text (Shakespeare), so ranks are small and sorted deltas cheap."""
    freq = np.bincount(tokens.reshape(-1), minlength=vocab_size)
    return np.argsort(-freq, kind="stable")


def _row_starts(row_len: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(row_len.astype(np.int64))[:-1]])


def compact_sampled(fields: dict[str, np.ndarray], tokens: np.ndarray, vocab_size: int, num_samples: int,
                    keep_logprobs: bool = True) -> dict[str, np.ndarray]:
    """Encoder arrays → stored arrays: per-row sorted frequency ranks, delta-coded (``rank_delta`` uint32);
    ``counts`` uint8; log-probs as int16 multiples of LOGP_STEP relative to log(count/N) (``logp_q``)."""
    row_len = fields["row_len"]
    rank = np.empty(vocab_size, np.int64)
    rank[_frequency_order(tokens, vocab_size)] = np.arange(vocab_size)
    r = rank[fields["ids"]]
    rows = np.repeat(np.arange(len(row_len)), row_len.astype(np.int64))
    perm = np.lexsort((r, rows))  # ranks ascending within each row
    r, counts = r[perm], fields["counts"][perm]
    delta = np.diff(r, prepend=0)
    starts = _row_starts(row_len)
    delta[starts] = r[starts]
    out = {"row_len": row_len, "rank_delta": delta.astype(np.uint32), "counts": counts}
    if keep_logprobs:
        resid = (fields["logp"][perm] - np.log(counts / num_samples)) / LOGP_STEP
        out["logp_q"] = np.clip(np.round(resid), -32768, 32767).astype(np.int16)
    return out


def expand_sampled(stored: dict[str, np.ndarray], tokens: np.ndarray, vocab_size: int,
                   num_samples: int) -> dict[str, np.ndarray]:
    """Inverse of :func:`compact_sampled` (log-probs come back quantised; absent if not stored)."""
    row_len, delta = stored["row_len"], stored["rank_delta"].astype(np.int64)
    csum = np.cumsum(delta)
    starts = _row_starts(row_len)
    base = csum[starts] - delta[starts]  # cumulative sum before each row
    r = csum - np.repeat(base, row_len.astype(np.int64))
    out = {"row_len": row_len, "ids": _frequency_order(tokens, vocab_size)[r].astype(np.int32),
           "counts": stored["counts"]}
    if "logp_q" in stored:
        out["logp"] = (stored["logp_q"].astype(np.float32) * LOGP_STEP
                       + np.log(stored["counts"] / num_samples)).astype(np.float32)
    return out
