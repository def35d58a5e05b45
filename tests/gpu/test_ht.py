"""HT mode on GPUs against the reference (the CPU backend over the same MPI ranks), bit-exact."""
from __future__ import annotations

import numpy as np
import pytest

import time

from gpu_cases import HT_TUNINGS, build, expert_scale, make_inputs, mlp_numpy, to_device, to_numpy
from gpu_cases import collective, multi_rank

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]

# (name, E per rank or absolute, H, K, T_max, per-rank T pattern, routing, drop, weights, alignment, layout,
#  framework, ids dtype, duplicates)
CASES = [
    ("dsv3_uniform", 256, 7168, 8, 512, (512, 0, 300, 17), "uniform", 0.0, True, 1, "flat", "cupy", np.int64, False),
    ("skewed_drop_align128_torch", 64, 2560, 6, 256, (256, 3, 0, 100), "skewed", 0.2, False, 128, "flat", "torch",
     np.int32, True),
    ("one_expert_per_rank_k1", "W", 1024, 1, 128, (128, 64, 1, 0), "uniform", 0.0, True, 1, "flat", "cupy", np.int32,
     False),
    ("expert_major_k8", 64, 1024, 8, 200, (7, 200, 150, 0), "uniform", 0.3, True, 1, "expert_major", "torch", np.int64,
     True),
    ("w_experts_k1_skewed", "W", 7168, 1, 64, (0, 64, 5, 33), "skewed", 0.1, False, 128, "flat", "cupy", np.int64,
     False),
    # E + W > 2048 columns: ht_route_positions counts in two shared-memory tiles.
    ("2048_experts_two_position_tiles", 2048, 1024, 8, 128, (128, 50, 0, 128), "skewed", 0.1, True, 1, "flat", "cupy",
     np.int32, True),
]


# Owned outputs (FLAT only): senders write rows straight into the peers' outputs.
OWNED = [c for c in CASES if c[0] in ("dsv3_uniform", "skewed_drop_align128_torch", "one_expert_per_rank_k1",
                                      "2048_experts_two_position_tiles")]
# Every alternative tuning (TMA senders, the pull combine) on the cases that exercise the most paths.
ALTERNATES = [(t, c) for t in HT_TUNINGS if t != "default" for c in CASES
              if c[0] in ("dsv3_uniform", "skewed_drop_align128_torch", "expert_major_k8")]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dispatch_and_combine_match_the_reference_bit_exactly(world, session_seed, case):
    run_case(world, session_seed, case, owned=False)


@pytest.mark.parametrize("case", OWNED, ids=[c[0] for c in OWNED])
def test_owned_output_dispatch_and_combine_match_the_reference_bit_exactly(world, session_seed, case):
    run_case(world, session_seed, case, owned=True)


@pytest.mark.parametrize("tuning, case", ALTERNATES, ids=[f"{t}-{c[0]}" for t, c in ALTERNATES])
def test_every_alternative_tuning_is_bit_exact_too(world, session_seed, tuning, case):
    run_case(world, session_seed, case, owned=False, tuning=tuning)


def run_case(world, session_seed, case, owned: bool, tuning: str = "default"):
    multi_rank(world)
    name, E, H, K, T_max, pattern, kind, drop, weights, alignment, layout, fw, ids_dtype, dups = case
    if fw == "torch":
        pytest.importorskip("torch")

    def body():
        cfg, gpu, ref = build(world, "ht", E, H, K, T_max, layout, alignment, owned, HT_TUNINGS[tuning])
        scale = expert_scale(cfg, world.size)
        try:
            previous = None
            for call in range(3):   # changing routing every call, plus one cached dispatch
                T = pattern[(world.rank + call) % len(pattern)]
                x, ids, w = make_inputs(session_seed, world.rank, call, T, cfg, kind, drop, weights, dups)
                xd, idsd, wd = to_device(fw, x, ids, w, ids_dtype)
                out, handle = gpu.dispatch(xd, idsd, wd)
                want, want_handle = ref.dispatch(x, ids, w)
                msg = f"seed={session_seed} rank={world.rank} call={call} T={T}"
                got_tokens = to_numpy(out.tokens)
                assert got_tokens.shape == want.tokens.shape, msg
                assert np.array_equal(got_tokens, want.tokens), msg
                assert out.num_tokens_per_expert_host == want.num_tokens_per_expert_host, msg
                assert np.array_equal(to_numpy(out.num_tokens_per_expert), want.num_tokens_per_expert), msg
                assert np.array_equal(to_numpy(out.expert_offsets), want.expert_offsets), msg
                if call == 1:   # cached dispatch reuses the layout: same output, fresh arrays
                    if owned:   # scribble over the owned rows: the cached dispatch must write every one again
                        out.tokens.fill_(-3.0) if fw == "torch" else out.tokens.fill(0xC040)
                    out2, handle2 = gpu.dispatch(xd, idsd, wd, previous_handle=handle)
                    assert np.array_equal(to_numpy(out2.tokens), got_tokens), msg
                    if owned:   # one buffer, viewed by every dispatch
                        assert ptr_of(out2.tokens) == ptr_of(out.tokens), msg
                    # The kernel itself writes a cached dispatch's fresh counts and offsets.
                    assert np.array_equal(to_numpy(out2.num_tokens_per_expert), want.num_tokens_per_expert), msg
                    assert np.array_equal(to_numpy(out2.expert_offsets), want.expert_offsets), msg
                    assert out2.expert_offsets is not out.expert_offsets, msg
                    handle = handle2
                # The "MLP": a per-expert power of two, exact in bf16.
                y = mlp_numpy(got_tokens, want.expert_offsets, scale, cfg.layout)
                yd = to_device(fw, y.reshape(-1, H), ids, None)[0].reshape(got_tokens.shape)
                got = to_numpy(gpu.combine(yd, handle))
                want_c = ref.combine(y, want_handle)
                assert np.array_equal(got, want_c), msg + f" combine max diff rows {np.argwhere(got != want_c)[:3]}"
                if call == 2:   # back-to-back combines of one handle: the second reuses every combine buffer at once;
                    # it writes into the caller's `out` (filled with -3.0 first) and returns that very array
                    dst = filled_bf16(fw, (T, H), -3.0)
                    assert gpu.combine(yd, handle, out=dst) is dst, msg
                    assert np.array_equal(to_numpy(dst), want_c), msg + " (second combine, into out=)"
                previous = handle
            # An older handle still combines correctly (its per-call arrays are its own).
            assert previous is not None
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


def filled_bf16(fw: str, shape: tuple, value: float):
    """A bf16 device array of ``shape`` filled with ``value`` (CuPy: uint16 bit patterns)."""
    if fw == "torch":
        import torch
        return torch.full(shape, value, dtype=torch.bfloat16, device="cuda")
    import cupy
    bits = int(np.array([value], np.float32).view(np.uint32)[0] >> 16)
    return cupy.full(shape, bits, dtype=np.uint16)


def ptr_of(arr) -> int:
    return arr.data_ptr() if hasattr(arr, "data_ptr") else arr.data.ptr


def test_bad_inputs_raise_before_launch_and_the_next_call_works(world, session_seed):
    multi_rank(world)
    import cupy
    from ep import InvalidStateError, MoECommunicator, MoECommunicatorConfig, PeerInputError

    def body():
        cfg = MoECommunicatorConfig(mode="ht", num_experts=8 * world.size, hidden_size=256, topk=4,
                                    max_tokens_per_rank=32, num_sms=8, timeout_s=20)
        gpu = MoECommunicator(cfg, world, backend="gpu")
        other = MoECommunicator(cfg, world, backend="gpu")
        ref = MoECommunicator(cfg, world, backend="cpu")
        try:
            x, ids, w = make_inputs(session_seed, world.rank, 0, 32, cfg, "uniform", 0.0, True)
            xd, idsd, wd = to_device("cupy", x, ids, w)
            with pytest.raises(TypeError):
                gpu.dispatch(xd.view(np.int16), idsd, wd)
            with pytest.raises(ValueError):
                gpu.dispatch(xd[:, :128], idsd, wd)
            with pytest.raises(ValueError):
                gpu.dispatch(cupy.zeros((33, 256), np.uint16), cupy.zeros((33, 4), np.int64))
            with pytest.raises(ValueError):
                gpu.dispatch(cupy.asfortranarray(xd), idsd, wd)
            with pytest.raises(TypeError):
                gpu.dispatch(xd, idsd.astype(np.float32), wd)
            other_device = (gpu.device + 1) % cupy.cuda.runtime.getDeviceCount()
            if other_device != gpu.device:
                with cupy.cuda.Device(other_device):
                    x_elsewhere = cupy.asarray(x)
                with pytest.raises(ValueError, match="cuda:"):
                    gpu.dispatch(x_elsewhere, idsd, wd)
            with pytest.raises(ValueError):
                gpu.dispatch(xd, idsd, wd[:, :2])
            with pytest.raises(TypeError):   # scales come with one-byte payloads only
                gpu.dispatch(xd, idsd, wd, scales=cupy.ones((32, 2), np.float32))
            # An invalid expert id on ONE rank: that rank gets ValueError, the others PeerInputError.
            bad = ids.copy()
            if world.rank == world.size - 1:
                bad[3, 1] = cfg.num_experts
            expected = ValueError if world.rank == world.size - 1 else PeerInputError
            with pytest.raises(expected):
                gpu.dispatch(xd, cupy.asarray(bad), wd)
            # The next call works everywhere.
            out, handle = gpu.dispatch(xd, idsd, wd)
            want, want_handle = ref.dispatch(x, ids, w)
            assert np.array_equal(to_numpy(out.tokens), want.tokens)
            with pytest.raises(InvalidStateError):
                other.combine(out.tokens, handle)
            with pytest.raises(ValueError):
                gpu.combine(out.tokens[:-1], handle)
            got = to_numpy(gpu.combine(out.tokens, handle))
            assert np.array_equal(got, ref.combine(want.tokens, want_handle))
        finally:
            gpu.close()
            other.close()
            ref.close()

    collective(world, body)


@pytest.mark.parametrize("op", ["dispatch", "cached dispatch", "combine"])
def test_one_ranks_bad_input_raises_on_every_rank_in_that_call_and_the_next_calls_are_bit_exact(world, session_seed, op):
    multi_rank(world)
    from ep import PeerInputError

    def body():
        cfg, gpu, ref = build(world, "ht", 8 * world.size, 256, 4, 32, "flat")
        culprit = world.size - 1
        try:
            x, ids, w = make_inputs(session_seed, world.rank, 0, 32 - world.rank, cfg, "uniform", 0.1, True)
            xd, idsd, wd = to_device("cupy", x, ids, w)
            out, handle = gpu.dispatch(xd, idsd, wd)
            want, want_handle = ref.dispatch(x, ids, w)
            mine = world.rank == culprit
            start = time.monotonic()
            with pytest.raises(ValueError) as info:   # PeerInputError is a ValueError: one except for every rank
                if op == "combine":
                    gpu.combine(out.tokens[:-1] if mine else out.tokens, handle)
                else:
                    gpu.dispatch(xd[:, :128] if mine else xd, idsd, wd,
                                 previous_handle=handle if op == "cached dispatch" else None)
            took = time.monotonic() - start
            assert took < 1.0, f"took {took:.2f} s"   # promptly, not after timeout_s
            arg = "expert_output" if op == "combine" else "x"
            if mine:
                assert not isinstance(info.value, PeerInputError) and f"{arg}: expected shape" in str(info.value)
            else:
                assert isinstance(info.value, PeerInputError)
                assert f"rank(s) [{culprit}] failed the input checks of this {op}" in str(info.value)
                assert f"ValueError in argument {arg}" in str(info.value)
            # Nothing moved and the communicator is usable: a cached dispatch and a combine, bit-exact.
            out2, handle2 = gpu.dispatch(xd, idsd, wd, previous_handle=handle)
            assert np.array_equal(to_numpy(out2.tokens), want.tokens)
            got = to_numpy(gpu.combine(out2.tokens, handle2))
            assert np.array_equal(got, ref.combine(want.tokens, want_handle))
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


def test_a_cached_dispatch_paired_with_an_uncached_one_raises_on_every_rank(world, session_seed):
    multi_rank(world)
    from ep import InvalidStateError

    def body():
        cfg, gpu, ref = build(world, "ht", 8 * world.size, 256, 4, 32, "flat")
        try:
            x, ids, w = make_inputs(session_seed, world.rank, 0, 16, cfg, "uniform", 0.0, True)
            xd, idsd, wd = to_device("cupy", x, ids, w)
            out, handle = gpu.dispatch(xd, idsd, wd)
            with pytest.raises(InvalidStateError, match="the ranks called different ops"):
                gpu.dispatch(xd, idsd, wd, previous_handle=handle if world.rank == 0 else None)
            want, want_handle = ref.dispatch(x, ids, w)
            out2, handle2 = gpu.dispatch(xd, idsd, wd)
            assert np.array_equal(to_numpy(out2.tokens), want.tokens)
            assert np.array_equal(to_numpy(gpu.combine(out2.tokens, handle2)), ref.combine(want.tokens, want_handle))
        finally:
            gpu.close()
            ref.close()

    collective(world, body)
