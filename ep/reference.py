"""NumPy semantics of dispatch and combine: the specification every backend must match bit-exactly.

bf16 values are carried as ``uint16`` bit patterns (NumPy has no bfloat16).

Dispatch (both modes). Rank ``r`` owns experts ``[r*L, (r+1)*L)``, ``L = E / W``. A token goes to rank ``d``
once if any of its valid slots (``0 <= id < E``; ``-1`` is an unused slot) names an expert of ``d``. On the
receiver every (token, local expert) pair becomes ONE row (an expert named twice by one token still
gives one row). Rows are grouped by local expert ascending; inside an expert by source rank ascending,
then by source token index ascending. FLAT pads each expert's segment with zero rows up to a multiple
of ``expert_alignment``; EXPERT_MAJOR places expert ``e``'s rows at ``[e, 0:count_e]`` of a
``[L, capacity, H]`` array.

Combine. ``row(t, k)`` is the row that slot ``k`` of token ``t`` was dispatched to (two slots naming the
same expert share a row). Rounding, in this order:
1. each expert rank ``d`` forms, for every token it received, ``acc = 0.0f`` then for ``k = 0..K-1`` with
   slot ``k`` owned by ``d``: ``acc = fl32(acc + fl32(w[t,k] * y[row(t,k)]))`` (a float32 multiply, then a
   float32 add: no fused multiply-add), and rounds ``acc`` to bf16 (round to nearest even);
2. the source sums those bf16 partials in ascending rank order: ``acc = 0.0f``;
   ``acc = fl32(acc + partial_d)``, and rounds to bf16. A token with no valid slot combines to zeros.
``weights=None`` means every weight is 1.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .config import DispatchLayout


# ---------------------------------------------------------------------------------------------- bf16
def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


BF16_CANONICAL_NAN = 0x7FFF


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bf16 bit patterns, rounding to nearest even. Every NaN becomes the canonical NaN 0x7FFF,
    as the GPU's one-instruction conversion (cvt.rn.bf16x2.f32) gives it."""
    f = np.ascontiguousarray(values, dtype=np.float32)
    u = f.view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(f)
    if nan.any():
        rounded = np.where(nan, np.uint32(BF16_CANONICAL_NAN), rounded)
    return rounded.astype(np.uint16)


# ---------------------------------------------------------------------------------------------- fp8
E4M3_MAX = 448.0
E4M3_NAN = 0x7F
FP8_GROUP = 128
AMAX_FLOOR = np.float32(1e-4)


def f32_to_e4m3(values: np.ndarray) -> np.ndarray:
    """float32 -> uint8 e4m3 (fn) bit patterns: round to nearest even, magnitudes >= 448 (and inf) saturate to
    448, NaN becomes 0x7F, as the GPU's cvt.rn.satfinite.e4m3x2.f32 gives them."""
    f = np.ascontiguousarray(values, dtype=np.float32)
    sign = ((f.view(np.uint32) >> np.uint32(31)).astype(np.uint8) << np.uint8(7))
    a = np.abs(f).astype(np.float64)
    with np.errstate(invalid="ignore"):
        _, e = np.frexp(np.where(np.isfinite(a), a, 0.0))
        exp = np.maximum(e.astype(np.int64) - 1, -6)              # a = 1.m * 2^exp, or a subnormal of 2^-6
        q = np.rint(a / np.exp2(exp - 3))                          # 3 mantissa bits: exact, round half to even
        carry = q >= 16
        exp = np.where(carry, exp + 1, exp)
        q = np.where(carry, 8.0, q)
        q = np.where(np.isfinite(q), q, 0.0).astype(np.int64)
    bits = np.where(q >= 8, ((exp + 7) << 3) | (q - 8), q).astype(np.uint8)
    out = sign | bits
    out = np.where(a >= E4M3_MAX, sign | np.uint8(0x7E), out)
    return np.where(np.isnan(f), np.uint8(E4M3_NAN), out).astype(np.uint8)


def e4m3_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint8 e4m3 (fn) bit patterns -> float32 (exact)."""
    b = np.asarray(bits, dtype=np.uint8).astype(np.int64)
    sign = np.where(b >> 7, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    mag = np.where(exp == 0, man * 2.0 ** -9, (8 + man) * np.exp2(exp - 10))
    mag = np.where((exp == 15) & (man == 7), np.nan, mag)
    return (sign * mag).astype(np.float32)


def fp8_scales(amax: np.ndarray, round_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, multiplier) of groups with this amax: scale = amax / 448 and multiplier 448 / amax, or with
    round_scale the power of two 2^e, e = ceil(log2(amax / 448)) (biased exponent clamped to [1, 254]), and
    2^-e. amax is floored at 1e-4 first. float32 throughout (IEEE division)."""
    amax = np.fmax(np.asarray(amax, np.float32), AMAX_FLOOR)
    s = (amax / np.float32(E4M3_MAX)).astype(np.float32)
    if not round_scale:
        return s, (np.float32(E4M3_MAX) / amax).astype(np.float32)
    u = s.view(np.uint32)
    e = ((u >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int64) + ((u & np.uint32(0x7FFFFF)) != 0)
    e = np.clip(e, 1, 254).astype(np.uint32)
    return (e << np.uint32(23)).view(np.float32), ((np.uint32(254) - e) << np.uint32(23)).view(np.float32)


def fp8_cast(x: np.ndarray, round_scale: bool = False, ue8m0: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The LL dispatch's in-kernel cast of bf16 rows ``x`` (uint16 [n, H], H % 128 == 0) to e4m3, per 128
    channels: amax = max |x| (NaN ignored), floored at 1e-4; values x * multiplier (float32 multiply) cast to
    e4m3 (f32_to_e4m3). Returns (uint8 [n, H], scales): float32 [n, H/128] scales, or with ``ue8m0`` (which
    implies round_scale) int32 [n, H/512] holding the exponent bytes of four consecutive groups per word
    (group g in byte g % 4, little endian)."""
    round_scale = round_scale or ue8m0
    bits = np.asarray(x, dtype=np.uint16)
    n, H = bits.shape
    if H % FP8_GROUP:
        raise ValueError(f"fp8_cast needs H % {FP8_GROUP} == 0, got {H}")
    f = bf16_to_f32(bits).reshape(n, H // FP8_GROUP, FP8_GROUP)
    amax = np.fmax.reduce(np.abs(f), axis=2) if n else np.zeros((0, H // FP8_GROUP), np.float32)
    scale, mult = fp8_scales(amax, round_scale)
    q = f32_to_e4m3((f * mult[..., None]).astype(np.float32)).reshape(n, H)
    if not ue8m0:
        return q, scale.astype(np.float32)
    if H % (4 * FP8_GROUP):
        raise ValueError(f"UE8M0 scales need H % {4 * FP8_GROUP} == 0, got {H}")
    exps = ((scale.view(np.uint32) >> np.uint32(23)) & np.uint32(0xFF)).astype(np.uint8)
    return q, np.ascontiguousarray(exps).view(np.int32).reshape(n, H // (4 * FP8_GROUP))


# ------------------------------------------------------------------------------------------- routing
def valid_slots(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """bool [T, K]: slots that name an expert (ids in [0, E))."""
    ids = np.asarray(topk_ids)
    return (ids >= 0) & (ids < num_experts)


def routed_ranks(topk_ids: np.ndarray, num_experts: int, world_size: int) -> np.ndarray:
    """bool [T, W]: whether token t is sent to rank d."""
    ids = np.asarray(topk_ids, dtype=np.int64)
    per_rank = num_experts // world_size
    out = np.zeros((ids.shape[0], world_size), dtype=bool)
    valid = valid_slots(ids, num_experts)
    tok, slot = np.nonzero(valid)
    out[tok, ids[tok, slot] // per_rank] = True
    return out


def check_topk_ids(topk_ids: np.ndarray, num_experts: int) -> None:
    ids = np.asarray(topk_ids)
    bad = (ids < -1) | (ids >= num_experts)
    if bad.any():
        t, k = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"topk_ids[{t}, {k}] = {int(ids[t, k])} is outside [-1, {num_experts})")


@dataclass
class RankSlice:
    """The tokens one source rank sends to one destination rank, in source token order."""

    source: int
    token_index: np.ndarray   # int64 [n]
    x: np.ndarray             # [n, row]: the payload rows (bf16 bits uint16, or any byte payload), as sent
    topk_ids: np.ndarray      # int64 [n, K], global expert ids
    weights: np.ndarray       # float32 [n, K]
    scales: np.ndarray | None = None   # [n, S]: per-row scales that travel with the rows, or None


def slice_for_rank(source: int, dest: int, x: np.ndarray, topk_ids: np.ndarray, weights: np.ndarray | None,
                   num_experts: int, world_size: int, scales: np.ndarray | None = None) -> RankSlice:
    """``x``: bf16 bits (uint16) or any payload dtype, kept as it is; ``scales``: rows of per-row scales."""
    ids = np.asarray(topk_ids, dtype=np.int64)
    w = np.ones(ids.shape, np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    sel = np.nonzero(routed_ranks(ids, num_experts, world_size)[:, dest])[0]
    xa = np.asarray(x)
    return RankSlice(source, sel.astype(np.int64), xa[sel], ids[sel], w[sel],
                     None if scales is None else np.asarray(scales)[sel])


# ------------------------------------------------------------------------------------------ dispatch
@dataclass
class ReceivedLayout:
    """One rank's dispatch result and the row map that its combine needs."""

    tokens: np.ndarray            # FLAT [rows, row] or EXPERT_MAJOR [L, capacity, row], the payload's dtype
    counts: np.ndarray            # int64 [L], padding excluded
    offsets: np.ndarray           # int64 [L+1], indexes tokens viewed as [rows, H]
    rows: list                    # per source: int64 [n_s, K], row of each slot owned here, else -1
    capacity: int                 # EXPERT_MAJOR capacity (0 for FLAT)
    layout: DispatchLayout
    scales: np.ndarray | None = None   # the rows' scales, [rows, S] or [L, capacity, S] (padding rows zero)
    topk_ids: np.ndarray | None = None       # TOKEN_MAJOR: int32 [N, K] local expert of each slot, or -1
    topk_weights: np.ndarray | None = None   # TOKEN_MAJOR: float32 [N, K], 0 at -1


def padded(count: int, alignment: int) -> int:
    return -(-count // alignment) * alignment


def dispatch_receive(received: list[RankSlice], rank: int, num_experts: int, world_size: int, hidden: int,
                     alignment: int = 1, layout: DispatchLayout = DispatchLayout.FLAT,
                     capacity: int | None = None) -> ReceivedLayout:
    """Build rank ``rank``'s dispatch output from the slices every source sent it (index = source rank).

    ``capacity`` (EXPERT_MAJOR only): rows per expert; None = the largest padded count this call.
    """
    per_rank = num_experts // world_size
    first = rank * per_rank
    # members[e][s]: indices (into slice s) of the tokens that name local expert e, ascending.
    members = [[np.nonzero(np.any(sl.topk_ids == first + e, axis=1))[0] for sl in received] for e in range(per_rank)]
    counts = np.array([sum(len(m) for m in members[e]) for e in range(per_rank)], dtype=np.int64)
    if layout is DispatchLayout.FLAT:
        sizes = [padded(int(c), alignment) for c in counts]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        cap = 0
    else:
        cap = max([padded(int(c), alignment) for c in counts] + [0]) if capacity is None else capacity
        if counts.size and counts.max() > cap:
            raise ValueError(f"an expert receives {int(counts.max())} rows, more than the capacity {cap}")
        offsets = (np.arange(per_rank + 1, dtype=np.int64) * cap)
    total = int(offsets[-1])
    like = received[0].x if received else np.zeros((0, hidden), np.uint16)
    flat = np.zeros((total, like.shape[1]), dtype=like.dtype)
    sc_like = received[0].scales if received else None
    flat_sc = None if sc_like is None else np.zeros((total, sc_like.shape[1]), dtype=sc_like.dtype)
    rows = [np.full(sl.topk_ids.shape, -1, dtype=np.int64) for sl in received]
    for e in range(per_rank):
        row = int(offsets[e])
        for s, sl in enumerate(received):
            idx = members[e][s]
            n = len(idx)
            if n == 0:
                continue
            targets = np.arange(row, row + n, dtype=np.int64)
            flat[targets] = sl.x[idx]
            if flat_sc is not None:
                flat_sc[targets] = sl.scales[idx]
            slot_hit = sl.topk_ids[idx] == first + e                 # [n, K]
            rows[s][idx] = np.where(slot_hit, targets[:, None], rows[s][idx])
            row += n
    tokens = flat if layout is DispatchLayout.FLAT else flat.reshape(per_rank, cap, flat.shape[1])
    sc = None
    if flat_sc is not None:
        sc = flat_sc if layout is DispatchLayout.FLAT else flat_sc.reshape(per_rank, cap, flat_sc.shape[1])
    return ReceivedLayout(tokens, counts, offsets, rows, cap, layout, sc)


def dispatch_receive_token_major(received: list[RankSlice], rank: int, num_experts: int, world_size: int,
                                 alignment: int = 1) -> ReceivedLayout:
    """TOKEN_MAJOR: one row per received (source token, this rank), sources in rank order, tokens in index
    order; each row's slots as this rank's local experts (-1 where another rank owns the slot's expert, or
    the slot is unused), weights 0 at -1. counts[e]: rows naming local expert e (once per row), and offsets
    the exclusive sum of the counts rounded up to ``alignment`` (counts only: no row is padded)."""
    per_rank = num_experts // world_size
    first = rank * per_rank
    parts = [sl.x for sl in received]
    tokens = np.concatenate(parts) if parts else np.zeros((0, 0), np.uint16)
    scales = None
    if received and received[0].scales is not None:
        scales = np.concatenate([sl.scales for sl in received])
    ids = np.concatenate([sl.topk_ids for sl in received]) if received else np.zeros((0, 1), np.int64)
    w = np.concatenate([sl.weights for sl in received]) if received else np.zeros((0, 1), np.float32)
    mine = (ids >= first) & (ids < first + per_rank)
    local = np.where(mine, ids - first, -1).astype(np.int32)
    counts = np.array([int(np.any(local == e, axis=1).sum()) for e in range(per_rank)], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([padded(int(c), alignment) for c in counts])]).astype(np.int64)
    rows, start = [], 0
    for sl in received:
        rows.append(np.arange(start, start + len(sl.token_index), dtype=np.int64))
        start += len(sl.token_index)
    return ReceivedLayout(tokens, counts, offsets, rows, 0, DispatchLayout.TOKEN_MAJOR, scales, local,
                          np.where(mine, w, np.float32(0)).astype(np.float32))


def row_sources(topk_ids: list, rank: int, num_experts: int, world_size: int, capacity: int):
    """Where the EXPERT_MAJOR rows of ``rank`` come from, given every rank's topk_ids: (src_token int32
    [L, capacity], the source token of each row, -1 past the expert's rows; src_counts int32 [L, W], the rows
    of each local expert from each source). Expert e's rows are its sources' tokens naming e (once each), by
    source rank, then token index."""
    L = num_experts // world_size
    src_token = np.full((L, capacity), -1, np.int32)
    src_counts = np.zeros((L, world_size), np.int32)
    for l in range(L):
        e, row = rank * L + l, 0
        for s, ids in enumerate(topk_ids):
            tokens = np.nonzero((np.asarray(ids) == e).any(axis=1))[0]
            src_token[l, row:row + len(tokens)] = tokens
            src_counts[l, s] = len(tokens)
            row += len(tokens)
    return src_token, src_counts


def pad_token_major(res: ReceivedLayout, rows: int) -> ReceivedLayout:
    """A worst-case TOKEN_MAJOR output: ``rows`` rows, those past the received ones with topk_ids -1 and
    weights 0 (tokens and scales zero here; the GPU leaves them unspecified)."""
    n = res.tokens.shape[0]
    if rows < n:
        raise ValueError(f"{n} received rows exceed the {rows} rows of a worst-case output")

    def pad(a, fill):
        out = np.full((rows,) + a.shape[1:], fill, a.dtype)
        out[:n] = a
        return out
    return replace(res, tokens=pad(res.tokens, 0), scales=None if res.scales is None else pad(res.scales, 0),
                   topk_ids=pad(res.topk_ids, -1), topk_weights=pad(res.topk_weights, 0))


def combine_token_major(num_tokens: int, hidden: int, parts: list[tuple[np.ndarray, np.ndarray]],
                        weight_parts: list | None = None, topk: int = 0):
    """TOKEN_MAJOR combine on the source: ``parts[d] = (token_index [n_d], rows [n_d, H])`` in rank order, the
    rows rank d's caller reduced already; out[t] = bf16(fl32 sum in rank order), rounded once. With
    ``weight_parts[d] = float32 [n_d, K]`` also the weights summed the same way (float32 [T, K])."""
    out = combine_partials(num_tokens, hidden, parts)
    if weight_parts is None:
        return out, None
    acc = np.zeros((num_tokens, topk), np.float32)
    for (token_index, _), wd in zip(parts, weight_parts):
        if len(token_index):
            acc[token_index] = (acc[token_index] + np.asarray(wd, np.float32)).astype(np.float32)
    return out, acc


# ------------------------------------------------------------------------------------------- combine
def expert_partials(expert_rows: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Step 1 of combine on an expert rank: uint16 [n, H] partials of the n tokens one source sent.

    expert_rows: uint16 [total_rows, H] (the expert output viewed flat); rows/weights: [n, K].
    """
    n, k_slots = rows.shape
    hidden = expert_rows.shape[1]
    acc = np.zeros((n, hidden), dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    for k in range(k_slots):
        hit = rows[:, k] >= 0
        if not hit.any():
            continue
        y = bf16_to_f32(expert_rows[rows[hit, k]])
        prod = (w[hit, k][:, None] * y).astype(np.float32)           # float32 multiply, rounded
        acc[hit] = (acc[hit] + prod).astype(np.float32)              # float32 add, rounded
    return f32_to_bf16(acc)


def combine_partials(num_tokens: int, hidden: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Step 2 on the source: ``parts[d] = (token_index [n_d], partial uint16 [n_d, H])`` in rank order."""
    acc = np.zeros((num_tokens, hidden), dtype=np.float32)
    for token_index, partial in parts:
        if len(token_index):
            acc[token_index] = (acc[token_index] + bf16_to_f32(partial)).astype(np.float32)
    return f32_to_bf16(acc)


# ------------------------------------------------------------------------- whole-world convenience
def dispatch_world(xs: list, topk_ids: list, weights: list, num_experts: int, hidden: int, alignment: int = 1,
                   layout: DispatchLayout = DispatchLayout.FLAT, capacity: int | None = None,
                   scales: list | None = None) -> list[ReceivedLayout]:
    """Every rank's dispatch output, given every rank's inputs (index = rank). Used by tests and the bench."""
    world = len(xs)
    sc = scales if scales is not None else [None] * world
    slices = [[slice_for_rank(s, d, xs[s], topk_ids[s], weights[s], num_experts, world, sc[s]) for s in range(world)]
              for d in range(world)]
    if layout is DispatchLayout.TOKEN_MAJOR:
        return [dispatch_receive_token_major(slices[d], d, num_experts, world, alignment) for d in range(world)]
    return [dispatch_receive(slices[d], d, num_experts, world, hidden, alignment, layout, capacity)
            for d in range(world)]


def combine_world(expert_outputs: list, layouts: list[ReceivedLayout], topk_ids: list, weights: list,
                  num_experts: int, hidden: int) -> list[np.ndarray]:
    """Every rank's combine output; ``expert_outputs[d]`` has the shape of ``layouts[d].tokens``."""
    world = len(layouts)
    outs = []
    for s in range(world):
        ids = np.asarray(topk_ids[s], dtype=np.int64)
        w = np.ones(ids.shape, np.float32) if weights[s] is None else np.asarray(weights[s], dtype=np.float32)
        sent = routed_ranks(ids, num_experts, world)
        parts = []
        for d in range(world):
            token_index = np.nonzero(sent[:, d])[0]
            y = np.asarray(expert_outputs[d], dtype=np.uint16).reshape(-1, hidden)
            parts.append((token_index, expert_partials(y, layouts[d].rows[s], w[token_index])))
        outs.append(combine_partials(ids.shape[0], hidden, parts))
    return outs


def combine_token_major_world(expert_outputs: list, layouts: list[ReceivedLayout], topk_ids: list, num_experts: int,
                              hidden: int, weights: list | None = None) -> list:
    """Every rank's TOKEN_MAJOR combine: ``expert_outputs[d]`` is rank d's reduced rows ``[N_d, H]`` (and
    ``weights[d]`` its ``[N_d, K]`` float32, optional). Returns per rank (out uint16 [T, H], weights or None)."""
    world = len(layouts)
    outs = []
    for s in range(world):
        ids = np.asarray(topk_ids[s], dtype=np.int64)
        sent = routed_ranks(ids, num_experts, world)
        parts, wparts = [], []
        for d in range(world):
            token_index = np.nonzero(sent[:, d])[0]
            rows = layouts[d].rows[s]
            parts.append((token_index, np.asarray(expert_outputs[d], np.uint16)[rows]))
            if weights is not None:
                wparts.append(np.asarray(weights[d], np.float32)[rows])
        outs.append(combine_token_major(ids.shape[0], hidden, parts, wparts if weights is not None else None,
                                        ids.shape[1]))
    return outs
