"""HT block-scaled payloads (FP8, MXFP8, NVFP4 with their scales) and the TOKEN_MAJOR layout on GPUs, against
the reference (the CPU backend over the same MPI ranks), bit-exact."""
from __future__ import annotations

import numpy as np
import pytest

from ep import QuantScales
from ep import testing as T
from ep.reference import bf16_to_f32, f32_to_bf16

from gpu_cases import build, collective, make_inputs, multi_rank, to_device, to_numpy

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]

PAYLOADS = T.PAYLOAD_CASES   # (name, format, column-major scales in)
LAYOUTS = ["flat", "expert_major", "token_major"]


def payload_inputs(seed: int, rank: int, call: int, T_: int, H: int, fmt: str, column_major: bool = False):
    """Random payload bytes [T, row] and non-zero scales [T, S] of ``fmt`` (ep.testing.random_payload)."""
    return T.random_payload(T.seed_for(seed, rank, 1000 + call), T_, H, fmt, column_major)


def device_payload(fw: str, x: np.ndarray, sc: np.ndarray, column_major: bool, fp8: bool):
    """The caller's arrays: torch float8_e4m3fn rows when fp8 (uint8 for packed FP4), and column-major scales
    as callers make them (``s.T.contiguous().T``)."""
    import cupy
    if fw == "torch":
        import torch
        xt = torch.from_numpy(x).cuda()
        if fp8:
            xt = xt.view(torch.float8_e4m3fn)
        st = torch.from_numpy(sc).cuda()
        return xt, (st.t().contiguous().t() if column_major else st)
    xs = cupy.asarray(x)
    scd = cupy.asarray(sc)
    return xs, (cupy.asfortranarray(scd) if column_major else scd)


def as_bytes(arr) -> np.ndarray:
    if type(arr).__module__.startswith("torch"):
        import torch
        if arr.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            arr = arr.view(torch.uint8)
    return to_numpy(arr)


# (payload, layout, scale_layout, H, framework): every payload in every layout and output scale layout at one
# H, then the DeepSeek-V3 shape and torch on the common formats.
CASES = [(p, lay, sl, 2048, "cupy") for p in PAYLOADS for lay in LAYOUTS for sl in ("row_major", "mn_major")] + \
        [(PAYLOADS[1], lay, "mn_major", 7168, "torch") for lay in LAYOUTS] + \
        [(PAYLOADS[3], "token_major", "row_major", 7168, "torch")]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0][0]}-{c[1]}-{c[2]}-H{c[3]}-{c[4]}" for c in CASES])
def test_block_scaled_payloads_and_their_scales_arrive_bit_exactly(world, session_seed, case):
    multi_rank(world)
    (name, fmt, column_major), layout, scale_layout, H, fw = case
    width, _, dtype = T.PAYLOAD_FORMATS[fmt]
    if fw == "torch":
        pytest.importorskip("torch")

    def body():
        cfg, gpu, ref = build(world, "ht", 16, H, 8, 128, layout, alignment=1 if layout != "flat" else 4,
                              scale_layout=scale_layout)
        try:
            previous = None
            for call in range(3):   # new routing, a cached dispatch (call 0's routing, new payload), new routing
                Tn = (128, 0, 77, 5)[(world.rank + (call == 2)) % 4]
                _, ids, w = make_inputs(session_seed, world.rank, call if call != 1 else 0, Tn, cfg, "uniform", 0.1,
                                        True, True)
                x, sc = payload_inputs(session_seed, world.rank, call, Tn, H, fmt)
                xd, scd = device_payload(fw, x, sc, column_major, width(H) == H)
                _, idsd, wd = to_device(fw, np.zeros((Tn, H), np.uint16), ids, w)
                scales = QuantScales(scales=scd) if column_major else scd
                prev = previous if call == 1 else None
                out, handle = gpu.dispatch(xd, idsd, wd, scales=scales, previous_handle=None if prev is None else prev[0])
                want, want_handle = ref.dispatch(x, ids, w, scales=np.ascontiguousarray(sc),
                                                 previous_handle=None if prev is None else previous[1])
                msg = f"seed={session_seed} rank={world.rank} call={call} T={Tn}"
                tokens, scales_out = as_bytes(out.tokens), to_numpy(out.scales)
                assert tokens.shape == want.tokens.shape and np.array_equal(tokens, want.tokens), msg
                assert scales_out.dtype == np.dtype(dtype), msg
                assert np.array_equal(scales_out, np.asarray(want.scales)), msg + " scales"
                if scale_layout == "mn_major" and scales_out.size and scales_out.shape[-2] > 1:
                    st = out.scales.stride() if fw == "torch" else tuple(s // out.scales.itemsize
                                                                         for s in out.scales.strides)
                    assert st[-2] == 1 and st[-1] % 4 == 0, msg + f" token-contiguous scales, strides {st}"
                assert out.num_tokens_per_expert_host == want.num_tokens_per_expert_host, msg
                assert np.array_equal(to_numpy(out.expert_offsets), np.asarray(want.expert_offsets)), msg
                if layout == "token_major":
                    assert np.array_equal(to_numpy(out.topk_ids), np.asarray(want.topk_ids)), msg
                    assert np.array_equal(to_numpy(out.topk_weights), np.asarray(want.topk_weights)), msg
                previous = (handle, want_handle)
                # combine takes bf16 rows whatever the payload: a known function of each row's first bytes
                rows = tokens.reshape(-1, tokens.shape[-1])
                y = f32_to_bf16(np.repeat((rows[:, :1].astype(np.float32) - 128) / 64, H, axis=1))
                y = y.reshape(tokens.shape[:-1] + (H,))
                yd = to_device(fw, y.reshape(-1, H), ids, None)[0].reshape(y.shape)
                got = gpu.combine(yd, handle)
                want_c = ref.combine(y, want_handle)
                assert np.array_equal(to_numpy(got), np.asarray(want_c)), msg + " combine"
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


@pytest.mark.parametrize("H, K, fw, weights", [(7168, 8, "cupy", True), (2048, 6, "torch", False),
                                               (1024, 1, "cupy", True)], ids=["dsv3_weights", "torch_rows", "k1"])
def test_token_major_dispatch_and_combine_match_the_reference_bit_exactly(world, session_seed, H, K, fw, weights):
    multi_rank(world)
    if fw == "torch":
        pytest.importorskip("torch")

    def body():
        cfg, gpu, ref = build(world, "ht", 8 * world.size, H, K, 256, "token_major")
        try:
            for call in range(3):
                Tn = (256, 1, 0, 131)[(world.rank + call) % 4]
                x, ids, w = make_inputs(session_seed, world.rank, call, Tn, cfg, "skewed", 0.15, True, True)
                xd, idsd, wd = to_device(fw, x, ids, w)
                out, handle = gpu.dispatch(xd, idsd, wd)
                want, want_handle = ref.dispatch(x, ids, w)
                msg = f"seed={session_seed} rank={world.rank} call={call} T={Tn}"
                tokens = to_numpy(out.tokens)
                assert np.array_equal(tokens, want.tokens), msg
                assert np.array_equal(to_numpy(out.num_tokens_per_expert), np.asarray(want.num_tokens_per_expert)), msg
                rid, rw = to_numpy(out.topk_ids), to_numpy(out.topk_weights)
                assert np.array_equal(rid, np.asarray(want.topk_ids)), msg
                assert np.array_equal(rw, np.asarray(want.topk_weights)), msg
                assert np.array_equal(to_numpy(out.rank_prefix), np.asarray(want.rank_prefix)), msg
                # The caller's experts: a row's output is its weighted sum over this rank's experts (any function
                # of the row and its local slots; here sum_k w * 2^(e%3) * x, computed in float32).
                f = bf16_to_f32(tokens)
                coeff = np.where(rid >= 0, rw * (2.0 ** (np.maximum(rid, 0) % 3)), 0).sum(1).astype(np.float32)
                y = f32_to_bf16(f * coeff[:, None])
                yd = to_device(fw, y, ids, None)[0]
                got = gpu.combine(yd, handle, topk_weights=out.topk_weights if weights else None)
                want_c = ref.combine(y, want_handle, topk_weights=rw if weights else None)
                if weights:
                    (got_y, got_w), (want_y, want_w) = got, want_c
                    assert np.array_equal(to_numpy(got_w), np.asarray(want_w)), msg + " weights"
                    w_in = np.where(ids >= 0, w, 0).astype(np.float32)
                    assert np.array_equal(to_numpy(got_w), w_in), msg + " weights come home whole"
                else:
                    got_y, want_y = got, want_c
                assert np.array_equal(to_numpy(got_y), np.asarray(want_y)), msg + " combine"
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


def test_one_ranks_bad_scales_raise_on_every_rank_and_the_next_call_is_bit_exact(world, session_seed):
    multi_rank(world)
    import cupy

    def body():
        cfg, gpu, ref = build(world, "ht", 16, 1024, 4, 32, "flat")
        try:
            _, ids, w = make_inputs(session_seed, world.rank, 0, 32, cfg, "uniform", 0.0, True)
            x, sc = payload_inputs(session_seed, world.rank, 0, 32, 1024, "fp8")
            _, idsd, wd = to_device("cupy", np.zeros((32, 1024), np.uint16), ids, w)
            bad = world.rank == 0
            with pytest.raises(ValueError, match="scales: expected shape" if bad else "failed the input checks"):
                gpu.dispatch(cupy.asarray(x), idsd, wd, scales=cupy.asarray(sc[:31] if bad else sc))
            out, _ = gpu.dispatch(cupy.asarray(x), idsd, wd, scales=cupy.asarray(sc))
            want, _ = ref.dispatch(x, ids, w, scales=sc)
            assert np.array_equal(to_numpy(out.tokens), want.tokens)
            assert np.array_equal(to_numpy(out.scales), np.asarray(want.scales))
        finally:
            gpu.close()
            ref.close()

    collective(world, body)
