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

from dataclasses import dataclass

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
    x: np.ndarray             # uint16 [n, H]
    topk_ids: np.ndarray      # int64 [n, K], global expert ids
    weights: np.ndarray       # float32 [n, K]


def slice_for_rank(source: int, dest: int, x: np.ndarray, topk_ids: np.ndarray, weights: np.ndarray | None,
                   num_experts: int, world_size: int) -> RankSlice:
    ids = np.asarray(topk_ids, dtype=np.int64)
    w = np.ones(ids.shape, np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    sel = np.nonzero(routed_ranks(ids, num_experts, world_size)[:, dest])[0]
    return RankSlice(source, sel.astype(np.int64), np.asarray(x, dtype=np.uint16)[sel], ids[sel], w[sel])


# ------------------------------------------------------------------------------------------ dispatch
@dataclass
class ReceivedLayout:
    """One rank's dispatch result and the row map that its combine needs."""

    tokens: np.ndarray            # uint16 FLAT [rows, H] or EXPERT_MAJOR [L, capacity, H]
    counts: np.ndarray            # int64 [L], padding excluded
    offsets: np.ndarray           # int64 [L+1], indexes tokens viewed as [rows, H]
    rows: list                    # per source: int64 [n_s, K], row of each slot owned here, else -1
    capacity: int                 # EXPERT_MAJOR capacity (0 for FLAT)
    layout: DispatchLayout


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
    flat = np.zeros((total, hidden), dtype=np.uint16)
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
            slot_hit = sl.topk_ids[idx] == first + e                 # [n, K]
            rows[s][idx] = np.where(slot_hit, targets[:, None], rows[s][idx])
            row += n
    tokens = flat if layout is DispatchLayout.FLAT else flat.reshape(per_rank, cap, hidden)
    return ReceivedLayout(tokens, counts, offsets, rows, cap, layout)


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
                   layout: DispatchLayout = DispatchLayout.FLAT, capacity: int | None = None) -> list[ReceivedLayout]:
    """Every rank's dispatch output, given every rank's inputs (index = rank). Used by tests and the bench."""
    world = len(xs)
    slices = [[slice_for_rank(s, d, xs[s], topk_ids[s], weights[s], num_experts, world) for s in range(world)]
              for d in range(world)]
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
