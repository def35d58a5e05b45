"""The NumPy reference (ep.reference) is the spec every backend must match bit-exactly; these tests pin it on
inputs whose answers are known by hand."""
from __future__ import annotations

import numpy as np
import pytest

from ep import DispatchLayout, reference, testing
from ep.reference import bf16_to_f32, combine_world, dispatch_world, f32_to_bf16

FLAT, EXPERT_MAJOR = DispatchLayout.FLAT, DispatchLayout.EXPERT_MAJOR


def bits_of(values) -> np.ndarray:
    """uint16 bf16 bits of float values that are exactly representable in bf16."""
    f = np.asarray(values, dtype=np.float32)
    out = (f.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    assert np.array_equal(bf16_to_f32(out), f), "helper used on a value that is not a bf16"
    return out


def f32_bits(u32) -> np.ndarray:
    return np.asarray(u32, dtype=np.uint32).view(np.float32)


def tag(row: np.ndarray) -> tuple[int, int]:
    """(source rank, token index) of a row made by ep.testing.tagged_tokens."""
    v = bf16_to_f32(row[:3])
    return int(v[0]) - 1, int(v[1]) - 1 + 256 * (int(v[2]) - 1)


def ids(rows) -> np.ndarray:
    """int64 [T, K] routing from nested lists (or a [0, K] array)."""
    out = np.array(rows, dtype=np.int64)
    assert out.ndim == 2
    return out


# ============================================================================================ bf16
def test_bf16_to_f32_puts_the_bits_in_the_upper_half():
    assert bf16_to_f32(np.array([0x3F80, 0xBF80, 0x4049, 0x0000, 0x8000], np.uint16)).tolist() == \
        [1.0, -1.0, 3.140625, 0.0, -0.0]


@pytest.mark.parametrize("value, expected", [
    (1.0, 1.0),
    (1 + 2 ** -8, 1.0),                          # exact tie, 1.0 has an even mantissa: round down
    (1 + 3 * 2 ** -8, 1 + 2 ** -6),              # exact tie, 1 + 2^-7 has an odd mantissa: round up
    (1 + 2 ** -8 + 2 ** -20, 1 + 2 ** -7),       # just above a tie: up
    (1 + 2 ** -8 - 2 ** -20, 1.0),               # just below a tie: down
    (-(1 + 2 ** -8), -1.0),                      # ties are symmetric in sign
    (-(1 + 3 * 2 ** -8), -(1 + 2 ** -6)),
    (2 ** -130, 2 ** -130),                      # subnormals are kept, not flushed
    (2 ** 127 * (2 - 2 ** -8), float("inf")),    # rounds past the largest bf16
    (float("inf"), float("inf")),
    (float("-inf"), float("-inf")),
])
def test_f32_to_bf16_rounds_to_nearest_even(value, expected):
    got = bf16_to_f32(f32_to_bf16(np.array([value], np.float32)))[0]
    assert got == np.float32(expected), (value, got)


def test_largest_finite_f32_rounds_to_infinity_and_largest_bf16_is_kept():
    assert f32_to_bf16(f32_bits([0x7F7FFFFF]))[0] == 0x7F80
    assert f32_to_bf16(f32_bits([0x7F7F0000]))[0] == 0x7F7F
    assert f32_to_bf16(f32_bits([0xFF7FFFFF]))[0] == 0xFF80


@pytest.mark.parametrize("pattern", [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x7F80FFFF])
def test_every_nan_becomes_the_canonical_nan(pattern):
    """Sign and payload are dropped, as cvt.rn.bf16x2.f32 does on the GPU (checked there exhaustively)."""
    out = f32_to_bf16(f32_bits([pattern]))[0]
    assert out == 0x7FFF
    assert np.isnan(bf16_to_f32(np.array([out], np.uint16))[0])


def test_every_bf16_survives_a_round_trip_through_f32():
    everything = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    exponent_all_ones = (everything & 0x7F80) == 0x7F80
    nan = exponent_all_ones & ((everything & 0x007F) != 0)
    assert nan.sum() == 2 * 127
    finite_or_inf = everything[~nan]
    assert np.array_equal(f32_to_bf16(bf16_to_f32(finite_or_inf)), finite_or_inf)


def test_rounding_matches_an_integer_formulation(seed_rng):
    """Round to nearest even written another way: look at the dropped 16 bits."""
    u = seed_rng.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    u = np.concatenate([u, np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F818001, 0x00008000, 0x00018000,
                                     0x7F7F8000, 0x80008000], np.uint32)])
    u = u[~np.isnan(f32_bits(u))]
    upper = (u >> 16).astype(np.int64)
    lower = (u & 0xFFFF).astype(np.int64)
    up = (lower > 0x8000) | ((lower == 0x8000) & (upper & 1 == 1))
    expected = (upper + up).astype(np.uint16)
    assert np.array_equal(f32_to_bf16(f32_bits(u)), expected)


@pytest.fixture
def seed_rng(request):
    seed = np.random.SeedSequence().entropy
    print(f"seed of {request.node.name}: {seed}")      # shown on failure
    return np.random.default_rng(seed)


# ======================================================================================== routing
def test_valid_slots_and_routed_ranks():
    topk = ids([[0, 3], [2, -1], [-1, -1], [1, 1]])
    assert reference.valid_slots(topk, 4).tolist() == [[True, True], [True, False], [False, False], [True, True]]
    assert reference.routed_ranks(topk, 4, 2).tolist() == [[True, True], [False, True], [False, False], [True, False]]


@pytest.mark.parametrize("bad", [4, 100, -2])
def test_check_topk_ids_names_the_first_bad_slot(bad):
    topk = ids([[0, 1], [2, bad]])
    with pytest.raises(ValueError, match=rf"topk_ids\[1, 1\] = {bad} is outside \[-1, 4\)"):
        reference.check_topk_ids(topk, 4)
    reference.check_topk_ids(ids([[0, -1], [-1, 3]]), 4)


# ======================================================================================= dispatch
# Two ranks, four experts (rank 0 owns 0 and 1, rank 1 owns 2 and 3), two slots per token.
HAND_IDS = [ids([[0, 3], [2, -1], [1, 1], [-1, -1]]),      # rank 0: t2 names expert 1 twice, t3 nothing
            ids([[3, 0], [1, 2]])]                         # rank 1
H = 8


def hand_inputs():
    xs = [testing.tagged_tokens(r, len(HAND_IDS[r]), H) for r in range(2)]
    return xs, HAND_IDS, [None, None]


def tags_of(tokens: np.ndarray) -> list:
    return [tag(row) if row.any() else None for row in tokens.reshape(-1, H)]


def test_flat_rows_grouped_by_expert_then_source_rank_then_token():
    xs, topk, w = hand_inputs()
    out = dispatch_world(xs, topk, w, num_experts=4, hidden=H)
    # rank 0: expert 0 <- (r0,t0), (r1,t0); expert 1 <- (r0,t2), (r1,t1)
    assert tags_of(out[0].tokens) == [(0, 0), (1, 0), (0, 2), (1, 1)]
    assert out[0].counts.tolist() == [2, 2] and out[0].offsets.tolist() == [0, 2, 4]
    # rank 1: expert 2 <- (r0,t1), (r1,t1); expert 3 <- (r0,t0), (r1,t0)
    assert tags_of(out[1].tokens) == [(0, 1), (1, 1), (0, 0), (1, 0)]
    assert out[1].counts.tolist() == [2, 2] and out[1].offsets.tolist() == [0, 2, 4]
    assert all(o.layout is FLAT and o.capacity == 0 and o.tokens.dtype == np.uint16 for o in out)


def test_dispatched_rows_are_the_source_rows_bit_for_bit():
    xs, topk, w = hand_inputs()
    out = dispatch_world(xs, topk, w, num_experts=4, hidden=H)
    for row in out[0].tokens:
        s, t = tag(row)
        assert np.array_equal(row, xs[s][t])


def test_rows_map_each_owned_slot_and_a_repeated_expert_shares_one_row():
    xs, topk, w = hand_inputs()
    out = dispatch_world(xs, topk, w, num_experts=4, hidden=H)
    # rows[s]: one line per token that source s sent to this rank, in token order.
    assert out[0].rows[0].tolist() == [[0, -1], [2, 2]]      # r0 sent t0 ([0,3]) and t2 ([1,1]) to rank 0
    assert out[0].rows[1].tolist() == [[-1, 1], [3, -1]]     # r1 sent t0 ([3,0]) and t1 ([1,2])
    assert out[1].rows[0].tolist() == [[-1, 2], [0, -1]]     # r0 sent t0 ([0,3]) and t1 ([2,-1]) to rank 1
    assert out[1].rows[1].tolist() == [[3, -1], [-1, 1]]


def test_unused_slots_are_ignored_and_a_token_without_slots_goes_nowhere():
    xs, topk, w = hand_inputs()
    out = dispatch_world(xs, topk, w, num_experts=4, hidden=H)
    received = [t for o in out for t in tags_of(o.tokens)]
    assert (0, 3) not in received                             # rank 0's t3 has only -1 slots
    assert received.count((0, 1)) == 1                        # rank 0's t1 = [2, -1]: one row, on rank 1


def test_alignment_pads_each_flat_segment_with_zero_rows():
    xs, topk, w = hand_inputs()
    out = dispatch_world(xs, topk, w, num_experts=4, hidden=H, alignment=4)
    assert out[0].counts.tolist() == [2, 2], "counts exclude padding"
    assert out[0].offsets.tolist() == [0, 4, 8], "offsets include padding"
    assert tags_of(out[0].tokens) == [(0, 0), (1, 0), None, None, (0, 2), (1, 1), None, None]
    assert not out[0].tokens[[2, 3, 6, 7]].any(), "padding rows are zero"
    assert out[0].rows[0].tolist() == [[0, -1], [4, 4]]
    assert out[0].rows[1].tolist() == [[-1, 1], [5, -1]]


def test_alignment_of_empty_and_exact_segments():
    topk = [ids([[0], [0], [0], [0], [2]])]            # one rank, E=3: counts 4, 0, 1
    xs = [testing.tagged_tokens(0, 5, H)]
    out = dispatch_world(xs, topk, [None], num_experts=3, hidden=H, alignment=4)[0]
    assert out.counts.tolist() == [4, 0, 1]
    assert out.offsets.tolist() == [0, 4, 4, 8], "a full segment gets no padding, an empty one stays empty"
    assert out.tokens.shape == (8, H)


def test_expert_major_places_expert_rows_at_the_start_of_its_slab():
    xs, topk, w = hand_inputs()
    out = dispatch_world(xs, topk, w, num_experts=4, hidden=H, layout=EXPERT_MAJOR)
    assert out[0].tokens.shape == (2, 2, H) and out[0].capacity == 2, "capacity = the largest count"
    assert out[0].offsets.tolist() == [0, 2, 4]
    assert [tags_of(out[0].tokens[e]) for e in range(2)] == [[(0, 0), (1, 0)], [(0, 2), (1, 1)]]
    assert out[0].layout is EXPERT_MAJOR


def test_expert_major_capacity_pads_with_zeros_and_offsets_are_multiples_of_it():
    xs, topk, w = hand_inputs()
    out = dispatch_world(xs, topk, w, num_experts=4, hidden=H, layout=EXPERT_MAJOR, capacity=5)[1]
    assert out.tokens.shape == (2, 5, H) and out.capacity == 5
    assert out.offsets.tolist() == [0, 5, 10]
    assert out.counts.tolist() == [2, 2]
    assert [tags_of(out.tokens[e][:2]) for e in range(2)] == [[(0, 1), (1, 1)], [(0, 0), (1, 0)]]
    assert not out.tokens[:, 2:].any()
    assert out.rows[0].tolist() == [[-1, 5], [0, -1]]        # rows index tokens viewed as [L * capacity, H]
    assert out.rows[1].tolist() == [[6, -1], [-1, 1]]


def test_expert_major_capacity_defaults_to_the_largest_padded_count():
    xs, topk, w = hand_inputs()
    out = dispatch_world(xs, topk, w, num_experts=4, hidden=H, layout=EXPERT_MAJOR, alignment=4)[0]
    assert out.capacity == 4 and out.tokens.shape == (2, 4, H)


def test_expert_major_rejects_a_capacity_below_the_count():
    xs, topk, w = hand_inputs()
    with pytest.raises(ValueError, match="an expert receives 2 rows, more than the capacity 1"):
        dispatch_world(xs, topk, w, num_experts=4, hidden=H, layout=EXPERT_MAJOR, capacity=1)


def test_a_rank_with_no_tokens_still_receives():
    topk = [ids(np.zeros((0, 2))), ids([[1, 0], [1, -1]])]
    xs = [testing.tagged_tokens(0, 0, H), testing.tagged_tokens(1, 2, H)]
    out = dispatch_world(xs, topk, [None, None], num_experts=2, hidden=H)
    assert tags_of(out[0].tokens) == [(1, 0)]
    assert tags_of(out[1].tokens) == [(1, 0), (1, 1)]
    assert out[0].rows[0].shape == (0, 2)


@pytest.mark.parametrize("layout", [FLAT, EXPERT_MAJOR])
def test_random_routing_rows_are_exactly_the_routed_pairs_in_order(seed_rng, layout):
    W, E, K, T = 4, 12, 3, [9, 0, 300, 4]        # 300 tokens: token indices above 255 use the third tag element
    L = E // W
    topk = [testing.routing("uniform", seed_rng, T[r], E, K, drop=0.3) for r in range(W)]
    for r in range(W):                           # and some tokens name one expert twice
        topk[r][::5, -1] = topk[r][::5, 0]
    xs = [testing.tagged_tokens(r, T[r], H) for r in range(W)]
    out = dispatch_world(xs, topk, [None] * W, num_experts=E, hidden=H, alignment=2, layout=layout)
    for d in range(W):
        flat = out[d].tokens.reshape(-1, H)
        for e in range(L):
            g = d * L + e
            expected = [(s, t) for s in range(W) for t in range(T[s]) if (topk[s][t] == g).any()]
            start = int(out[d].offsets[e])
            got = [tag(row) for row in flat[start:start + int(out[d].counts[e])]]
            assert got == expected, (d, e)
            assert not flat[start + len(got):int(out[d].offsets[e + 1])].any()
        for s in range(W):
            sent = np.nonzero(reference.routed_ranks(topk[s], E, W)[:, d])[0]
            assert out[d].rows[s].shape == (len(sent), K)
            for i, t in enumerate(sent):
                for k in range(K):
                    g = topk[s][t, k]
                    row = out[d].rows[s][i, k]
                    if g // L == d and g >= 0:
                        assert tag(flat[row]) == (s, t)
                        assert out[d].offsets[g - d * L] <= row < out[d].offsets[g - d * L + 1]
                    else:
                        assert row == -1


# ======================================================================================== combine
def identity(layouts):
    return [o.tokens for o in layouts]


def combine_one_token(x_value, topk, weights, world, experts):
    """Combine of one token (rank 0, all elements ``x_value``) through identity experts; other ranks send nothing."""
    xs = [np.full((1, H), bits_of([x_value])[0], np.uint16)] + [np.zeros((0, H), np.uint16)] * (world - 1)
    ids_ = [ids([topk])] + [ids(np.zeros((0, len(topk))))] * (world - 1)
    w = [np.array([weights], np.float32)] + [np.zeros((0, len(topk)), np.float32)] * (world - 1)
    layouts = dispatch_world(xs, ids_, w, experts, H)
    out = combine_world(identity(layouts), layouts, ids_, w, experts, H)
    assert all(o.shape == (0, H) for o in out[1:])
    row = out[0][0]
    assert (row == row[0]).all()
    return int(row[0])


def test_partials_are_rounded_to_bf16_on_each_expert_rank_before_the_sum():
    w = [1.0, 2 ** -8 + 2 ** -16]
    # Both experts on one rank: one float32 sum 1 + 2^-8 + 2^-16, just above the bf16 tie -> 1 + 2^-7.
    assert combine_one_token(1.0, [0, 1], w, world=1, experts=2) == bits_of(1 + 2 ** -7)
    # Experts on two ranks: rank 1's partial bf16(2^-8 (1 + 2^-8)) is a tie -> 2^-8; then 1 + 2^-8 is a tie -> 1.
    assert combine_one_token(1.0, [0, 1], w, world=2, experts=2) == bits_of(1.0)


def test_an_expert_rank_adds_its_slots_in_slot_order_in_float32():
    # 1 + 2^-24 rounds back to 1 in float32, so the two 2^-24 terms vanish when they come after the 1 ...
    assert combine_one_token(1.0, [0, 1, 2, 3], [1.0, 2 ** -24, 2 ** -24, 2 ** -8], world=1, experts=4) == \
        bits_of(1.0)
    # ... and survive (2^-23) when they come first; 1 + 2^-8 + 2^-23 is above the bf16 tie.
    assert combine_one_token(1.0, [0, 1, 2, 3], [2 ** -24, 2 ** -24, 1.0, 2 ** -8], world=1, experts=4) == \
        bits_of(1 + 2 ** -7)


def test_the_source_adds_partials_in_ascending_rank_order():
    # One expert per rank; slots list the experts in reverse, so slot order and rank order differ.
    # Partials by rank: 2^-24, 2^-24, 1, 2^-8 -> (2^-23 + 1) + 2^-8, above the tie.
    assert combine_one_token(1.0, [3, 2, 1, 0], [2 ** -8, 1.0, 2 ** -24, 2 ** -24], world=4, experts=4) == \
        bits_of(1 + 2 ** -7)
    # Partials by rank: 1, 2^-24, 2^-24, 2^-8 -> the 2^-24s vanish, 1 + 2^-8 is a tie -> 1.
    assert combine_one_token(1.0, [3, 2, 1, 0], [2 ** -8, 2 ** -24, 2 ** -24, 1.0], world=4, experts=4) == \
        bits_of(1.0)


def test_identity_experts_with_power_of_two_weights_are_exact():
    # x = small integers, weights 1/2, 1/4, 2 on experts of both ranks: every step is exact.
    E, K = 4, 3
    x_rows = np.array([[1, -2, 3, -4, 5, -6, 7, -8], [8, 7, 6, 5, 4, 3, 2, 1]], np.float32)
    xs = [bits_of(x_rows), np.zeros((0, H), np.uint16)]
    topk = [ids([[0, 1, 3], [2, -1, 1]]), ids(np.zeros((0, K)))]
    w = [np.array([[0.5, 0.25, 2.0], [0.5, 8.0, 0.25]], np.float32), np.zeros((0, K), np.float32)]
    layouts = dispatch_world(xs, topk, w, E, H)
    out = combine_world(identity(layouts), layouts, topk, w, E, H)
    expected = np.stack([x_rows[0] * (0.5 + 0.25 + 2.0), x_rows[1] * (0.5 + 0.25)])
    assert np.array_equal(out[0], bits_of(expected))


def test_a_repeated_expert_counts_once_per_slot_in_combine():
    # Both slots name expert 1: one dispatched row, weighted by 0.5 and by 0.25.
    xs = [bits_of(np.arange(1, H + 1, dtype=np.float32)[None, :])]
    topk = [ids([[1, 1]])]
    w = [np.array([[0.5, 0.25]], np.float32)]
    layouts = dispatch_world(xs, topk, w, 2, H)
    assert layouts[0].tokens.shape == (1, H)
    out = combine_world(identity(layouts), layouts, topk, w, 2, H)
    assert np.array_equal(out[0], bits_of(0.75 * np.arange(1, H + 1, dtype=np.float32)[None, :]))


def test_a_token_with_no_valid_slot_combines_to_zeros():
    xs, topk, _ = hand_inputs()
    layouts = dispatch_world(xs, topk, [None, None], 4, H)
    out = combine_world(identity(layouts), layouts, topk, [None, None], 4, H)
    assert not out[0][3].any(), "rank 0's t3 has only -1 slots"
    assert out[0][0].any()


def test_expert_outputs_are_read_from_the_dispatched_rows():
    """A non-identity expert: y = 2 * x on expert 0 and x / 4 on the others."""
    xs, topk, _ = hand_inputs()
    layouts = dispatch_world(xs, topk, [None, None], 4, H)
    ys = []
    for d, lay in enumerate(layouts):
        scale = np.ones((lay.tokens.shape[0], 1), np.float32) / 4
        if d == 0:
            scale[lay.offsets[0]:lay.offsets[1]] = 2.0
        ys.append(bits_of(bf16_to_f32(lay.tokens) * scale))
    out = combine_world(ys, layouts, topk, [None, None], 4, H)
    x0 = bf16_to_f32(xs[0])
    # rank 0 t1 = [2, -1]: x/4 from rank 1 only.
    assert np.array_equal(out[0][1], f32_to_bf16(x0[1] / 4))
    # rank 0 t2 = [1, 1]: one row of expert 1, counted twice.
    assert np.array_equal(out[0][2], f32_to_bf16(x0[2] / 4 + x0[2] / 4))
    # rank 0 t0 = [0, 3]: partial 2x from rank 0, x/4 from rank 1, each rounded to bf16, then summed.
    expected = f32_to_bf16(bf16_to_f32(f32_to_bf16(2 * x0[0])) + bf16_to_f32(f32_to_bf16(x0[0] / 4)))
    assert np.array_equal(out[0][0], expected)


def test_weights_none_means_ones(seed_rng):
    W, E, K, T = 2, 8, 3, [6, 4]
    topk = [testing.routing("skewed", seed_rng, T[r], E, K, drop=0.2) for r in range(W)]
    xs = [testing.random_tokens(seed_rng, T[r], H) for r in range(W)]
    ones = [np.ones((T[r], K), np.float32) for r in range(W)]
    a = dispatch_world(xs, topk, [None] * W, E, H)
    b = dispatch_world(xs, topk, ones, E, H)
    for la, lb in zip(a, b):
        assert np.array_equal(la.tokens, lb.tokens)
    ys = [testing.random_tokens(seed_rng, lay.tokens.shape[0], H) for lay in a]
    out_none = combine_world(ys, a, topk, [None] * W, E, H)
    out_ones = combine_world(ys, b, topk, ones, E, H)
    for p, q in zip(out_none, out_ones):
        assert np.array_equal(p, q)


def test_combine_of_an_expert_major_layout_uses_the_slab_rows(seed_rng):
    W, E, K, T = 2, 4, 2, [5, 3]
    topk = [testing.routing("uniform", seed_rng, T[r], E, K) for r in range(W)]
    xs = [testing.random_tokens(seed_rng, T[r], H) for r in range(W)]
    w = [testing.random_weights(seed_rng, T[r], K) for r in range(W)]
    flat = dispatch_world(xs, topk, w, E, H)
    # An expert receives at most one row per token: sum(T) rows always fit (7 failed when one expert got all 8).
    major = dispatch_world(xs, topk, w, E, H, layout=EXPERT_MAJOR, capacity=sum(T))
    a = combine_world(identity(flat), flat, topk, w, E, H)
    b = combine_world(identity(major), major, topk, w, E, H)
    for p, q in zip(a, b):
        assert np.array_equal(p, q)


# ------------------------------------------------------------------------------------------------ fp8
def test_every_e4m3_code_survives_a_round_trip_through_f32():
    codes = np.arange(256, dtype=np.uint8)
    f = reference.e4m3_to_f32(codes)
    assert np.array_equal(reference.f32_to_e4m3(f)[~np.isnan(f)], codes[~np.isnan(f)])
    assert np.isnan(f[[0x7F, 0xFF]]).all() and np.isnan(f).sum() == 2


@pytest.mark.parametrize("value, code", [
    (448.0, 0x7E), (-448.0, 0xFE), (460.0, 0x7E), (1e30, 0x7E), (np.inf, 0x7E), (-np.inf, 0xFE), (np.nan, 0x7F),
    (0.0, 0x00), (-0.0, 0x80), (2.0 ** -9, 0x01), (2.0 ** -10, 0x00), (3 * 2.0 ** -10, 0x02), (2.0 ** -6, 0x08),
    (1.0, 0x38), (1.0625, 0x38), (1.1875, 0x3A), (1.125, 0x39), (240.0, 0x77), (416.0, 0x7D), (447.0, 0x7E)])
def test_f32_to_e4m3_rounds_to_nearest_even_and_saturates(value, code):
    assert int(reference.f32_to_e4m3(np.array([value], np.float32))[0]) == code


def test_f32_to_e4m3_matches_ml_dtypes_where_both_are_defined():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(3)
    f = rng.integers(0, 2 ** 32, size=1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    f = f[np.isfinite(f) & (np.abs(f) < 448)]   # ml_dtypes overflows to NaN where the GPU saturates
    assert np.array_equal(f.astype(ml_dtypes.float8_e4m3fn).view(np.uint8), reference.f32_to_e4m3(f))


def test_fp8_cast_scales_each_group_of_128_by_its_amax():
    x = np.zeros((2, 256), np.float32)
    x[0, :128] = np.linspace(-3.5, 7.0, 128)        # amax 7
    x[0, 128:] = 1e-6                               # amax below the floor: 1e-4
    x[1, :] = -2.0
    x[1, 200] = np.nan                              # NaN is ignored by the amax, and casts to NaN
    q, s = reference.fp8_cast(f32_to_bf16(x))
    assert q.shape == (2, 256) and q.dtype == np.uint8 and s.shape == (2, 2) and s.dtype == np.float32
    assert s[0, 0] == np.float32(7.0) / np.float32(448) and s[0, 1] == np.float32(1e-4) / np.float32(448)
    assert s[1, 0] == s[1, 1] == np.float32(2.0) / np.float32(448)
    assert q[0, 127] == 0x7E and q[1, 0] == 0xFE and q[1, 200] == 0x7F     # amax maps to +-448
    back = reference.e4m3_to_f32(q[0, :128]) * s[0, 0]
    assert np.allclose(back, bf16_to_f32(f32_to_bf16(x[0, :128])), rtol=0.07, atol=1e-6)


def test_round_scale_gives_the_next_power_of_two_and_ue8m0_keeps_its_exponent_byte():
    x = np.full((1, 512), 3.0, np.float32)
    x[0, 128:256] = 448.0 * 2.0 ** -3     # amax / 448 exactly 2^-3: stays
    x[0, 256:384] = 1e-20                 # floored at 1e-4
    x[0, 384:] = 1000.0
    bits = f32_to_bf16(x)
    _, s = reference.fp8_cast(bits, round_scale=True)
    # 3/448 -> 2^-7; 56/448 = 2^-3 exactly; 1e-4/448 -> 2^-22; 1000/448 -> 4
    assert list(s[0]) == [2.0 ** -7, 2.0 ** -3, 2.0 ** -22, 4.0]
    q_round, _ = reference.fp8_cast(bits, round_scale=True)
    q_ue, packed = reference.fp8_cast(bits, ue8m0=True)
    assert np.array_equal(q_round, q_ue) and packed.shape == (1, 1) and packed.dtype == np.int32
    exps = packed.view(np.uint8)[0]
    assert list(exps) == [127 - 7, 127 - 3, 127 - 22, 127 + 2]   # group g in byte g % 4


def test_fp8_cast_refuses_rows_that_are_not_whole_groups():
    with pytest.raises(ValueError, match="H % 128"):
        reference.fp8_cast(np.zeros((1, 96), np.uint16))
    with pytest.raises(ValueError, match="H % 512"):
        reference.fp8_cast(np.zeros((1, 256), np.uint16), ue8m0=True)


def test_byte_payloads_and_their_scales_travel_with_their_rows():
    W, E, K = 2, 4, 2
    ids = [np.array([[0, 3], [1, -1]]), np.array([[2, 2], [0, 1]])]
    xs = [np.arange(2 * 8, dtype=np.uint8).reshape(2, 8) + 16 * s for s in range(W)]
    scs = [np.arange(2 * 3, dtype=np.float32).reshape(2, 3) + 100 * s for s in range(W)]
    out = dispatch_world(xs, ids, [None, None], E, 8, scales=scs)
    for d in range(W):
        assert out[d].tokens.dtype == np.uint8 and out[d].scales.dtype == np.float32
        for s in range(W):
            for t in range(2):
                for k in range(K):
                    row = out[d].rows[s][np.nonzero(reference.routed_ranks(ids[s], E, W)[:, d])[0].tolist().index(t), k] \
                        if reference.routed_ranks(ids[s], E, W)[t, d] else -1
                    if row >= 0:
                        assert np.array_equal(out[d].tokens[row], xs[s][t])
                        assert np.array_equal(out[d].scales[row], scs[s][t])
