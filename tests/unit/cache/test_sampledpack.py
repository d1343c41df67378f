"""tasks/cache/sampledpack: the entropy-coded on-disk layout of the ``sampled`` format (FORMAT_VERSION 2)."""

from __future__ import annotations

import lzma
import math

import numpy as np
import pytest
import torch

from raydistill.tasks.cache.encode import window_generator
from raydistill.tasks.cache.formats import sampled
from raydistill.tasks.cache.sampledpack import (LOGP_OFFSET, LOGP_STEP, TABLE_MIN_DRAWS, compact_sampled, expand_sampled,
                                                rank_order)
from raydistill.tasks.cache.store import pack, unpack
from raydistill.tasks.cache.targets import at_temperature


def _teacher_logits(W: int, L: int, V: int, seed: int = 0, peak: float = 0.0) -> torch.Tensor:
    """Zipf-like logits (a few likely ids, a long tail) with per-position noise; ``peak`` > 0 adds one id
    so likely that every draw of that row picks it."""
    g = torch.Generator().manual_seed(seed)
    base = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
    perm = torch.randperm(V, generator=g)
    logits = base[perm] + 2.0 * torch.randn(W, L, V, generator=g)
    if peak:
        logits[:, ::3, 7] += peak
    return logits


def _fields(logits: torch.Tensor, n: int, key: str = "k") -> dict[str, np.ndarray]:
    return sampled.encode(logits, sampled.Params(n), 1.0, [window_generator(key, i) for i in range(logits.shape[0])])


def _tokens(W: int, L: int, V: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.zipf(1.3, size=(W, L + 1)) - 1, V - 1).astype(np.int32)


def _roundtrip(fields, tokens, V, n, keep_logprobs=True):
    arrays, meta = compact_sampled(fields, tokens, V, n, keep_logprobs=keep_logprobs)
    stored, header = unpack(pack({"tokens": tokens, **arrays}, {"sampled": meta}, raw=("sampled_bits",)))
    return expand_sampled(stored, stored["tokens"], V, n, header["sampled"])


def _entries(f: dict) -> dict[tuple[int, int], tuple[int, float]]:
    rows = np.repeat(np.arange(len(f["row_len"])), f["row_len"].astype(np.int64))
    lp = f.get("logp", np.zeros(len(rows)))
    return {(int(r), int(i)): (int(c), float(p)) for r, i, c, p in zip(rows, f["ids"], f["counts"], lp)}


@pytest.mark.parametrize("W,L,V,n,peak", [(3, 17, 500, 32, 0.0), (2, 9, 300_000, 50, 0.0), (2, 8, 64, 1, 0.0),
                                          (2, 12, 1000, 255, 0.0), (3, 10, 2000, 16, 40.0)])
def test_ids_and_counts_round_trip_exactly_and_log_probs_within_half_a_step(W, L, V, n, peak):
    fields = _fields(_teacher_logits(W, L, V, peak=peak), n)
    out = _roundtrip(fields, _tokens(W, L, V), V, n)
    assert np.array_equal(out["row_len"], fields["row_len"])  # never stored: rows end where counts reach N
    a, b = _entries(fields), _entries(out)
    assert a.keys() == b.keys()
    assert all(a[k][0] == b[k][0] for k in a)
    err = max(abs(a[k][1] - b[k][1]) for k in a)
    assert err <= LOGP_STEP / 2 + 1e-5
    if peak:
        assert fields["row_len"].reshape(W, L)[:, ::3].max() == 1  # all N draws on one id: one entry, count N
    if V > 2 ** 17:
        assert fields["ids"].max() > 2 ** 17  # gaps needing more than 16 raw bits occurred


def test_decoded_rows_list_distinct_ids_in_rank_order():
    V, n = 800, 32
    tokens = _tokens(2, 20, V)
    fields = _fields(_teacher_logits(2, 20, V), n)
    out = _roundtrip(fields, tokens, V, n)
    arrays, _ = compact_sampled(fields, tokens, V, n)
    table = np.cumsum(arrays["rank_table"].astype(np.int64))
    drawn = np.bincount(fields["ids"], weights=fields["counts"], minlength=V)
    assert np.array_equal(table, np.flatnonzero(drawn >= TABLE_MIN_DRAWS))
    rank = np.empty(V, np.int64)
    rank[rank_order(tokens, V, table, np.frexp(drawn[table])[1])] = np.arange(V)
    starts = np.cumsum(out["row_len"].astype(np.int64))
    for ids in np.split(out["ids"], starts[:-1]):
        assert np.all(np.diff(rank[ids]) > 0)


def test_rank_order_puts_table_classes_then_token_frequency_then_id():
    tokens = np.array([[5, 5, 5, 2, 2, 9]], np.int32)
    order = rank_order(tokens, 12, np.array([3, 9, 11]), np.array([2, 4, 2]))
    assert sorted(order.tolist()) == list(range(12))
    assert order.tolist() == [9, 3, 11, 5, 2, 0, 1, 4, 6, 7, 8, 10]


def test_extreme_log_probs_stay_within_the_bound():
    """A sampled id can be very unlikely (p ≈ e^-100); the residual range must hold it."""
    fields = {"row_len": np.array([2, 1], np.uint8), "ids": np.array([3, 40, 7], np.int32),
              "counts": np.array([15, 1, 16], np.uint8), "logp": np.array([-0.01, -100.0, -1e-6], np.float32)}
    tokens = np.zeros((1, 3), np.int32)
    out = _roundtrip(fields, tokens, 50, 16)
    a, b = _entries(fields), _entries(out)
    assert max(abs(a[k][1] - b[k][1]) for k in a) <= LOGP_STEP / 2 + 1e-4
    assert -LOGP_OFFSET * LOGP_STEP < -100.0 - math.log(1 / 16)


def test_without_log_probs_nothing_is_stored_for_them():
    V, n = 500, 24
    tokens, fields = _tokens(2, 10, V), _fields(_teacher_logits(2, 10, V), n)
    with_lp, meta_lp = compact_sampled(fields, tokens, V, n)
    without, meta = compact_sampled({k: v for k, v in fields.items() if k != "logp"}, tokens, V, n,
                                    keep_logprobs=False)
    assert "logp" not in meta["groups"] and "logp" in meta_lp["groups"]
    assert len(without["sampled_symbols"]) < len(with_lp["sampled_symbols"])
    out = _roundtrip(fields, tokens, V, n, keep_logprobs=False)
    assert "logp" not in out and _entries(out).keys() == _entries(fields).keys()


@pytest.mark.parametrize("T", [2.0, 0.5])
def test_quantised_log_probs_move_retempered_targets_by_at_most_the_bound(T):
    """Log weights move by ≤ |1/T − 1|·step/2 = δ, so each normalised weight by a factor within e^{±2δ}:
    TV per row ≤ 1 − e^{−2δ}; on average it is far smaller."""
    V, n, L = 3000, 32, 16
    logits = _teacher_logits(4, L, V)
    fields = _fields(logits, n)
    out = _roundtrip(fields, _tokens(4, L, V), V, n)

    def target(f):
        sparse = at_temperature(sampled.decode(f, slice(0, 4 * L), L, sampled.Params(n), 1.0, None), T)
        return torch.zeros(4, L, V).scatter_add(-1, sparse.ids, sparse.probs)

    tv = 0.5 * (target(out) - target(fields)).abs().sum(-1)
    delta = abs(1 / T - 1) * LOGP_STEP / 2
    assert tv.max() <= 1 - math.exp(-2 * delta) + 1e-5
    assert tv.mean() < (1 - math.exp(-2 * delta)) / 2


def test_corrupt_streams_are_refused():
    V, n = 500, 16
    tokens, fields = _tokens(2, 10, V), _fields(_teacher_logits(2, 10, V), n)
    arrays, meta = compact_sampled(fields, tokens, V, n)
    short = {**arrays, "sampled_symbols": arrays["sampled_symbols"][:-1]}
    with pytest.raises(ValueError):
        expand_sampled(short, tokens, V, n, meta)
    with pytest.raises(ValueError):
        expand_sampled(arrays, tokens, V, n + 1, meta)
    bad = {**meta, "bits": meta["bits"] + 8}
    with pytest.raises(ValueError):
        expand_sampled(arrays, tokens, V, n, bad)
    with pytest.raises(ValueError, match="sum to N"):
        compact_sampled(fields, tokens, V, n + 1)


def test_entropy_coding_beats_plain_arrays():
    """The stored arrays must be well below plain LZMA'd ids (int32) + counts (uint8) + log-probs (float16)
    + row lengths — what a straightforward layout would write."""
    V, n = 20_000, 32
    tokens, fields = _tokens(4, 64, V), _fields(_teacher_logits(4, 64, V), n)
    arrays, _ = compact_sampled(fields, tokens, V, n)
    ours = sum(len(lzma.compress(a.tobytes())) for k, a in arrays.items() if k != "sampled_bits")
    ours += arrays["sampled_bits"].nbytes
    plain = sum(len(lzma.compress(a)) for a in (fields["ids"].tobytes(), fields["counts"].tobytes(),
                                                fields["logp"].astype(np.float16).tobytes(),
                                                fields["row_len"].tobytes()))
    assert ours < 0.75 * plain


def test_word_wise_bit_packing_equals_packing_bit_by_bit():
    from raydistill.tasks.cache.sampledpack import _pack_bits

    def bit_by_bit(values, lengths):
        bits = [(int(v) >> (n - 1 - k)) & 1 for v, n in zip(values, lengths) for k in range(n)]
        return np.packbits(np.array(bits, np.uint8)) if bits else np.zeros(0, np.uint8)

    rng = np.random.default_rng(4)
    for count in (0, 1, 5, 300):
        lengths = rng.integers(0, 33, count)
        values = rng.integers(0, 2 ** 32, count) & ((1 << lengths) - 1)
        assert np.array_equal(_pack_bits(values, lengths), bit_by_bit(values, lengths))
