"""The CPU backend over MPI matches ep.reference bit for bit, on every rank, for both modes and layouts.

Run by the Makefile at 1, 2, 4 and 8 ranks::

    EP_BACKEND=cpu mpiexec -n N python -m pytest tests/mpi -q -p no:cacheprovider

Each rank draws its own inputs, the inputs of all ranks are gathered, and the communicator's outputs are
compared with ``ep.reference.dispatch_world`` / ``combine_world`` as uint16 bit patterns. See conftest.py
for how a failure on one rank fails all of them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("mpi4py")

from ep import (CapacityError, CommOverlapConfig, ConfigError, DispatchHandle, DispatchLayout, Fp8Cast,  # noqa: E402
                InvalidStateError, MoECommunicator, MoECommunicatorConfig, PeerInputError, QuantScales, reference,
                testing)
from ep.reference import bf16_to_f32, f32_to_bf16  # noqa: E402

FLAT, EXPERT_MAJOR = DispatchLayout.FLAT, DispatchLayout.EXPERT_MAJOR


def param_id(value) -> str:
    return value.value if isinstance(value, DispatchLayout) else str(value)


# ============================================================================================ cases
@dataclass(frozen=True)
class Case:
    mode: str
    layout: DispatchLayout
    hidden: int
    topk: int
    experts_per_rank: int          # E = experts_per_rank * W
    routing: str                   # "uniform" or "skewed"
    drop: float                    # fraction of -1 slots
    weights: bool                  # random weights, or None (ones)
    alignment: int = 1
    ids_dtype: str = "int64"
    repeat: bool = False           # some tokens name one expert in two slots
    t_max: int = 16

    def __str__(self) -> str:
        return (f"{self.mode}-{self.layout.value}-H{self.hidden}-K{self.topk}-E{self.experts_per_rank}W-{self.routing}"
                f"-drop{self.drop}-{'w' if self.weights else 'now'}-a{self.alignment}-{self.ids_dtype}"
                + ("-repeat" if self.repeat else ""))


# A curated grid, not a product: every value of every axis appears, in varied company.
CASES = [
    Case("ht", FLAT, 64, 3, 4, "uniform", 0.0, True),
    Case("ht", FLAT, 8, 1, 1, "uniform", 0.3, False, ids_dtype="int32"),
    Case("ht", FLAT, 1024, 8, 16, "skewed", 0.0, True, alignment=4, t_max=8),
    Case("ht", FLAT, 64, 8, 16, "skewed", 0.3, False, alignment=4, repeat=True),
    Case("ht", FLAT, 8, 3, 1, "uniform", 0.3, True, alignment=4),
    Case("ht", FLAT, 64, 1, 4, "skewed", 0.0, True, ids_dtype="int32"),
    Case("ht", EXPERT_MAJOR, 64, 3, 4, "uniform", 0.3, True, repeat=True),
    Case("ht", EXPERT_MAJOR, 8, 8, 16, "skewed", 0.0, True, alignment=4),
    Case("ht", EXPERT_MAJOR, 1024, 1, 1, "skewed", 0.0, False, t_max=8),
    Case("ht", EXPERT_MAJOR, 64, 8, 4, "uniform", 0.3, False, alignment=4, ids_dtype="int32"),
    Case("ll", EXPERT_MAJOR, 64, 3, 4, "uniform", 0.0, True, repeat=True),
    Case("ll", EXPERT_MAJOR, 8, 1, 1, "skewed", 0.3, False),
    Case("ll", EXPERT_MAJOR, 1024, 8, 16, "uniform", 0.3, True, t_max=8, ids_dtype="int32"),
    Case("ll", EXPERT_MAJOR, 64, 8, 1, "skewed", 0.0, True),
    Case("ll", FLAT, 64, 8, 16, "skewed", 0.0, False),
    Case("ll", FLAT, 1024, 3, 4, "uniform", 0.3, True, t_max=8),
    Case("ll", FLAT, 8, 3, 1, "skewed", 0.0, True, ids_dtype="int32", repeat=True),
    Case("ll", FLAT, 64, 1, 16, "uniform", 0.3, False),
]


def token_counts(world: int, t_max: int, shift: int) -> list[int]:
    """Tokens per rank: 0, a few, T_max and 1, rotated so that every rank (even a lone one) sees each."""
    pattern = [0, 5, t_max, 1]
    return [pattern[(r + shift) % len(pattern)] for r in range(world)]


# ========================================================================================== helpers
def make_config(mode="ht", *, world: int, experts_per_rank=4, hidden=64, topk=3, t_max=16, alignment=1,
                layout=None, **extra) -> MoECommunicatorConfig:
    return MoECommunicatorConfig(mode=mode, num_experts=experts_per_rank * world, hidden_size=hidden, topk=topk,
                                 max_tokens_per_rank=t_max, expert_alignment=alignment, output_layout=layout, **extra)


@dataclass
class Inputs:
    """This rank's inputs and everyone's (index = rank)."""

    x: np.ndarray
    ids: np.ndarray
    w: np.ndarray | None
    xs: list
    idss: list
    ws: list


def draw_inputs(mpi, cfg, num_tokens: int, *, call=0, routing="uniform", drop=0.0, weights=True,
                ids_dtype="int64", repeat=False) -> Inputs:
    """Fresh random inputs of this rank (never zeros), gathered from every rank.

    weights: True (random), False (None, i.e. ones) or "mixed" (random on even ranks, None on odd ones).
    repeat: every third token names its first expert again in its last slot.
    """
    rng = mpi.rng(call)
    x = testing.random_tokens(rng, num_tokens, cfg.hidden_size)
    ids = testing.routing(routing, rng, num_tokens, cfg.num_experts, cfg.topk, drop)
    if repeat and cfg.topk > 1:
        ids[::3, -1] = ids[::3, 0]
    ids = ids.astype(ids_dtype)
    if weights == "mixed":
        weights = mpi.rank % 2 == 0
    w = testing.random_weights(rng, num_tokens, cfg.topk) if weights else None
    everyone = mpi.allgather((x, ids, w))
    return Inputs(x, ids, w, [e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone])


def expected_dispatch(cfg, world, inp: Inputs) -> list:
    ll = cfg.mode == "ll"
    layout = EXPERT_MAJOR if ll or cfg.layout is EXPERT_MAJOR else FLAT
    capacity = world * cfg.max_tokens_per_rank if ll else None
    return reference.dispatch_world(inp.xs, inp.idss, inp.ws, cfg.num_experts, cfg.hidden_size, cfg.expert_alignment,
                                    layout, capacity)


def check_dispatch(out, ref, cfg, world) -> None:
    """``out`` (this rank's DispatchOutput) equals ``ref`` (its ReceivedLayout) bit for bit."""
    L, H = cfg.num_experts // world, cfg.hidden_size
    tokens = np.asarray(out.tokens)
    counts = np.asarray(out.num_tokens_per_expert)
    offsets = np.asarray(out.expert_offsets)
    assert out.layout is cfg.layout
    assert tokens.dtype == np.uint16
    assert counts.dtype == np.int32 and np.array_equal(counts, ref.counts), (counts, ref.counts)
    assert offsets.dtype == np.int64 and np.array_equal(offsets, ref.offsets), (offsets, ref.offsets)
    if cfg.mode == "ht":
        assert out.num_tokens_per_expert_host == ref.counts.tolist()
        assert tokens.shape == ref.tokens.shape
        assert np.array_equal(tokens, ref.tokens), "HT tokens (padding rows included) differ from the reference"
        return
    assert out.num_tokens_per_expert_host is None, "LL never synchronizes with the host"
    capacity = world * cfg.max_tokens_per_rank
    assert tokens.shape == ((L, capacity, H) if cfg.layout is EXPERT_MAJOR else (L * capacity, H))
    slabs = tokens.reshape(L, capacity, H)
    for e in range(L):
        n = int(ref.counts[e])       # rows past count_e are unspecified in LL
        assert np.array_equal(slabs[e, :n], ref.tokens[e, :n]), f"LL rows of local expert {e} differ"


def expert_scale(global_expert: int) -> float:
    """A different power of two per expert: the 'MLP' stays exact, but which expert a row went to matters."""
    return 2.0 ** (global_expert % 5 - 2)


def mlp(tokens: np.ndarray, offsets, rank: int, local_experts: int) -> np.ndarray:
    """y = bf16(x * c_e) for the rows of each local expert (padding stays zero); same shape as ``tokens``."""
    H = tokens.shape[-1]
    flat = np.asarray(tokens).reshape(-1, H)
    scale = np.zeros((flat.shape[0], 1), np.float32)
    offsets = np.asarray(offsets)
    for e in range(local_experts):
        scale[offsets[e]:offsets[e + 1]] = expert_scale(rank * local_experts + e)
    return f32_to_bf16(bf16_to_f32(flat) * scale).reshape(tokens.shape)


def expected_combine(cfg, world, rank, refs, inp: Inputs, experts="mlp") -> np.ndarray:
    L = cfg.num_experts // world
    ys = [r.tokens if experts == "identity" else mlp(r.tokens, r.offsets, d, L) for d, r in enumerate(refs)]
    return reference.combine_world(ys, refs, inp.idss, inp.ws, cfg.num_experts, cfg.hidden_size)[rank]


def check_combine(got, expected, num_tokens, hidden) -> None:
    got = np.asarray(got)
    assert got.dtype == np.uint16 and got.shape == (num_tokens, hidden)
    assert np.array_equal(got, expected), f"combine differs in {int((got != expected).sum())} elements"


def round_trip(mpi, comm, inp: Inputs, *, experts="mlp", what=""):
    """One dispatch and one combine on ``comm``, both checked against the reference. Returns the handle."""
    cfg, W, r = comm.config, comm.world_size, comm.rank
    out, handle = comm.dispatch(inp.x, inp.ids, inp.w)
    with mpi.checking(f"dispatch {what}"):
        refs = expected_dispatch(cfg, W, inp)
        check_dispatch(out, refs[r], cfg, W)
        assert isinstance(handle, DispatchHandle) and handle.num_tokens == inp.x.shape[0]
        y = out.tokens if experts == "identity" else mlp(out.tokens, out.expert_offsets, r, comm.num_local_experts)
    got = comm.combine(y, handle)
    with mpi.checking(f"combine {what}"):
        check_combine(got, expected_combine(cfg, W, r, refs, inp, experts), inp.x.shape[0], cfg.hidden_size)
    return handle


# ======================================================================= dispatch/combine vs reference
@pytest.mark.parametrize("case", CASES, ids=str)
def test_dispatch_and_combine_match_the_reference(mpi, communicators, case):
    W = mpi.size
    if case.topk > case.experts_per_rank * W:
        pytest.skip(f"topk {case.topk} > num_experts {case.experts_per_rank * W}")
    cfg = make_config(case.mode, world=W, experts_per_rank=case.experts_per_rank, hidden=case.hidden,
                      topk=case.topk, t_max=case.t_max, alignment=case.alignment, layout=case.layout)
    T = token_counts(W, case.t_max, shift=CASES.index(case))
    inp = draw_inputs(mpi, cfg, T[mpi.rank], routing=case.routing, drop=case.drop, weights=case.weights,
                      ids_dtype=case.ids_dtype, repeat=case.repeat)
    comm = communicators(cfg)
    with mpi.checking("communicator properties"):
        assert (comm.rank, comm.world_size, comm.backend) == (mpi.rank, W, "cpu")
    round_trip(mpi, comm, inp)


@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_every_token_row_comes_from_its_source_rank_and_index(mpi, communicators, mode):
    """Tagged rows (rank, token index in the first elements): the received order, read directly."""
    W, r = mpi.size, mpi.rank
    cfg = make_config(mode, world=W, experts_per_rank=2, hidden=16, topk=2, t_max=8)
    rng = mpi.rng()
    ids = testing.routing("uniform", rng, 8, cfg.num_experts, 2, drop=0.2)
    x = testing.tagged_tokens(r, 8, 16)
    all_ids = mpi.allgather(ids)
    comm = communicators(cfg)
    out, _ = comm.dispatch(x, ids)
    with mpi.checking("tagged rows"):
        slabs = np.asarray(out.tokens).reshape(-1, 16)
        offsets = np.asarray(out.expert_offsets)
        for e in range(comm.num_local_experts):
            g = r * comm.num_local_experts + e
            n = int(np.asarray(out.num_tokens_per_expert)[e])
            rows = slabs[offsets[e]:offsets[e] + n]
            got = [(int(v[0]) - 1, int(v[1]) - 1) for v in bf16_to_f32(rows[:, :2])]
            expected = [(s, t) for s in range(W) for t in range(8) if (all_ids[s][t] == g).any()]
            assert got == expected


# ============================================================================= many calls in a row
@pytest.mark.parametrize("mode, layout", [("ht", None), ("ht", EXPERT_MAJOR), ("ll", None), ("ll", FLAT)],
                         ids=param_id)
def test_many_calls_with_changing_routing_on_one_communicator(mpi, communicators, mode, layout):
    W = mpi.size
    cfg = make_config(mode, world=W, experts_per_rank=4, hidden=32, topk=4, t_max=12, layout=layout,
                      alignment=2 if mode == "ht" else 1)
    comm = communicators(cfg)
    for call in range(6):
        T = token_counts(W, cfg.max_tokens_per_rank, shift=call)[mpi.rank]
        inp = draw_inputs(mpi, cfg, T, call=call, routing=("uniform", "skewed")[call % 2], drop=0.3 * (call % 3 == 2),
                          weights=(True, False, "mixed")[call % 3], ids_dtype=("int64", "int32")[call % 2],
                          repeat=call % 2 == 1)
        round_trip(mpi, comm, inp, experts=("identity", "mlp")[call % 2], what=f"call {call}")


def test_ll_two_dispatches_in_flight_then_their_combines(mpi, communicators):
    W, r = mpi.size, mpi.rank
    cfg = make_config("ll", world=W, hidden=32, topk=3, t_max=8)
    comm = communicators(cfg)
    a = draw_inputs(mpi, cfg, token_counts(W, 8, 1)[r], call=0)
    b = draw_inputs(mpi, cfg, token_counts(W, 8, 2)[r], call=1, routing="skewed", weights=False)
    out_a, ha = comm.dispatch(a.x, a.ids, a.w)
    out_b, hb = comm.dispatch(b.x, b.ids, b.w)
    with mpi.checking("dispatches"):
        refs_a, refs_b = expected_dispatch(cfg, W, a), expected_dispatch(cfg, W, b)
        check_dispatch(out_b, refs_b[r], cfg, W)
        ya = mlp(refs_a[r].tokens, refs_a[r].offsets, r, comm.num_local_experts)   # out_a's rows may be reused
        yb = mlp(out_b.tokens, out_b.expert_offsets, r, comm.num_local_experts)
    got_a = comm.combine(ya, ha)        # one dispatch old: still valid
    with mpi.checking("first combine"):
        check_combine(got_a, expected_combine(cfg, W, r, refs_a, a), a.x.shape[0], 32)
        got_a = got_a.copy()            # an LL combine's output is owned: the next combine overwrites it
    got_b = comm.combine(yb, hb)
    with mpi.checking("second combine"):
        check_combine(got_b, expected_combine(cfg, W, r, refs_b, b), b.x.shape[0], 32)


def test_ll_a_handle_two_dispatches_old_is_refused(mpi, communicators):
    W, r = mpi.size, mpi.rank
    cfg = make_config("ll", world=W, hidden=16, topk=2, t_max=8)
    comm = communicators(cfg)
    inps = [draw_inputs(mpi, cfg, 4, call=c) for c in range(3)]
    handles = [comm.dispatch(i.x, i.ids, i.w)[1] for i in inps]
    mpi.raises(InvalidStateError, comm.combine, np.zeros((comm.num_local_experts, W * 8, 16), np.uint16), handles[0],
               match="2 dispatches old")
    with mpi.checking("references"):
        refs = expected_dispatch(cfg, W, inps[1])
        y = mlp(refs[r].tokens, refs[r].offsets, r, comm.num_local_experts)
    got = comm.combine(y, handles[1])   # one dispatch old: works, and the refusal broke nothing
    with mpi.checking("combine of the handle one dispatch old"):
        check_combine(got, expected_combine(cfg, W, r, refs, inps[1]), 4, 16)


def test_ht_handles_do_not_expire(mpi, communicators):
    W, r = mpi.size, mpi.rank
    cfg = make_config("ht", world=W, hidden=16, topk=2, t_max=8)
    comm = communicators(cfg)
    first = draw_inputs(mpi, cfg, 5, call=0)
    out, handle = comm.dispatch(first.x, first.ids, first.w)
    for call in range(1, 4):
        other = draw_inputs(mpi, cfg, 3, call=call)
        comm.dispatch(other.x, other.ids, other.w)
    got = comm.combine(out.tokens, handle)
    with mpi.checking("combine of the first handle"):
        refs = expected_dispatch(cfg, W, first)
        check_combine(got, expected_combine(cfg, W, r, refs, first, "identity"), 5, 16)


# ==================================================================================== owned output
def test_owned_output_views_one_buffer_that_the_next_dispatch_overwrites(mpi, communicators):
    W, r = mpi.size, mpi.rank
    cfg = make_config("ht", world=W, hidden=32, topk=3, t_max=12, alignment=2, owned_output=True)
    comm = communicators(cfg)
    first = draw_inputs(mpi, cfg, token_counts(W, 12, shift=1)[r], call=0, routing="skewed")
    out1, handle1 = comm.dispatch(first.x, first.ids, first.w)
    refs1 = expected_dispatch(cfg, W, first)
    with mpi.checking("first owned dispatch"):
        check_dispatch(out1, refs1[r], cfg, W)
        kept = np.array(out1.tokens, copy=True)
    second = draw_inputs(mpi, cfg, token_counts(W, 12, shift=2)[r], call=1)
    out2, handle2 = comm.dispatch(second.x, second.ids, second.w)
    refs2 = expected_dispatch(cfg, W, second)
    with mpi.checking("second owned dispatch, and the first output's view now shows it"):
        check_dispatch(out2, refs2[r], cfg, W)
        n = min(len(out1.tokens), len(out2.tokens))
        assert np.array_equal(np.asarray(out1.tokens)[:n], np.asarray(out2.tokens)[:n])
    # The first handle still combines: the caller kept a copy of the first output.
    y = mlp(kept, refs1[r].offsets, r, comm.num_local_experts)
    got = comm.combine(y, handle1)
    with mpi.checking("combine of the first handle with the kept rows"):
        check_combine(got, expected_combine(cfg, W, r, refs1, first), len(first.x), 32)


# ================================================================================= cached dispatch
@pytest.mark.parametrize("layout", [FLAT, EXPERT_MAJOR], ids=param_id)
def test_cached_dispatch_gives_the_uncached_output(mpi, communicators, layout):
    W, r = mpi.size, mpi.rank
    cfg = make_config("ht", world=W, hidden=64, topk=4, t_max=16, layout=layout, alignment=4)
    comm = communicators(cfg)
    T = token_counts(W, 16, shift=3)[r]
    first = draw_inputs(mpi, cfg, T, call=0, routing="skewed", drop=0.3)
    _, handle = comm.dispatch(first.x, first.ids, first.w)
    # Same routing, new tokens and weights.
    rng = mpi.rng(1)
    second = Inputs(testing.random_tokens(rng, T, 64), first.ids, testing.random_weights(rng, T, 4), [], [], [])
    everyone = mpi.allgather((second.x, second.w))
    second.xs, second.idss, second.ws = [e[0] for e in everyone], first.idss, [e[1] for e in everyone]
    cached, cached_handle = comm.dispatch(second.x, second.ids, second.w, previous_handle=handle)
    uncached, uncached_handle = comm.dispatch(second.x, second.ids, second.w)
    with mpi.checking("cached vs uncached dispatch"):
        refs = expected_dispatch(cfg, W, second)
        check_dispatch(cached, refs[r], cfg, W)
        check_dispatch(uncached, refs[r], cfg, W)
        y = mlp(cached.tokens, cached.expert_offsets, r, comm.num_local_experts)
    got_cached = comm.combine(y, cached_handle)
    got_uncached = comm.combine(y, uncached_handle)
    with mpi.checking("combine through the cached handle"):
        expected = expected_combine(cfg, W, r, refs, second)
        check_combine(got_cached, expected, T, 64)
        check_combine(got_uncached, expected, T, 64)
    again, _ = comm.dispatch(second.x, second.ids, second.w, previous_handle=cached_handle)   # a cached handle chains
    with mpi.checking("chained cached dispatch"):
        check_dispatch(again, refs[r], cfg, W)


def test_debug_checks_refuse_a_cached_dispatch_with_other_routing(mpi, communicators, monkeypatch):
    monkeypatch.setenv("EP_DEBUG_CHECKS", "1")      # every rank: the communicator reads its knobs when built
    W = mpi.size
    cfg = make_config("ht", world=W, hidden=16, topk=2, t_max=8)
    comm = communicators(cfg)
    inp = draw_inputs(mpi, cfg, 4)
    _, handle = comm.dispatch(inp.x, inp.ids, inp.w)
    other = inp.ids.copy()
    other[0] = (other[0] + 1) % cfg.num_experts
    mpi.raises(ValueError, comm.dispatch, inp.x, other, inp.w, previous_handle=handle,
               match="topk_ids differ from the routing previous_handle was made for")
    cached, _ = comm.dispatch(inp.x, inp.ids.astype(np.int32), inp.w, previous_handle=handle)   # same routing
    with mpi.checking("cached dispatch with the same routing"):
        check_dispatch(cached, expected_dispatch(cfg, W, inp)[mpi.rank], cfg, W)
    good_call(mpi, comm)


def test_previous_handle_with_another_token_count_raises(mpi, communicators):
    W, r = mpi.size, mpi.rank
    cfg = make_config("ht", world=W, hidden=16, topk=2, t_max=8)
    comm = communicators(cfg)
    inp = draw_inputs(mpi, cfg, 4)
    _, handle = comm.dispatch(inp.x, inp.ids, inp.w)
    more = draw_inputs(mpi, cfg, 5, call=1)
    mpi.raises(ValueError, comm.dispatch, more.x, more.ids, more.w, previous_handle=handle,
               match="previous_handle was made for 4 tokens, x has 5", what="every rank changes T")
    # Only rank 0 changes T: it raises ValueError, the others learn that a peer's input was invalid.
    mine = more if r == 0 else inp
    expected = ValueError if r == 0 else PeerInputError
    mpi.raises(expected, comm.dispatch, mine.x, mine.ids, mine.w, previous_handle=handle, what="rank 0 changes T")
    round_trip(mpi, comm, draw_inputs(mpi, cfg, 3, call=2), what="after the refusals")


# ====================================================================================== bad inputs
def good_call(mpi, comm, call=99):
    """A normal dispatch + combine on every rank, checked: the communicator still works."""
    T = token_counts(comm.world_size, comm.config.max_tokens_per_rank, shift=call)[comm.rank]
    round_trip(mpi, comm, draw_inputs(mpi, comm.config, T, call=call), what="the call after a refusal")


def small(mode, world, **kw):
    return make_config(mode, world=world, hidden=16, topk=2, t_max=8, **kw)


MODES = ["ht", "ll"]


@pytest.mark.parametrize("mode", MODES)
def test_x_of_the_wrong_dtype_raises_type_error(mpi, communicators, mode):
    comm = communicators(small(mode, mpi.size))
    inp = draw_inputs(mpi, comm.config, 4)
    mpi.raises(TypeError, comm.dispatch, bf16_to_f32(inp.x), inp.ids, match="x: expected dtype uint16 or bfloat16")
    mpi.raises(TypeError, comm.dispatch, inp.x.view(np.int16), inp.ids, match="x: expected dtype")
    good_call(mpi, comm)


@pytest.mark.parametrize("mode", MODES)
def test_x_of_the_wrong_shape_raises_value_error(mpi, communicators, mode):
    comm = communicators(small(mode, mpi.size))
    inp = draw_inputs(mpi, comm.config, 4)
    wide = np.zeros((4, 24), np.uint16)
    mpi.raises(ValueError, comm.dispatch, wide, inp.ids, match=r"x: expected shape .*16.*, got \(4, 24\)")
    mpi.raises(ValueError, comm.dispatch, inp.x.reshape(-1), inp.ids, match="x: expected shape")
    mpi.raises(ValueError, comm.dispatch, np.asfortranarray(np.ones((4, 16), np.uint16))[:, ::-1], inp.ids,
               match="C-contiguous")
    good_call(mpi, comm)


@pytest.mark.parametrize("mode", MODES)
def test_more_tokens_than_max_tokens_per_rank_raise_capacity_error(mpi, communicators, mode):
    comm = communicators(small(mode, mpi.size))
    rng = mpi.rng()
    x = testing.random_tokens(rng, 9, 16)
    ids = testing.uniform_routing(rng, 9, comm.config.num_experts, 2)
    error = mpi.raises(CapacityError, comm.dispatch, x, ids, match="9 tokens exceed max_tokens_per_rank=8")
    with mpi.checking("CapacityError is a ValueError"):
        assert isinstance(error, ValueError)
    good_call(mpi, comm)


@pytest.mark.parametrize("mode", MODES)
def test_topk_ids_of_a_float_dtype_raise_type_error(mpi, communicators, mode):
    comm = communicators(small(mode, mpi.size))
    inp = draw_inputs(mpi, comm.config, 4)
    mpi.raises(TypeError, comm.dispatch, inp.x, inp.ids.astype(np.float32),
               match="topk_ids: expected dtype int32 or int64")
    mpi.raises(TypeError, comm.dispatch, inp.x, inp.ids.astype(np.int16), match="topk_ids: expected dtype")
    mpi.raises(ValueError, comm.dispatch, inp.x, inp.ids[:, :1], match=r"topk_ids: expected shape \(4, 2\)")
    mpi.raises(ValueError, comm.dispatch, inp.x, inp.ids[:3], match=r"topk_ids: expected shape \(4, 2\), got \(3, 2\)")
    good_call(mpi, comm)


@pytest.mark.parametrize("mode", MODES)
def test_weights_of_the_wrong_shape_or_dtype_raise(mpi, communicators, mode):
    comm = communicators(small(mode, mpi.size))
    inp = draw_inputs(mpi, comm.config, 4)
    mpi.raises(ValueError, comm.dispatch, inp.x, inp.ids, inp.w[:, :1], match=r"weights: expected shape \(4, 2\)")
    mpi.raises(ValueError, comm.dispatch, inp.x, inp.ids, inp.w.T.copy(), match="weights: expected shape")
    mpi.raises(TypeError, comm.dispatch, inp.x, inp.ids, inp.w.astype(np.float64),
               match="weights: expected dtype float32")
    good_call(mpi, comm)


@pytest.mark.parametrize("bad_id", ["E", "-2"])
def test_an_invalid_ht_expert_id_on_one_rank_fails_every_rank_in_that_call(mpi, communicators, bad_id):
    W, r = mpi.size, mpi.rank
    comm = communicators(small("ht", W))
    E = comm.config.num_experts
    inp = draw_inputs(mpi, comm.config, 4)
    culprit = W - 1 if bad_id == "E" else 0
    ids = inp.ids.copy()
    if r == culprit:
        ids[2, 1] = E if bad_id == "E" else -2
        expected, match = ValueError, rf"topk_ids\[2, 1\] = {ids[2, 1]} is outside \[-1, {E}\)"
    else:
        expected, match = PeerInputError, rf"rank\(s\) \[{culprit}\] failed the input checks of this dispatch " \
                                          rf"\(rank {culprit}: ValueError in argument topk_ids\)"
    mpi.raises(expected, comm.dispatch, inp.x, ids, inp.w, match=match)
    good_call(mpi, comm)


@pytest.mark.parametrize("bad_id", ["E", "-2"])
def test_an_invalid_ll_expert_id_is_an_unused_slot_reported_on_every_rank_in_the_next_call(mpi, communicators, bad_id):
    """As on GPUs, where LL never waits for the host: the slot is dropped, and the next call raises everywhere."""
    W, r = mpi.size, mpi.rank
    comm = communicators(small("ll", W))
    E = comm.config.num_experts
    inp = draw_inputs(mpi, comm.config, 4)
    culprit = W - 1 if bad_id == "E" else 0
    ids = inp.ids.copy()
    if r == culprit:
        ids[2, 1] = E if bad_id == "E" else -2
    out, _ = comm.dispatch(inp.x, ids, inp.w)
    dropped = inp.ids.copy()
    if r == culprit:
        dropped[2, 1] = -1
    everyone = mpi.allgather(dropped)
    with mpi.checking("the invalid slot counts as unused"):
        want = expected_dispatch(comm.config, W, dataclasses.replace(inp, ids=dropped, idss=everyone))[r]
        check_dispatch(out, want, comm.config, W)
    if r == culprit:
        expected, match = ValueError, rf"an earlier LL dispatch got topk_ids\[2, 1\] = {ids[2, 1]} outside"
    else:
        expected, match = PeerInputError, rf"rank {culprit}: ValueError in argument topk_ids of an earlier call"
    mpi.raises(expected, comm.dispatch, inp.x, inp.ids, inp.w, match=match)
    good_call(mpi, comm)


@pytest.mark.parametrize("hook", [False, True], ids=["plain", "hook"])
def test_ll_row_sources_name_each_rows_source_token_and_each_sources_rows(mpi, communicators, hook):
    """row_sources: per local expert, the source token of every row and the rows from every source (DeepEP's
    src_info / layout_range); refused before the receive hook, for HT, and for a handle too old to combine."""
    W, r = mpi.size, mpi.rank
    cfg = make_config("ll", world=W, hidden=16, topk=3, t_max=8)
    comm = communicators(cfg)
    inp = draw_inputs(mpi, cfg, token_counts(W, 8, 1)[r], drop=0.2, repeat=True)
    if hook:
        out, handle, recv = comm.dispatch(inp.x, inp.ids, inp.w, return_recv_hook=True)
        mpi.raises(InvalidStateError, comm.row_sources, handle, match="receive hook")
        recv()
    else:
        out, handle = comm.dispatch(inp.x, inp.ids, inp.w)
    src_token, src_counts = comm.row_sources(handle)
    with mpi.checking("row sources"):
        want_token, want_counts = reference.row_sources(inp.idss, r, cfg.num_experts, W, W * 8)
        assert np.array_equal(np.asarray(src_token), want_token)
        assert np.array_equal(np.asarray(src_counts), want_counts)
        assert np.array_equal(np.asarray(src_counts).sum(axis=1), np.asarray(out.num_tokens_per_expert))
    for _ in range(2):   # two newer dispatches: the handle can no longer be combined, nor asked
        comm.dispatch(inp.x, inp.ids, inp.w)
    mpi.raises(InvalidStateError, comm.row_sources, handle)
    ht = communicators(small("ht", W))
    hinp = draw_inputs(mpi, ht.config, 4)
    _, hh = ht.dispatch(hinp.x, hinp.ids, hinp.w)
    mpi.raises(ValueError, ht.row_sources, hh, match="mode='ll' only")


def test_debug_checks_make_ll_check_expert_ids_in_the_call(mpi, communicators, monkeypatch):
    monkeypatch.setenv("EP_DEBUG_CHECKS", "1")
    W, r = mpi.size, mpi.rank
    comm = communicators(small("ll", W))
    inp = draw_inputs(mpi, comm.config, 4)
    ids = inp.ids.copy()
    if r == 0:
        ids[1, 0] = comm.config.num_experts
    mpi.raises(ValueError if r == 0 else PeerInputError, comm.dispatch, inp.x, ids, inp.w,
               match=r"is outside" if r == 0 else r"rank\(s\) \[0\] failed the input checks")
    good_call(mpi, comm)


@pytest.mark.parametrize("mode", MODES)
def test_a_handle_from_another_communicator_raises(mpi, communicators, mode):
    cfg = small(mode, mpi.size)
    one, other = communicators(cfg), communicators(cfg)
    inp = draw_inputs(mpi, cfg, 4)
    out, handle = one.dispatch(inp.x, inp.ids, inp.w)
    mpi.raises(InvalidStateError, other.combine, out.tokens, handle, match="handle comes from another communicator")
    if mode == "ht":
        mpi.raises(InvalidStateError, other.dispatch, inp.x, inp.ids, inp.w, previous_handle=handle,
                   match="previous_handle comes from another communicator")
    mpi.raises(TypeError, one.combine, out.tokens, "not a handle", match="handle must be a DispatchHandle")
    good_call(mpi, other)
    good_call(mpi, one)


@pytest.mark.parametrize("mode", MODES)
def test_expert_output_of_the_wrong_shape_or_dtype_raises(mpi, communicators, mode):
    comm = communicators(small(mode, mpi.size))
    inp = draw_inputs(mpi, comm.config, 4)
    out, handle = comm.dispatch(inp.x, inp.ids, inp.w)
    tokens = np.asarray(out.tokens)
    mpi.raises(ValueError, comm.combine, tokens.reshape(-1)[:tokens.size - 16], handle,
               match="expert_output: expected shape")
    mpi.raises(ValueError, comm.combine, np.zeros(tokens.shape[:-1] + (24,), np.uint16), handle,
               match="expert_output: expected shape")
    mpi.raises(TypeError, comm.combine, bf16_to_f32(tokens), handle, match="expert_output: expected dtype")
    mpi.raises(ValueError, comm.combine, tokens, handle, out=np.zeros((5, 16), np.uint16),
               match=r"out: expected shape \(4, 16\)")
    good_call(mpi, comm)


@pytest.mark.parametrize("mode", MODES)
def test_combine_writes_into_out(mpi, communicators, mode):
    W, r = mpi.size, mpi.rank
    comm = communicators(small(mode, W))
    inp = draw_inputs(mpi, comm.config, 6)
    out, handle = comm.dispatch(inp.x, inp.ids, inp.w)
    buffer = np.full((6, 16), 0xFFFF, np.uint16)
    got = comm.combine(out.tokens, handle, out=buffer)
    with mpi.checking("combine into out"):
        assert got is buffer
        check_combine(buffer, expected_combine(comm.config, W, r, expected_dispatch(comm.config, W, inp), inp,
                                               "identity"), 6, 16)


PAYLOADS = testing.PAYLOAD_CASES   # (name, format, column-major scales)


@pytest.mark.parametrize("layout", [FLAT, EXPERT_MAJOR, DispatchLayout.TOKEN_MAJOR], ids=lambda l: l.value)
@pytest.mark.parametrize("scale_layout", ["row_major", "mn_major"])
@pytest.mark.parametrize("payload", PAYLOADS, ids=[p[0] for p in PAYLOADS])
def test_ht_byte_payloads_and_their_scales_arrive_in_the_row_order_bit_exactly(mpi, communicators, layout, scale_layout,
                                                                              payload):
    W, r = mpi.size, mpi.rank
    H = 512
    cfg = make_config("ht", world=W, hidden=H, topk=3, t_max=8, layout=layout, scale_layout=scale_layout,
                      alignment=4 if layout is FLAT else 1)
    comm = communicators(cfg)
    name, fmt, column_major = payload
    dtype = testing.PAYLOAD_FORMATS[fmt][2]
    T = token_counts(W, 8, 1)[r]
    inp = draw_inputs(mpi, cfg, T, drop=0.2)
    x, sc = testing.random_payload(mpi.rng(50), T, H, fmt, column_major)
    out, handle = comm.dispatch(x, inp.ids, inp.w, scales=QuantScales(scales=sc) if column_major else sc)
    everyone = mpi.allgather((x, np.ascontiguousarray(sc)))
    with mpi.checking("payload rows and scales"):
        ref = reference.dispatch_world([e[0] for e in everyone], inp.idss, inp.ws, cfg.num_experts, H, cfg.expert_alignment,
                                       layout, scales=[e[1] for e in everyone])[r]
        tokens, scales = np.asarray(out.tokens), np.asarray(out.scales)
        assert tokens.dtype == np.uint8 and np.array_equal(tokens, ref.tokens)
        assert scales.dtype == dtype and np.array_equal(scales, ref.scales)
        if scale_layout == "mn_major" and scales.size:
            assert scales.strides[-2] == scales.itemsize, "token-contiguous"
            assert (scales.strides[-1] // scales.itemsize) % 4 == 0, "token stride padded to a multiple of 4"
        if layout is DispatchLayout.TOKEN_MAJOR:
            assert np.array_equal(np.asarray(out.topk_ids), ref.topk_ids)
            assert np.array_equal(np.asarray(out.topk_weights), ref.topk_weights)
    y = f32_to_bf16(np.ones(tokens.shape[:-1] + (H,), np.float32))   # combine takes bf16 rows after any payload
    comm.combine(y, handle)


def test_scales_are_ht_only_and_checked_before_anything_moves(mpi, communicators):
    W = mpi.size
    ll = communicators(make_config("ll", world=W, hidden=256, topk=2, t_max=8))
    inp = draw_inputs(mpi, ll.config, 4)
    x8 = np.zeros((4, 256), np.uint8)
    mpi.raises(ValueError, ll.dispatch, x8, inp.ids, scales=np.ones((4, 2), np.float32), match="cast=ep.Fp8Cast")
    ht = communicators(make_config("ht", world=W, hidden=256, topk=2, t_max=8))
    mpi.raises(ValueError, ht.dispatch, x8, inp.ids, scales=np.ones((3, 2), np.float32), match="scales: expected shape")
    mpi.raises(TypeError, ht.dispatch, x8, inp.ids, scales=np.ones((4, 2), np.float64), match="scales: expected dtype")
    mpi.raises(TypeError, ht.dispatch, inp.x, inp.ids, scales=np.ones((4, 2), np.float32), match="x: expected dtype")
    mpi.raises(ValueError, ht.dispatch, x8, inp.ids, scales=np.ones((4, 70), np.float32), match="exceed the 512-byte slot")
    good_call(mpi, ht)


@pytest.mark.parametrize("weights", [False, True], ids=["rows", "rows_and_weights"])
def test_token_major_combine_sums_the_callers_rows_in_rank_order(mpi, communicators, weights):
    W, r = mpi.size, mpi.rank
    cfg = make_config("ht", world=W, hidden=32, topk=3, t_max=8, layout=DispatchLayout.TOKEN_MAJOR, alignment=4)
    comm = communicators(cfg)
    inp = draw_inputs(mpi, cfg, token_counts(W, 8, 2)[r], drop=0.2, repeat=True)
    out, handle = comm.dispatch(inp.x, inp.ids, inp.w)
    layouts = reference.dispatch_world(inp.xs, inp.idss, inp.ws, cfg.num_experts, 32, 4, DispatchLayout.TOKEN_MAJOR)
    with mpi.checking("TOKEN_MAJOR dispatch"):
        ref = layouts[r]
        assert np.array_equal(np.asarray(out.tokens), ref.tokens)
        assert np.array_equal(np.asarray(out.num_tokens_per_expert), ref.counts)
        assert out.num_tokens_per_expert_host == ref.counts.tolist()
        assert np.array_equal(np.asarray(out.expert_offsets), ref.offsets)
        assert np.array_equal(np.asarray(out.topk_ids), ref.topk_ids)
        assert np.array_equal(np.asarray(out.topk_weights), ref.topk_weights)
        assert np.array_equal(np.asarray(out.rank_prefix), rank_prefix_of(inp.idss, cfg.num_experts, W))
    # the caller's experts: row i = sum_k w[i,k] * c_e * x_i over its local experts (any function would do)
    ys = [f32_to_bf16(bf16_to_f32(L.tokens) * np.float32(d + 2)) for d, L in enumerate(layouts)]
    ws = [np.asarray(L.topk_weights) for L in layouts]
    got = comm.combine(ys[r], handle, topk_weights=ws[r] if weights else None)
    with mpi.checking("TOKEN_MAJOR combine"):
        want = reference.combine_token_major_world(ys, layouts, inp.idss, cfg.num_experts, 32, ws if weights else None)[r]
        if weights:
            got_y, got_w = got
            assert np.array_equal(np.asarray(got_w), want[1])
            # every slot's weight comes back from the rank that owns it: the sum is the caller's weights
            w_in = np.where(inp.ids >= 0, inp.w, 0).astype(np.float32)
            assert np.array_equal(np.asarray(got_w), w_in)
        else:
            got_y = got
        check_combine(got_y, want[0], inp.x.shape[0], 32)


def rank_prefix_of(idss: list, num_experts: int, W: int) -> np.ndarray:
    """[i, j] = the tokens ranks 0..i send to rank j (each token once per rank it routes to)."""
    sent = np.array([reference.routed_ranks(ids, num_experts, W).sum(axis=0) for ids in idss]).reshape(W, W)
    return np.cumsum(sent, axis=0).astype(np.int32)


@pytest.mark.parametrize("weights", [False, True], ids=["rows", "rows_and_weights"])
def test_a_worst_case_token_major_dispatch_has_every_row_a_rank_can_receive_and_combines_the_same(mpi, communicators,
                                                                                                   weights):
    """worst_case: W * T_max rows (past the received ones: ids -1, weights 0), no host counts, the same
    rank_prefix; a cached dispatch of its handle pads alike; combine ignores the rows past the received ones."""
    W, r = mpi.size, mpi.rank
    cfg = make_config("ht", world=W, hidden=32, topk=3, t_max=8, layout=DispatchLayout.TOKEN_MAJOR)
    comm = communicators(cfg)
    inp = draw_inputs(mpi, cfg, token_counts(W, 8, 3)[r], drop=0.2, repeat=True)
    N = W * 8
    layouts = reference.dispatch_world(inp.xs, inp.idss, inp.ws, cfg.num_experts, 32, 1, DispatchLayout.TOKEN_MAJOR)
    ref = layouts[r]
    n = ref.tokens.shape[0]
    out, handle = comm.dispatch(inp.x, inp.ids, inp.w, worst_case=True)
    again, _ = comm.dispatch(f32_to_bf16(bf16_to_f32(inp.x) * 2), inp.ids, previous_handle=handle)
    with mpi.checking("worst-case TOKEN_MAJOR dispatch"):
        for got in (out, again):
            assert np.asarray(got.tokens).shape == (N, 32)
            ids, w = np.asarray(got.topk_ids), np.asarray(got.topk_weights)
            assert np.array_equal(ids[:n], ref.topk_ids) and (ids[n:] == -1).all()
            want_w = ref.topk_weights if got is out else (ref.topk_ids >= 0).astype(np.float32)   # cached: no weights
            assert np.array_equal(w[:n], want_w) and (w[n:] == 0).all()
            assert got.num_tokens_per_expert_host is None
            assert np.array_equal(np.asarray(got.num_tokens_per_expert), ref.counts)
            assert np.array_equal(np.asarray(got.rank_prefix), rank_prefix_of(inp.idss, cfg.num_experts, W))
        assert np.array_equal(np.asarray(out.tokens)[:n], ref.tokens)
        assert np.array_equal(bf16_to_f32(np.asarray(again.tokens)[:n]), bf16_to_f32(ref.tokens) * 2)
    ys = [f32_to_bf16(bf16_to_f32(L.tokens) * np.float32(d + 2)) for d, L in enumerate(layouts)]
    ws = [np.asarray(L.topk_weights) for L in layouts]
    y = np.concatenate([ys[r], mpi.rng(7).integers(0, 2**16, (N - n, 32), dtype=np.uint16)])   # garbage past n
    wy = np.concatenate([ws[r], np.full((N - n, 3), np.nan, np.float32)]) if weights else None
    got = comm.combine(y, handle, topk_weights=wy)
    with mpi.checking("worst-case TOKEN_MAJOR combine"):
        want = reference.combine_token_major_world(ys, layouts, inp.idss, cfg.num_experts, 32, ws if weights else None)[r]
        if weights:
            got, got_w = got
            assert np.array_equal(np.asarray(got_w), want[1])
        check_combine(got, want[0], inp.x.shape[0], 32)


def test_a_worst_case_dispatch_with_an_invalid_id_moves_nothing_and_the_next_call_reports_it(mpi, communicators):
    """As on the GPU, where nothing waits on the exchange: every rank's output is empty (ids -1, zero counts),
    the next call raises on every rank (the culprit ValueError, the others PeerInputError), then all is well."""
    W, r = mpi.size, mpi.rank
    cfg = make_config("ht", world=W, hidden=16, topk=2, t_max=8, layout=DispatchLayout.TOKEN_MAJOR)
    comm = communicators(cfg)
    inp = draw_inputs(mpi, cfg, 6)
    ids = inp.ids.copy()
    if r == 0:
        ids[4, 1] = cfg.num_experts + 3
    out, handle = comm.dispatch(inp.x, ids, inp.w, worst_case=True)
    with mpi.checking("nothing moved"):
        assert (np.asarray(out.topk_ids) == -1).all() and (np.asarray(out.topk_weights) == 0).all()
        assert (np.asarray(out.num_tokens_per_expert) == 0).all() and (np.asarray(out.rank_prefix) == 0).all()
    if r == 0:
        expected, match = ValueError, rf"an earlier worst-case dispatch got topk_ids\[4, 1\] = {ids[4, 1]} outside"
    else:
        expected, match = PeerInputError, "rank 0: ValueError in argument topk_ids of an earlier call"
    mpi.raises(expected, comm.dispatch, inp.x, inp.ids, inp.w, worst_case=True, match=match)
    out, _ = comm.dispatch(inp.x, inp.ids, inp.w, worst_case=True)
    ref = reference.dispatch_world(inp.xs, inp.idss, inp.ws, cfg.num_experts, 16, 1, DispatchLayout.TOKEN_MAJOR)[r]
    with mpi.checking("the call after the report"):
        n = ref.tokens.shape[0]
        assert np.array_equal(np.asarray(out.tokens)[:n], ref.tokens)
        assert np.array_equal(np.asarray(out.topk_ids)[:n], ref.topk_ids)


def test_worst_case_is_an_uncached_token_major_request(mpi, communicators):
    W = mpi.size
    flat = communicators(small("ht", W))
    inp = draw_inputs(mpi, flat.config, 4)
    mpi.raises(ValueError, flat.dispatch, inp.x, inp.ids, inp.w, worst_case=True, match="TOKEN_MAJOR only")
    tm = communicators(make_config("ht", world=W, hidden=16, topk=2, t_max=8, layout=DispatchLayout.TOKEN_MAJOR))
    inp = draw_inputs(mpi, tm.config, 4)
    _, handle = tm.dispatch(inp.x, inp.ids, inp.w)
    mpi.raises(ValueError, tm.dispatch, inp.x, inp.ids, previous_handle=handle, worst_case=True,
               match="takes the layout of its previous_handle")
    out, _ = tm.dispatch(inp.x, inp.ids, inp.w, worst_case=True)   # still usable
    ref = reference.dispatch_world(inp.xs, inp.idss, inp.ws, tm.config.num_experts, 16, 1, DispatchLayout.TOKEN_MAJOR)
    with mpi.checking("the call after the refusals"):
        assert np.array_equal(np.asarray(out.tokens)[:ref[mpi.rank].tokens.shape[0]], ref[mpi.rank].tokens)


def test_output_buffer_is_refused_in_ht(mpi, communicators):
    comm = communicators(small("ht", mpi.size))
    inp = draw_inputs(mpi, comm.config, 4)
    buf = np.zeros((comm.num_local_experts, mpi.size * 8, 16), np.uint16)
    mpi.raises(ValueError, comm.dispatch, inp.x, inp.ids, inp.w, output_buffer=buf,
               match="output_buffer applies to mode='ll' only")
    good_call(mpi, comm)


def test_previous_handle_is_refused_in_ll(mpi, communicators):
    comm = communicators(small("ll", mpi.size))
    inp = draw_inputs(mpi, comm.config, 4)
    _, handle = comm.dispatch(inp.x, inp.ids, inp.w)
    mpi.raises(ValueError, comm.dispatch, inp.x, inp.ids, inp.w, previous_handle=handle,
               match="previous_handle applies to mode='ht' only")
    good_call(mpi, comm)


@pytest.mark.parametrize("layout", [EXPERT_MAJOR, FLAT], ids=param_id)
def test_ll_output_buffer_receives_the_tokens(mpi, communicators, layout):
    W, r = mpi.size, mpi.rank
    comm = communicators(small("ll", W, layout=layout))
    L = comm.num_local_experts
    inp = draw_inputs(mpi, comm.config, token_counts(W, 8, 2)[r], routing="skewed")
    mpi.raises(ValueError, comm.dispatch, inp.x, inp.ids, inp.w, output_buffer=np.zeros((L, W * 8 + 1, 16), np.uint16),
               match="output_buffer: expected shape")
    buf = np.full((L, W * 8, 16), 0x7FC0, np.uint16)
    out, handle = comm.dispatch(inp.x, inp.ids, inp.w, output_buffer=buf)
    with mpi.checking("dispatch into output_buffer"):
        refs = expected_dispatch(comm.config, W, inp)
        check_dispatch(out, refs[r], comm.config, W)
        assert np.shares_memory(np.asarray(out.tokens), buf)
        for e in range(L):
            n = int(refs[r].counts[e])
            assert np.array_equal(buf[e, :n], refs[r].tokens[e, :n])
        y = mlp(out.tokens, out.expert_offsets, r, L)
    got = comm.combine(y, handle)
    with mpi.checking("combine after output_buffer"):
        check_combine(got, expected_combine(comm.config, W, r, refs, inp), inp.x.shape[0], 16)


# ======================================================================================= lifetime
@pytest.mark.parametrize("mode", MODES)
def test_use_after_close_raises_and_close_twice_is_fine(mpi, mode):
    comm = MoECommunicator(small(mode, mpi.size), backend="cpu")
    inp = draw_inputs(mpi, comm.config, 4)
    out, handle = comm.dispatch(inp.x, inp.ids, inp.w)
    comm.close()
    comm.close()
    mpi.raises(InvalidStateError, comm.dispatch, inp.x, inp.ids, inp.w, match="closed")
    mpi.raises(InvalidStateError, comm.combine, out.tokens, handle, match="closed")
    mpi.raises(InvalidStateError, comm.synchronize, match="closed")
    mpi.raises(InvalidStateError, comm.prepare, match="closed")


def test_the_context_manager_closes(mpi):
    with MoECommunicator(small("ht", mpi.size), backend="cpu") as comm:
        good_call(mpi, comm)
    inp = draw_inputs(mpi, comm.config, 2)
    mpi.raises(InvalidStateError, comm.dispatch, inp.x, inp.ids, match="closed")


def test_the_context_manager_closes_when_the_body_raises(mpi):
    def body():
        with MoECommunicator(small("ll", mpi.size), backend="cpu") as comm:
            body.comm = comm
            raise KeyError("boom")
    mpi.raises(KeyError, body, match="boom")
    inp = draw_inputs(mpi, body.comm.config, 2)
    mpi.raises(InvalidStateError, body.comm.dispatch, inp.x, inp.ids, match="closed")


def test_prepare_and_synchronize_are_harmless_on_the_cpu(mpi, communicators):
    comm = communicators(small("ll", mpi.size))
    comm.prepare()
    comm.synchronize()
    good_call(mpi, comm)
    comm.synchronize()


# ================================================================================== construction
def test_ranks_that_disagree_on_the_config_all_raise(mpi):
    if mpi.size < 2:
        pytest.skip("needs two ranks")
    cfg = small("ht", mpi.size, num_sms=24 if mpi.rank == 0 else 20)
    mpi.raises(ConfigError, MoECommunicator, cfg, backend="cpu", match=r"ranks differ in num_sms .*rank \d+ has 2[04]")


def test_ranks_that_disagree_on_a_macro_knob_all_raise(mpi, monkeypatch):
    if mpi.size < 2:
        pytest.skip("needs two ranks")
    if mpi.rank == 0:
        monkeypatch.setenv("EP_LL_WARPS", "8")      # a different kernel variant than the other ranks'
    mpi.raises(ConfigError, MoECommunicator, small("ll", mpi.size), backend="cpu",
               match=r"ranks differ in ll_tuning.warps \(config field, with the env overrides applied\)")


def test_a_communicator_never_closed_is_reported_once_at_exit(mpi):
    import gc

    from ep import communicator as module
    comm = MoECommunicator(small("ht", mpi.size), backend="cpu")
    del comm
    gc.collect()
    with mpi.checking("the exit warning"):
        with pytest.warns(RuntimeWarning, match=rf"1 MoECommunicator\(s\) of rank\(s\) \[{mpi.rank}\] were never closed"):
            module._warn_unclosed()
    module._collected_unclosed.clear()


def test_a_config_that_does_not_fit_the_world_raises_everywhere(mpi):
    if mpi.size < 2:
        pytest.skip("every expert count divides by one rank")
    cfg = MoECommunicatorConfig(num_experts=mpi.size + 1, hidden_size=16, topk=1, max_tokens_per_rank=4)
    mpi.raises(ConfigError, MoECommunicator, cfg, backend="cpu", match="must be divisible by the world size")


def test_backend_and_config_arguments_are_checked(mpi):
    mpi.raises(ConfigError, MoECommunicator, {"mode": "ht"}, backend="cpu",
               match="config must be a MoECommunicatorConfig")
    mpi.raises(ConfigError, MoECommunicator, small("ht", mpi.size), backend="tpu",
               match="backend must be 'gpu' or 'cpu'")


def test_overlap_config_is_accepted_by_the_cpu_backend(mpi, communicators):
    comm = communicators(small("ht", mpi.size, overlap=CommOverlapConfig(dispatch_num_sms=4, combine_num_sms=2)))
    good_call(mpi, comm)


def test_properties_and_required_bytes(mpi, communicators):
    cfg = small("ll", mpi.size)
    comm = communicators(cfg)
    with mpi.checking("properties"):
        assert (comm.rank, comm.world_size, comm.num_local_experts, comm.backend) == (mpi.rank, mpi.size, 4, "cpu")
        assert MoECommunicator.required_bytes(cfg, mpi.size) > 0


def test_a_communicator_over_a_sub_group(mpi, comm_world, communicators):
    """Ranks split in two halves (even and odd ranks); each half is its own communicator."""
    if mpi.size < 2:
        pytest.skip("needs two ranks")
    sub = comm_world.Split(color=mpi.rank % 2, key=mpi.rank)
    comm = None
    try:
        Ws, rs = sub.Get_size(), sub.Get_rank()
        cfg = make_config("ht", world=Ws, experts_per_rank=2, hidden=16, topk=2, t_max=8)
        comm = communicators(cfg, group=sub)
        with mpi.checking("sub-group ranks"):
            assert (comm.world_size, comm.rank) == (Ws, rs)
        rng = mpi.rng()
        x = testing.random_tokens(rng, 6, 16)
        ids = testing.routing("uniform", rng, 6, cfg.num_experts, 2)
        everyone = mpi.allgather((x, ids))
        half = [everyone[g] for g in range(mpi.size) if g % 2 == mpi.rank % 2]
        inp = Inputs(x, ids, None, [h[0] for h in half], [h[1] for h in half], [None] * len(half))
        out, handle = comm.dispatch(x, ids)
        with mpi.checking("dispatch on a sub-group"):
            refs = expected_dispatch(cfg, Ws, inp)
            check_dispatch(out, refs[rs], cfg, Ws)
        got = comm.combine(out.tokens, handle)
        with mpi.checking("combine on a sub-group"):
            check_combine(got, expected_combine(cfg, Ws, rs, refs, inp, "identity"), 6, 16)
    finally:
        if comm is not None:
            comm.close()           # before its group goes away (the fixture's second close is a no-op)
        sub.Free()


# ========================================================================================== torch
def to_torch_bf16(torch, bits: np.ndarray):
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)


def torch_bits(tensor) -> np.ndarray:
    import torch
    assert tensor.dtype == torch.bfloat16
    return tensor.view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("mode, layout", [("ht", FLAT), ("ht", EXPERT_MAJOR), ("ll", EXPERT_MAJOR), ("ll", FLAT)],
                         ids=param_id)
def test_torch_cpu_tensors_in_give_torch_tensors_out(mpi, communicators, mode, layout):
    torch = pytest.importorskip("torch")
    W, r = mpi.size, mpi.rank
    cfg = make_config(mode, world=W, hidden=32, topk=3, t_max=8, layout=layout, alignment=2 if mode == "ht" else 1)
    comm = communicators(cfg)
    inp = draw_inputs(mpi, cfg, token_counts(W, 8, 1)[r], drop=0.2)
    ids_t = torch.from_numpy(inp.ids.astype(np.int32 if mode == "ll" else np.int64))
    out, handle = comm.dispatch(to_torch_bf16(torch, inp.x), ids_t, torch.from_numpy(inp.w))
    with mpi.checking("torch dispatch"):
        assert isinstance(out.tokens, torch.Tensor) and out.tokens.dtype == torch.bfloat16
        assert isinstance(out.num_tokens_per_expert, torch.Tensor) and out.num_tokens_per_expert.dtype == torch.int32
        assert isinstance(out.expert_offsets, torch.Tensor) and out.expert_offsets.dtype == torch.int64
        refs = expected_dispatch(cfg, W, inp)
        plain = type(out)(torch_bits(out.tokens), out.num_tokens_per_expert.numpy(), out.num_tokens_per_expert_host,
                          out.expert_offsets.numpy(), out.layout)
        check_dispatch(plain, refs[r], cfg, W)
        y = to_torch_bf16(torch, mlp(torch_bits(out.tokens), plain.expert_offsets, r, comm.num_local_experts))
    got = comm.combine(y, handle)
    with mpi.checking("torch combine"):
        assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16
        check_combine(torch_bits(got), expected_combine(cfg, W, r, refs, inp), inp.x.shape[0], 32)


def test_torch_ll_output_buffer(mpi, communicators):
    torch = pytest.importorskip("torch")
    W, r = mpi.size, mpi.rank
    cfg = small("ll", W)
    comm = communicators(cfg)
    inp = draw_inputs(mpi, cfg, 5)
    buf = torch.zeros((comm.num_local_experts, W * 8, 16), dtype=torch.bfloat16)
    out, _ = comm.dispatch(to_torch_bf16(torch, inp.x), torch.from_numpy(inp.ids), torch.from_numpy(inp.w),
                           output_buffer=buf)
    with mpi.checking("torch output_buffer"):
        assert out.tokens is buf
        refs = expected_dispatch(cfg, W, inp)
        for e in range(comm.num_local_experts):
            n = int(refs[r].counts[e])
            assert np.array_equal(torch_bits(buf)[e, :n], refs[r].tokens[e, :n])


@pytest.mark.parametrize("mode", MODES)
def test_ml_dtypes_bfloat16_arrays_in_give_bfloat16_arrays_out(mpi, communicators, mode):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    W, r = mpi.size, mpi.rank
    cfg = small(mode, W)
    comm = communicators(cfg)
    inp = draw_inputs(mpi, cfg, token_counts(W, 8, 3)[r])
    out, handle = comm.dispatch(inp.x.view(ml_dtypes.bfloat16), inp.ids, inp.w)
    with mpi.checking("ml_dtypes dispatch"):
        assert out.tokens.dtype == ml_dtypes.bfloat16
        refs = expected_dispatch(cfg, W, inp)
        plain = type(out)(out.tokens.view(np.uint16), out.num_tokens_per_expert, out.num_tokens_per_expert_host,
                          out.expert_offsets, out.layout)
        check_dispatch(plain, refs[r], cfg, W)
        y = mlp(plain.tokens, out.expert_offsets, r, comm.num_local_experts).view(ml_dtypes.bfloat16)
    got = comm.combine(y, handle)
    with mpi.checking("ml_dtypes combine"):
        assert got.dtype == ml_dtypes.bfloat16
        check_combine(got.view(np.uint16), expected_combine(cfg, W, r, refs, inp), inp.x.shape[0], 16)


def test_mixing_torch_and_numpy_raises_type_error(mpi, communicators):
    torch = pytest.importorskip("torch")
    comm = communicators(small("ht", mpi.size))
    inp = draw_inputs(mpi, comm.config, 4)
    x_t = to_torch_bf16(torch, inp.x)
    mpi.raises(TypeError, comm.dispatch, x_t, inp.ids, match="topk_ids must come from the same framework as x")
    mpi.raises(TypeError, comm.dispatch, x_t, torch.from_numpy(inp.ids), inp.w, match="weights must come from the same")
    mpi.raises(TypeError, comm.dispatch, inp.x.view(np.int16).astype(np.float32).astype(np.int16), inp.ids,
               match="x: expected dtype")
    mpi.raises(TypeError, comm.dispatch, torch.from_numpy(inp.x.view(np.int16)), torch.from_numpy(inp.ids),
               match="x: expected dtype bfloat16")
    good_call(mpi, comm)


# ================================================================================ LL FP8, counters, hooks
def _mn(scales) -> np.ndarray:
    """The [L, cap, S] scales view of an FP8 dispatch as a plain array."""
    return np.asarray(scales)


@pytest.mark.parametrize("cast", [Fp8Cast(), Fp8Cast(round_scale=True), Fp8Cast(ue8m0=True)],
                         ids=["fp32_scales", "pow2_scales", "ue8m0"])
def test_ll_fp8_dispatch_moves_the_cast_rows_and_their_token_contiguous_scales(mpi, communicators, cast):
    W, r = mpi.size, mpi.rank
    cfg = make_config("ll", world=W, hidden=512, topk=3, t_max=8)
    comm = communicators(cfg)
    T = token_counts(W, 8, 1)[r]
    inp = draw_inputs(mpi, cfg, T, drop=0.2)
    out, handle = comm.dispatch(inp.x, inp.ids, inp.w, cast=cast)
    with mpi.checking("the FP8 dispatch"):
        q, sc = zip(*[reference.fp8_cast(x, round_scale=cast.round_scale, ue8m0=cast.ue8m0) for x in inp.xs])
        ref = reference.dispatch_world(list(q), inp.idss, inp.ws, cfg.num_experts, cfg.hidden_size,
                                       layout=EXPERT_MAJOR, capacity=W * 8, scales=list(sc))[r]
        tokens, scales = np.asarray(out.tokens), _mn(out.scales)
        assert tokens.dtype == np.uint8 and tokens.shape == (comm.num_local_experts, W * 8, 512)
        S = 1 if cast.ue8m0 else 4
        assert scales.shape == (comm.num_local_experts, W * 8, S)
        assert scales.dtype == (np.int32 if cast.ue8m0 else np.float32)
        assert scales.strides[1] == scales.itemsize, "token-contiguous (MN-major)"
        for e, c in enumerate(ref.counts):
            assert np.array_equal(tokens[e, :c], ref.tokens[e, :c])
            assert np.array_equal(scales[e, :c], ref.scales[e, :c])
    # combine takes bf16 expert outputs after an FP8 dispatch
    y = f32_to_bf16(np.ones((comm.num_local_experts, W * 8, 512), np.float32))
    got = comm.combine(y, handle)
    with mpi.checking("combine after FP8"):
        bf = reference.dispatch_world(inp.xs, inp.idss, inp.ws, cfg.num_experts, 512, layout=EXPERT_MAJOR, capacity=W * 8)
        ys = [y] * W
        want = reference.combine_world(ys, bf, inp.idss, inp.ws, cfg.num_experts, 512)[r]
        check_combine(got, want, T, 512)


def test_ll_fp8_cast_needs_whole_groups_and_no_output_buffer(mpi, communicators):
    W = mpi.size
    comm = communicators(make_config("ll", world=W, hidden=256, topk=2, t_max=8))
    inp = draw_inputs(mpi, comm.config, 4)
    mpi.raises(ValueError, comm.dispatch, inp.x, inp.ids, cast=Fp8Cast(ue8m0=True), match="hidden_size % 512")
    buf = np.zeros((comm.num_local_experts, W * 8, 256), np.uint16)
    mpi.raises(ValueError, comm.dispatch, inp.x, inp.ids, cast=Fp8Cast(), output_buffer=buf, match="output_buffer")
    ht = communicators(small("ht", W))
    hinp = draw_inputs(mpi, ht.config, 4)
    mpi.raises(ValueError, ht.dispatch, hinp.x, hinp.ids, cast=Fp8Cast(), match="cast applies to mode='ll' only")
    good_call(mpi, comm)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_ll_cumulative_counts_add_up_every_dispatch(mpi, communicators, dtype):
    W, r = mpi.size, mpi.rank
    comm = communicators(small("ll", W))
    acc = np.full(comm.num_local_experts, 5, dtype)
    want = acc.copy()
    for call in range(3):
        inp = draw_inputs(mpi, comm.config, token_counts(W, 8, call)[r], call=call)
        out, _ = comm.dispatch(inp.x, inp.ids, inp.w, cumulative_counts=acc)
        want += np.asarray(out.num_tokens_per_expert).astype(dtype)
    with mpi.checking("counters"):
        assert np.array_equal(acc, want)
    bad = np.zeros(comm.num_local_experts + 1, np.int32)
    mpi.raises(ValueError, comm.dispatch, inp.x, inp.ids, cumulative_counts=bad, match="cumulative_counts: expected shape")


def test_ll_receive_hooks_give_the_plain_results_in_two_interleaved_micro_batches(mpi, communicators):
    W, r = mpi.size, mpi.rank
    cfg = make_config("ll", world=W, hidden=32, topk=3, t_max=8)
    comm = communicators(cfg)
    a = draw_inputs(mpi, cfg, token_counts(W, 8, 1)[r], call=0)
    b = draw_inputs(mpi, cfg, token_counts(W, 8, 2)[r], call=1, routing="skewed")
    out_a, ha, hook_a = comm.dispatch(a.x, a.ids, a.w, return_recv_hook=True)
    out_b, hb, hook_b = comm.dispatch(b.x, b.ids, b.w, return_recv_hook=True)
    mpi.raises(InvalidStateError, comm.dispatch, a.x, a.ids, a.w, return_recv_hook=True, match="two LL dispatches")
    mpi.raises(InvalidStateError, comm.combine, np.asarray(out_a.tokens), ha, match="receive hook has not been called")
    mpi.raises(InvalidStateError, hook_b, match="call the hooks in the order")   # the receive halves go in send order
    hook_a()
    mpi.raises(InvalidStateError, hook_a, match="already called")
    refs_a = expected_dispatch(cfg, W, a)
    with mpi.checking("micro-batch a"):
        check_dispatch(out_a, refs_a[r], cfg, W)
        ya = mlp(np.asarray(out_a.tokens), out_a.expert_offsets, r, comm.num_local_experts)
    got_a, chook_a = comm.combine(ya, ha, return_recv_hook=True)
    hook_b()
    refs_b = expected_dispatch(cfg, W, b)
    with mpi.checking("micro-batch b"):
        check_dispatch(out_b, refs_b[r], cfg, W)
        yb = mlp(np.asarray(out_b.tokens), out_b.expert_offsets, r, comm.num_local_experts)
    chook_a()
    with mpi.checking("combine a"):
        check_combine(got_a, expected_combine(cfg, W, r, refs_a, a), a.x.shape[0], 32)
        got_a = np.array(got_a)
    got_b, chook_b = comm.combine(yb, hb, return_recv_hook=True)
    chook_b()
    with mpi.checking("combine b"):
        check_combine(got_b, expected_combine(cfg, W, r, refs_b, b), b.x.shape[0], 32)


def test_receive_hooks_are_ll_only(mpi, communicators):
    comm = communicators(small("ht", mpi.size))
    inp = draw_inputs(mpi, comm.config, 4)
    mpi.raises(ValueError, comm.dispatch, inp.x, inp.ids, return_recv_hook=True, match="mode='ll' only")


# ================================================================================ combine-time weights
@pytest.mark.parametrize("dispatch_weights", [False, True], ids=["none_at_dispatch", "others_at_dispatch"])
def test_ll_combine_time_weights_replace_the_dispatchs(mpi, communicators, dispatch_weights):
    W, r = mpi.size, mpi.rank
    cfg = make_config("ll", world=W, hidden=32, topk=3, t_max=8)
    comm = communicators(cfg)
    inp = draw_inputs(mpi, cfg, token_counts(W, 8, 1)[r], weights=dispatch_weights, drop=0.2, repeat=True)
    later = testing.random_weights(mpi.rng(7), inp.x.shape[0], cfg.topk)     # the weights combine is given
    everyones = mpi.allgather(later)
    out, handle = comm.dispatch(inp.x, inp.ids, inp.w)
    refs = expected_dispatch(cfg, W, inp)
    with mpi.checking("dispatch"):
        y = mlp(out.tokens, out.expert_offsets, r, comm.num_local_experts)
    got = comm.combine(y, handle, weights=later)
    with mpi.checking("combine with weights"):
        ys = [mlp(R.tokens, R.offsets, d, comm.num_local_experts) for d, R in enumerate(refs)]
        want = reference.combine_world(ys, refs, inp.idss, everyones, cfg.num_experts, 32)[r]
        check_combine(got, want, inp.x.shape[0], 32)


def test_ll_combine_time_weights_through_the_receive_hook(mpi, communicators):
    W, r = mpi.size, mpi.rank
    cfg = make_config("ll", world=W, hidden=32, topk=2, t_max=8)
    comm = communicators(cfg)
    inp = draw_inputs(mpi, cfg, token_counts(W, 8, 2)[r], weights=False)
    later = testing.random_weights(mpi.rng(8), inp.x.shape[0], cfg.topk)
    everyones = mpi.allgather(later)
    out, handle = comm.dispatch(inp.x, inp.ids)
    refs = expected_dispatch(cfg, W, inp)
    y = mlp(np.asarray(out.tokens), out.expert_offsets, r, comm.num_local_experts)
    got, hook = comm.combine(y, handle, weights=later, return_recv_hook=True)
    hook()
    with mpi.checking("hooked combine with weights"):
        ys = [mlp(R.tokens, R.offsets, d, comm.num_local_experts) for d, R in enumerate(refs)]
        want = reference.combine_world(ys, refs, inp.idss, everyones, cfg.num_experts, 32)[r]
        check_combine(got, want, inp.x.shape[0], 32)


def test_combine_time_weights_are_ll_only_checked_and_given_by_every_rank_or_none(mpi, communicators):
    W, r = mpi.size, mpi.rank
    ht = communicators(small("ht", W))
    inp = draw_inputs(mpi, ht.config, 4)
    out, handle = ht.dispatch(inp.x, inp.ids, inp.w)
    mpi.raises(ValueError, ht.combine, out.tokens, handle, weights=np.ones((4, 2), np.float32),
               match="weights applies to mode='ll' only")
    ht.combine(out.tokens, handle)
    ll = communicators(small("ll", W))
    out, handle = ll.dispatch(inp.x, inp.ids, inp.w)
    y = np.asarray(out.tokens)
    mpi.raises(ValueError, ll.combine, y, handle, weights=np.ones((5, 2), np.float32), match="weights: expected shape")
    mpi.raises(TypeError, ll.combine, y, handle, weights=np.ones((4, 2), np.float64), match="weights: expected dtype")
    if W > 1:   # one rank alone gives weights: a different op, refused everywhere before anything moves
        mpi.raises(InvalidStateError, ll.combine, y, handle,
                   weights=np.ones((4, 2), np.float32) if r == 0 else None, match="the ranks called different ops")
    good_call(mpi, ll)
