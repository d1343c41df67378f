"""Compact on-disk coding of the ``sampled`` format (docs/cache-format.md, "Sampled entries").

    python -m pytest tests/unit/cache/test_sampledpack.py -q

The encoder (:func:`tasks.cache.formats.sampled.encode`) yields per-row unique ids, counts (Σ per row = N) and
T=1 log-probs. On disk (FORMAT_VERSION 3; 2 had no per-row N):

- ids become *ranks* in a per-shard order the reader rebuilds: ids drawn ≥ ``TABLE_MIN_DRAWS`` times in the
  shard first (by the bit length of their draw count, descending — the ``rank_table`` array stores these ids
  and classes), then by frequency in the shard's own tokens, then by id. Within a row the entries are sorted
  by rank and each rank is coded as a gap from the previous one: a *bucket* symbol (bit length of the gap)
  plus the gap's bits below its leading one, stored raw in a packed bit stream (``sampled_bits``).
- counts are byte symbols; a row ends where its counts reach its N, so row lengths are not stored. With a byte
  budget each row's own N is stored too, one byte symbol per row (a group of its own).
- log-probs become ``q = round((log p₁ − log(count/N)) / LOGP_STEP)``, a byte symbol ``q + LOGP_OFFSET``.

Symbols are entropy coded by LZMA (``tasks.cache.store.pack``) after grouping each kind by a context the
reader knows when it needs the symbol, so every group is a near-stationary stream: bucket | bit length of the
row's previous rank (or "first in row"); count | the row's previous count; log-prob | (count, rank class).
The reader decodes column by column (entry k of every unfinished row at once): at most N numpy steps.
"""

from __future__ import annotations

import numpy as np

LOGP_STEP = 0.5
"""Quantisation step (nats) of stored T=1 log-probs: error ≤ 1/4 nat. Re-tempering to T scales it by
|1/T − 1/T_c|: on SmolLM2/Shakespeare (N = 32) it moves the targets by TV ≈ 0.02 at T = 2 and ≈ 0.03 at
T = 0.5, while redrawing the samples moves them by ≈ 0.8 and ≈ 0.2 (independent noise: the total grows by
< 0.1 % and ≈ 1 %). Recorded per shard, so a reader never assumes it."""
LOGP_OFFSET = 240
"""``q`` is stored as the byte ``q + LOGP_OFFSET``: q ∈ [−240, 15], i.e. residuals from −120 to +7.5 nats at
step 1/2. A sampled id has p₁ ≥ 1e-45 (float32) and count/N ≥ 1/255, so the range is never hit in practice."""
TABLE_MIN_DRAWS = 4
"""Ids drawn at least this often in a shard are listed in its rank table (cost ~1 byte each, saves ~1 bit on
each of their draws)."""

GAP_CONTEXTS = 34  # 0: first entry of a row; 1 + bit length of the previous rank (ranks < 2^32)
COUNT_CONTEXTS = 5  # min(previous count in the row, 4); 0: first entry
LOGP_RANK_CLASSES = 9  # min(bit length of the rank // 2, 8)
LOGP_CONTEXTS = 3 * LOGP_RANK_CLASSES  # × min(count, 3)


def _bitlen(v: np.ndarray) -> np.ndarray:
    """Bit length of non-negative ints (0 → 0, 1 → 1, 2..3 → 2, …), exact for values < 2^53."""
    return np.frexp(np.asarray(v, dtype=np.float64))[1].astype(np.int64)


def rank_order(tokens: np.ndarray, vocab_size: int, table_ids: np.ndarray, table_cls: np.ndarray) -> np.ndarray:
    """All ids in rank order: table ids (class descending), then by count in ``tokens`` (descending), then id.

    Only the ids that are in the table or in ``tokens`` need sorting; the rest follow in id order."""
    tf = np.bincount(tokens.reshape(-1), minlength=vocab_size)
    cls = np.zeros(vocab_size, np.int64)
    cls[table_ids] = table_cls
    known = (tf > 0) | (cls > 0)
    head = np.flatnonzero(known)
    head = head[np.lexsort((head, -tf[head], -cls[head]))]
    return np.concatenate([head, np.flatnonzero(~known)])


def _pack_bits(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``lengths[i]`` (≤ 32) low bits of ``values[i]`` (most significant first) into bytes.

    Word-wise, no per-bit arrays: each field lands in the big-endian 64-bit word holding its first bit (and its
    tail, if it straddles, in the next), and the fields of a word are OR-ed together with one ``reduceat`` (their
    bit ranges do not overlap, so OR is their sum)."""
    lengths = lengths.astype(np.int64)
    keep = lengths > 0
    v, n = values.astype(np.uint64)[keep] & ((np.uint64(1) << lengths[keep].astype(np.uint64)) - np.uint64(1)), \
        lengths[keep]
    total = int(n.sum())
    words = np.zeros((total + 63) // 64 + 1, np.uint64)
    if total:
        start = np.cumsum(n) - n
        word, offset = start >> 6, start & 63
        end = offset + n  # one past the field's last bit, counted from the word's most significant bit
        fits = end <= 64
        head = np.where(fits, v << (64 - end).clip(0).astype(np.uint64), v >> (end - 64).clip(0).astype(np.uint64))
        firsts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
        words[word[firsts]] |= np.bitwise_or.reduceat(head, firsts)
        spill = np.flatnonzero(~fits)  # at most one field per word straddles into the next
        words[word[spill] + 1] |= v[spill] << (128 - end[spill]).astype(np.uint64)
    return words.astype(">u8").view(np.uint8)[: (total + 7) // 8].copy()


class _BitReader:
    """Reads variable-length fields (≤ 56 bits, most significant bit first) at arbitrary bit offsets."""

    def __init__(self, data: np.ndarray, total_bits: int):
        padded = np.concatenate([np.asarray(data, np.uint8), np.zeros(8, np.uint8)])
        # a big-endian uint64 starting at every byte: an overlapping strided view, nothing is copied
        self.words = np.ndarray((len(padded) - 7,), dtype=">u8", buffer=padded, strides=(1,))
        self._padded, self.pos, self.total = padded, 0, total_bits

    def read(self, lengths: np.ndarray) -> np.ndarray:
        lengths = lengths.astype(np.int64)
        offsets = self.pos + np.cumsum(lengths) - lengths
        self.pos += int(lengths.sum())
        if self.pos > self.total:
            raise ValueError("sampled shard: bit stream too short")
        w = self.words[offsets >> 3].astype(np.uint64) << (offsets & 7).astype(np.uint64)
        out = w >> (64 - np.maximum(lengths, 1)).astype(np.uint64)
        return np.where(lengths > 0, out, np.uint64(0)).astype(np.int64)


class _Groups:
    """Symbols grouped by context (each group in decoding order); ``take(ctx)`` pops the next symbol of each
    query's group, queries in order."""

    def __init__(self, symbols: np.ndarray, sizes: list[int], n_ctx: int):
        if len(sizes) > n_ctx:
            raise ValueError("sampled shard: too many symbol groups")
        self.sizes = np.zeros(n_ctx, np.int64)
        self.sizes[: len(sizes)] = sizes
        if self.sizes.sum() != len(symbols):
            raise ValueError("sampled shard: group sizes do not match the symbols")
        self.symbols = symbols
        self.next = np.cumsum(self.sizes) - self.sizes  # absolute index of each group's next symbol
        self.end = np.cumsum(self.sizes)

    def take(self, ctx: np.ndarray) -> np.ndarray:
        n = np.bincount(ctx, minlength=len(self.sizes))
        if np.any(self.next + n > self.end):
            raise ValueError("sampled shard: a symbol group ran out")
        order = np.argsort(ctx.astype(np.uint8), kind="stable")  # radix sort on small ints
        sc = ctx[order]
        first = np.cumsum(n) - n
        out = np.empty(len(ctx), self.symbols.dtype)
        out[order] = self.symbols[self.next[sc] + np.arange(len(ctx)) - first[sc]]
        self.next += n
        return out

    def done(self) -> bool:
        return bool(np.all(self.next == self.end))


def _grouped(symbols: np.ndarray, ctx: np.ndarray, n_ctx: int) -> tuple[np.ndarray, list[int]]:
    """Symbols (in decoding order) → concatenated per-context groups + group sizes."""
    order = np.argsort(ctx, kind="stable")
    sizes = np.bincount(ctx, minlength=n_ctx).tolist()
    while sizes and sizes[-1] == 0:  # trailing empty groups are implied
        sizes.pop()
    return symbols[order].astype(np.uint8), sizes


def _logp_ctx(counts: np.ndarray, rank_bits: np.ndarray) -> np.ndarray:
    return (np.minimum(counts, 3) - 1) * LOGP_RANK_CLASSES + np.minimum(rank_bits // 2, LOGP_RANK_CLASSES - 1)


def compact_sampled(fields: dict[str, np.ndarray], tokens: np.ndarray, vocab_size: int, num_samples: int,
                    keep_logprobs: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Encoder arrays (``row_len``, ``ids``, ``counts``, ``logp``, and ``n_draws`` per row under a byte budget)
    → (stored arrays, header metadata).

    Stored: ``rank_table`` uint32 (sorted table ids, delta-coded), ``sampled_symbols`` uint8 (the table ids'
    classes, then the count, bucket and log-prob groups), ``sampled_bits`` uint8 (packed gap bits). The metadata holds
    the group sizes and the log-prob quantisation."""
    row_len = fields["row_len"].astype(np.int64)
    ids, counts = fields["ids"].astype(np.int64), fields["counts"].astype(np.int64)
    R, E = len(row_len), len(ids)
    rows = np.repeat(np.arange(R), row_len)
    n_row = fields["n_draws"].astype(np.int64) if "n_draws" in fields else np.full(R, num_samples, np.int64)
    if np.any(np.bincount(rows, weights=counts, minlength=R) != n_row):
        raise ValueError(f"sampled fields: every row's counts must sum to N (num_samples={num_samples}, or the "
                         "row's n_draws)")
    drawn = np.bincount(ids, weights=counts, minlength=vocab_size).astype(np.int64)
    table = np.flatnonzero(drawn >= TABLE_MIN_DRAWS)
    table_cls = _bitlen(drawn[table])
    order = rank_order(tokens, vocab_size, table, table_cls)
    rank_of = np.empty(vocab_size, np.int64)
    rank_of[order] = np.arange(vocab_size)

    r = rank_of[ids]
    perm = np.lexsort((r, rows))  # ranks ascending within each row
    r, c = r[perm], counts[perm]
    starts = np.cumsum(row_len) - row_len
    k = np.arange(E) - np.repeat(starts, row_len)
    first = k == 0
    prev_r = np.concatenate([[0], r[:-1]])
    prev_c = np.concatenate([[0], c[:-1]])
    gap = np.where(first, r, r - prev_r - 1)
    bucket = _bitlen(gap)
    nbits = np.maximum(bucket - 1, 0)
    low = gap - np.where(bucket > 0, np.left_shift(1, nbits), 0)

    dec = np.lexsort((rows, k))  # decoding order: column by column, rows ascending
    syms, meta = [table_cls.astype(np.uint8)], {"entries": E, "groups": {}}
    for name, sym, ctx, n_ctx in (
            ("count", c, np.where(first, 0, np.minimum(prev_c, COUNT_CONTEXTS - 1)), COUNT_CONTEXTS),
            ("bucket", bucket, np.where(first, 0, 1 + _bitlen(prev_r)), GAP_CONTEXTS)):
        s, sizes = _grouped(sym[dec], ctx[dec], n_ctx)
        syms.append(s)
        meta["groups"][name] = sizes
    if keep_logprobs:
        resid = (fields["logp"].astype(np.float64)[perm] - np.log(c / n_row[rows[perm]])) / LOGP_STEP
        q = np.clip(np.round(resid), -LOGP_OFFSET, 255 - LOGP_OFFSET).astype(np.int64) + LOGP_OFFSET
        s, sizes = _grouped(q[dec], _logp_ctx(c, _bitlen(r))[dec], LOGP_CONTEXTS)
        syms.append(s)
        meta["groups"]["logp"] = sizes
        meta.update(logp_step=LOGP_STEP, logp_offset=LOGP_OFFSET)
    if "n_draws" in fields:
        syms.append(n_row.astype(np.uint8))
        meta["groups"]["n"] = [R]
    meta["bits"] = int(nbits.sum())
    out = {"rank_table": np.diff(table, prepend=0).astype(np.uint32),
           "sampled_symbols": np.concatenate(syms),
           "sampled_bits": _pack_bits(low[dec], nbits[dec])}
    return out, meta


def expand_sampled(stored: dict[str, np.ndarray], tokens: np.ndarray, vocab_size: int, num_samples: int,
                   meta: dict) -> dict[str, np.ndarray]:
    """Inverse of :func:`compact_sampled`: ``row_len`` uint8, ``ids`` int32 (rank order within a row),
    ``counts`` uint8, ``logp`` float32 (quantised; absent if not stored), ``n_draws`` uint8 (under a byte budget).
    Raises ValueError on bad data."""
    R = tokens.shape[0] * (tokens.shape[1] - 1)
    table = np.cumsum(stored["rank_table"].astype(np.int64))
    syms, pos = stored["sampled_symbols"], len(table)
    if len(syms) < pos or (len(table) and table[-1] >= vocab_size):
        raise ValueError("sampled shard: bad rank table")
    order = rank_order(tokens, vocab_size, table, syms[:pos].astype(np.int64))

    groups = meta["groups"]
    readers = {}
    for name, n_ctx in (("count", COUNT_CONTEXTS), ("bucket", GAP_CONTEXTS), ("logp", LOGP_CONTEXTS), ("n", 1)):
        if name in groups:
            size = int(sum(groups[name]))
            readers[name] = _Groups(syms[pos: pos + size], groups[name], n_ctx)
            pos += size
    if pos != len(syms):
        raise ValueError("sampled shard: symbol stream length does not match its groups")
    bits = _BitReader(stored["sampled_bits"], meta["bits"])
    has_logp = "logp" in readers
    per_row = "n" in readers
    N = readers["n"].take(np.zeros(R, np.int64)).astype(np.int64) if per_row else np.full(R, num_samples, np.int64)
    if R and N.min() < 1:
        raise ValueError("sampled shard: a row with no draws")

    total = np.zeros(R, np.int64)
    prev_r = np.zeros(R, np.int64)  # the row's previous rank, its bit length, its previous count
    prev_bits = np.zeros(R, np.int64)
    prev_c = np.zeros(R, np.int64)
    cols = []  # per column: (rows, rank, count, q)
    active = np.arange(R)
    for k in range(int(N.max(initial=0))):
        if k:
            active = active[total[active] < N[active]]
        if not len(active):
            break
        ctx = np.zeros(len(active), np.int64) if k == 0 else 1 + prev_bits[active]
        bucket = readers["bucket"].take(ctx).astype(np.int64)
        if bucket.max() >= GAP_CONTEXTS:
            raise ValueError("sampled shard: rank gap bucket out of range")
        nbits = np.maximum(bucket - 1, 0)
        gap = np.where(bucket > 0, np.left_shift(1, nbits), 0) + bits.read(nbits)
        rank = gap if k == 0 else prev_r[active] + 1 + gap
        rank_bits = _bitlen(rank)
        ctx = np.zeros(len(active), np.int64) if k == 0 else np.minimum(prev_c[active], COUNT_CONTEXTS - 1)
        c = readers["count"].take(ctx).astype(np.int64)
        q = readers["logp"].take(_logp_ctx(c, rank_bits)) if has_logp else None
        cols.append((active, rank, c, q))
        prev_r[active], prev_bits[active], prev_c[active] = rank, rank_bits, c
        total[active] += c
    if np.any(total != N) or not all(g.done() for g in readers.values()) or bits.pos != bits.total:
        raise ValueError("sampled shard: entries do not decode to N draws per row")
    row_len = np.zeros(R, np.int64)
    for a, *_ in cols:
        row_len[a] += 1
    starts = np.cumsum(row_len) - row_len
    dest = np.concatenate([starts[a] + k for k, (a, *_) in enumerate(cols)]) if cols else np.zeros(0, np.int64)
    E = len(dest)
    rank, c = np.empty(E, np.int64), np.empty(E, np.int64)
    rank[dest] = np.concatenate([x[1] for x in cols]) if cols else rank
    c[dest] = np.concatenate([x[2] for x in cols]) if cols else c
    if E and (rank.max() >= vocab_size or c.min() == 0):
        raise ValueError("sampled shard: rank beyond the vocabulary or zero count")
    out = {"row_len": row_len.astype(np.uint8), "ids": order[rank].astype(np.int32), "counts": c.astype(np.uint8)}
    if has_logp:
        q = np.empty(E, np.int64)
        q[dest] = np.concatenate([x[3] for x in cols]) if cols else q
        n_entry = np.repeat(N, row_len)
        out["logp"] = ((q - meta["logp_offset"]) * meta["logp_step"] + np.log(c / n_entry)).astype(np.float32)
    if per_row:
        out["n_draws"] = N.astype(np.uint8)
    return out
