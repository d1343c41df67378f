"""Target draws on the teacher's device: a batched inverse-CDF sampler with per-window seeds, and the per-row draw
counts a byte budget picks.

    python -m pytest tests/unit/cache/test_draws.py -q

The sampler (:data:`SAMPLER`, recorded in every sampled cache's parameters, so part of every shard key): per row,
N uniforms drawn on the CPU from the window's own generator (:func:`tasks.cache.encode.window_generator`), sorted,
scaled by the row's total weight and looked up in the row's cumulative weights (``torch.searchsorted``). That is
N i.i.d. draws from ``softmax(logits/T)``, already sorted by id, for the cost of one cumulative sum and N binary
searches per row, on any device, batched over windows; a window's draws depend on its generator and its logits
only, never on how windows are batched. Only the drawn ids and counts (a few hundred bytes per token) leave the
device, never a ``[.., V]`` tensor.

Precision: the cumulative weights are float32 (as ``torch.multinomial`` accumulates them on a GPU), so an id's
probability is exact to about 2⁻²⁴ of its row's total weight (the largest weight being 1): ids rarer than ≈ 6e-8
are drawn with a rounded probability (never one with weight 0).

Byte budget (``cache.bytes_per_token``): each row gets ``n_r`` draws from :data:`N_GRID` chosen per window to
minimise the summed noise of the count estimates, ``Σ_r v_r/n_r`` (``v_r``: the ids the row's pilot found, less
one — the relative noise of the ids with non-negligible mass), under a byte cost modelled from the row's expected
number of distinct ids. Both are estimated from a *pilot* sample drawn with other uniforms (no further pass over V),
independent of the stored draws, so ``n_r`` does not depend on them and ``count/n_r`` stays an unbiased estimate of
the teacher's distribution (a stopping rule that looked at the stored draws would bias it).
"""

from __future__ import annotations

import contextlib
import threading

import torch

SAMPLER = "inverse_cdf_f32"
"""Name of the sampler: the cache key says which one drew a cache's targets."""
MAX_DRAWS = 255
"""Most draws per row (counts are stored in one byte)."""
N_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 255)
"""Draw counts a byte budget chooses from (a short alphabet: the per-row N costs < 4 bits on disk)."""
PILOT = 255
"""Pilot draws per row that estimate how many distinct ids n draws keep, for every n ≤ 255."""
ENTRY_BYTES = 1.328
"""Modelled bytes of one stored (id, count) entry once entropy coded, for a window whose pilot ids have the entropy
:data:`ID_ENTROPY_REF` (:func:`entry_bytes`)."""
ENTRY_BYTES_PER_BIT = 0.373
"""How much more an entry costs per bit of id entropy above :data:`ID_ENTROPY_REF`: ids the coder cannot rank
well (a less predictable text) cost more raw gap bits."""
ID_ENTROPY_REF = 10.40
"""Id entropy (bits) of SmolLM2's pilot draws on Shakespeare. The three constants are fitted so that a budget of
36 B/token lands at 36 on Shakespeare and on the Jargon File (docs/cache-format.md): a model, not a bound."""
FIXED_BYTES = 3.4
"""Modelled bytes per token that are not entries: the token itself, the rank table, headers, held-out extras and
the per-row N; the budget left for entries is ``bytes_per_token − FIXED_BYTES``."""
ENTROPY_DRAWS = 64
"""Pilot draws per row whose ids :func:`entry_bytes` measures."""


def window_uniforms(generators: list[torch.Generator], rows: int, n: int, pilot: int = 0,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per window ``rows × n`` uniforms (the draws), then ``rows × pilot`` more (the pilot), each window from its own
    generator on the CPU (the same numbers on every device). Unsorted: a row that keeps its first ``n_r`` sorts them
    itself (the smallest ``n_r`` of the sorted ``n`` would not be an i.i.d. sample).

    Returns ``([B, rows, n], [B, rows, pilot] or None)`` on ``device``."""
    main, extra = [], []
    for g in generators:
        main.append(torch.rand((rows, n), generator=g))
        if pilot:
            extra.append(torch.rand((rows, pilot), generator=g))
    u = torch.stack(main).to(device)
    return u, (torch.stack(extra).to(device) if pilot else None)


_SCRATCH = threading.local()


@contextlib.contextmanager
def owned():
    """Within this block (this thread), :func:`work_copy` hands back float32 logits themselves: the caller owns them
    and lets the sampler overwrite them (:func:`tasks.cache.encode.encode_shard`: the teacher's output, used once)."""
    _SCRATCH.owned = True
    try:
        yield
    finally:
        _SCRATCH.owned = False


def work_copy(logits: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``logits`` the sampler may overwrite (inside :func:`owned`: float32 logits themselves). On
    the CPU the copy lives in a per-thread buffer reused from call to call: a fresh ``[B, L, V]`` allocation costs
    page faults that take longer than the sampler's own passes over it (a GPU's caching allocator has no such
    cost)."""
    if getattr(_SCRATCH, "owned", False) and logits.dtype == torch.float32 and logits.is_contiguous():
        return logits
    if logits.device.type != "cpu":
        return logits.float().clone() if logits.dtype == torch.float32 else logits.float()
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < logits.numel():
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buf = _SCRATCH.buf = torch.empty(logits.numel(), dtype=torch.float32)
    with torch.no_grad():
        return buf[: logits.numel()].view(logits.shape).copy_(logits)


def row_weights(logits: torch.Tensor, temperature: float,
                lse: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``logits`` ``[B, L, V]`` float32, overwritten in place by the weights ``exp((x − max)/T)`` (no other
    ``[B, L, V]`` buffer is allocated at T = 1). Returns ``(weights, top [B, L], lse1 [B, L])``: the row maximum and
    ``log Σ exp(x)`` at T = 1 (None without ``lse``: one pass over V less, the draws do not need it)."""
    top = logits.amax(dim=-1, keepdim=True)
    w = logits.sub_(top)
    lse1 = None
    if temperature == 1.0:
        w.exp_()
        if lse:
            lse1 = top.squeeze(-1) + w.sum(dim=-1).log()
    else:
        if lse:
            lse1 = top.squeeze(-1) + torch.logsumexp(w, dim=-1)
        w.mul_(1.0 / temperature).exp_()
    return w, top.squeeze(-1), lse1


def collision(weights: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: ``Σ_i p_i²`` of each row of unnormalised ``weights`` ``[B, L, V]`` (exact; one pass over V)."""
    flat = weights.reshape(-1, weights.shape[-1])
    sq = torch.bmm(flat.unsqueeze(1), flat.unsqueeze(-1)).reshape(weights.shape[:-1])
    return sq / weights.sum(dim=-1).square()


def pilot_statistics(pilot_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From a pilot sample ``[B, L, P]`` of i.i.d. draws (in draw order): ``(collision [B, L], distinct [B, L, P])``
    — the unbiased estimate of ``Σ_i p_i²`` (the share of equal pairs among the draws: no pass over V) and the
    distinct ids among the first k + 1 draws, for every k."""
    order = torch.sort(pilot_ids, dim=-1, stable=True)
    s = order.values
    first = torch.ones_like(s, dtype=torch.bool)
    first[..., 1:] = s[..., 1:] != s[..., :-1]
    distinct = torch.zeros_like(first).scatter_(-1, order.indices, first).cumsum(dim=-1)
    # Σ over ids of c(c − 1) from the sorted draws: run lengths c, via the position of each run's start
    P = s.shape[-1]
    pos = torch.arange(P, device=s.device).expand_as(s)
    start = torch.where(first, pos, 0).cummax(dim=-1).values      # start of the run each draw belongs to
    within = pos - start                                           # 0, 1, …, c − 1 along a run
    pairs = 2.0 * within.sum(dim=-1).float()                       # Σ_runs c(c − 1)
    return pairs / (P * (P - 1)), distinct


def lookup(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Ids ``[B, L, n]`` (int64) of uniforms ``u`` ``[B, L, n]`` in the cumulative weights ``cdf`` ``[B, L, V]``
    (ascending where ``u`` is); ``inf`` uniforms (unused slots) give id ``V``."""
    ids = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)
    return torch.where(torch.isfinite(u), ids.clamp(max=cdf.shape[-1] - 1), cdf.shape[-1])


def distinct_prefix(ids: torch.Tensor) -> torch.Tensor:
    """``[B, L, n]``: entry k = distinct ids among draws ``0..k`` of each row of ``ids`` ``[B, L, n]``."""
    return pilot_statistics(ids)[1]


def entry_bytes(pilot_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B]``: modelled bytes per stored entry of each window, from the entropy (bits) of the ids among the distinct
    (row, id) pairs of its first :data:`ENTROPY_DRAWS` pilot draws per row — how well a frequency order ranks
    them. pilot_ids: ``[B, L, P]``."""
    ref = pilot_ids[..., :ENTROPY_DRAWS].sort(dim=-1).values
    first = torch.ones_like(ref, dtype=torch.bool)
    first[..., 1:] = ref[..., 1:] != ref[..., :-1]
    B = ref.shape[0]
    f = torch.zeros(B, vocab + 1, device=ref.device).scatter_add_(1, ref.reshape(B, -1),
                                                                 first.reshape(B, -1).float())
    total = first.reshape(B, -1).sum(dim=-1).float()
    bits = total.log2() - torch.where(f > 0, f * f.clamp(min=1.0).log2(), 0.0).sum(dim=-1) / total
    return (ENTRY_BYTES + ENTRY_BYTES_PER_BIT * (bits - ID_ENTROPY_REF)).clamp(min=1.0, max=2.5)


def budget_draws(variance: torch.Tensor, distinct: torch.Tensor, entry_budget: float,
                 per_entry: torch.Tensor | None = None, iterations: int = 40) -> torch.Tensor:
    """Draws per row (int64 ``[B, L]``, values in :data:`N_GRID`): per window the choice minimising
    ``Σ_r variance_r/n_r`` with modelled bytes ``per_entry·Σ_r distinct_r(n_r) ≤ entry_budget·L``.

    variance: ``[B, L]`` a row's noise per draw (``1 − Σ p²`` for the squared error of the counts; the sampled
    format uses the ids its pilot found, less one: the relative noise of the ids with non-negligible mass); distinct: ``[B, L, PILOT]`` from :func:`distinct_prefix` of a pilot
    sample; per_entry: ``[B]`` bytes per entry (:func:`entry_bytes`; default :data:`ENTRY_BYTES`). A Lagrange
    multiplier per window is bisected (in log space) until the cost fits; rows then take the grid value minimising
    ``variance/n + λ·cost(n)``. When even one draw per row exceeds the budget, every row gets one.
    """
    grid = torch.tensor(N_GRID, device=distinct.device)
    if per_entry is None:
        per_entry = torch.full(distinct.shape[:1], ENTRY_BYTES, device=distinct.device)
    cost = distinct.index_select(-1, grid - 1).float() * per_entry[:, None, None]   # [B, L, G]
    gain = variance.float().clamp(min=0.0).unsqueeze(-1) / grid.float()      # [B, L, G]
    limit = entry_budget * variance.shape[-1]
    lo = torch.full(variance.shape[:1], -30.0, device=distinct.device)       # log λ: every row at 255 draws
    hi = torch.full_like(lo, 10.0)                                            # every row at 1 draw

    def choose(log_lam):
        pick = (gain + log_lam.exp()[:, None, None] * cost).argmin(dim=-1)
        return pick, cost.gather(-1, pick.unsqueeze(-1)).squeeze(-1).sum(dim=-1)

    for _ in range(iterations):
        mid = (lo + hi) / 2
        _, spent = choose(mid)
        fits = spent <= limit
        hi = torch.where(fits, mid, hi)
        lo = torch.where(fits, lo, mid)
    pick, _ = choose(hi)
    return grid[pick]


def unique_counts(ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted draws ``ids`` ``[R, n]`` (unused slots = ``vocab``, at the end of a row) → ``(row_len [R], ids [E],
    counts [E], rows [E])``: per row its distinct ids ascending and how often each was drawn (int64 tensors)."""
    valid = ids < vocab
    start = valid.clone()
    start[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    slot = start.cumsum(dim=-1) - 1                                           # entry index within the row
    counts = torch.zeros_like(ids).scatter_add_(-1, slot.clamp(min=0), valid.long())
    row_len = start.sum(dim=-1)
    keep = torch.arange(ids.shape[1], device=ids.device) < row_len.unsqueeze(-1)
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(-1).expand_as(ids)[keep]
    return row_len, ids[start], counts[keep], rows
