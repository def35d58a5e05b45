"""Overlap on GPUs: async ops on the comm stream and the signalled (block-level overlapped) LL combine give
the plain results bit for bit, eagerly and replayed in a CUDA graph. Runs at any world size (mpirun -np 1
included)."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_cases import build, collective, expert_scale, make_inputs, mlp_numpy, to_device, to_numpy

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]


def _slow_copy(fw: str, src, stream):
    """dst = src, produced on ``stream`` behind ~ms of unrelated work (an async op that did not wait for the
    caller's stream would read dst before it is written)."""
    if fw == "torch":
        import torch
        with torch.cuda.stream(stream):
            a = torch.randn(4096, 4096, device="cuda")
            for _ in range(8):
                a = a @ a
                a = a / a.abs().amax()
            dst = torch.empty_like(src)
            dst.copy_(src)
        return dst
    import cupy
    with stream:
        a = cupy.random.standard_normal((4096, 4096), dtype=np.float32)
        for _ in range(8):
            a = a @ a
            a /= cupy.abs(a).max()
        dst = cupy.empty_like(src)
        dst[...] = src
    return dst


@pytest.mark.parametrize("mode, fw", [("ht", "cupy"), ("ht", "torch"), ("ll", "cupy"), ("ll", "torch")])
def test_async_ops_wait_for_the_callers_stream_and_match_the_reference(world, session_seed, mode, fw):
    if fw == "torch":
        pytest.importorskip("torch")

    def body():
        layout = "flat" if mode == "ht" else "expert_major"
        cfg, gpu, ref = build(world, mode, 8 * world.size, 2048, 4, 64, layout)
        if fw == "torch":
            import torch
            caller = torch.cuda.Stream()
        else:
            import cupy
            caller = cupy.cuda.Stream(non_blocking=True)
        scale = expert_scale(cfg, world.size)
        try:
            previous = None
            for call in range(3):   # new routing, a cached dispatch (HT), new routing
                cached = mode == "ht" and call == 1      # call 0's routing, new token values
                T = (64, 0, 33, 7)[(world.rank + (call if not cached else 0)) % 4]
                x, ids, w = make_inputs(session_seed, world.rank, call, T, cfg, "uniform", 0.1, True)
                if cached:
                    ids = make_inputs(session_seed, world.rank, 0, T, cfg, "uniform", 0.1, True)[1]
                xd, idsd, wd = to_device(fw, x, ids, w)
                x_late = _slow_copy(fw, xd, caller)
                prev = previous if cached else None
                out, handle, ev = gpu.dispatch_async(x_late, idsd, wd, stream=caller,
                                                     previous_handle=None if prev is None else prev[0])
                want, want_handle = ref.dispatch(x, ids, w, previous_handle=None if prev is None else prev[1])
                ev.wait(caller)
                caller.synchronize()
                msg = f"seed={session_seed} rank={world.rank} call={call} T={T} {mode} {fw}"
                got = to_numpy(out.tokens)
                counts = to_numpy(out.num_tokens_per_expert)
                assert np.array_equal(counts, want.num_tokens_per_expert), msg
                if mode == "ht":
                    assert np.array_equal(got, want.tokens), msg
                else:
                    cap = world.size * cfg.max_tokens_per_rank
                    g, wt = got.reshape(-1, cap, cfg.hidden_size), want.tokens.reshape(-1, cap, cfg.hidden_size)
                    assert all(np.array_equal(g[e, :n], wt[e, :n]) for e, n in enumerate(counts)), msg
                y = mlp_numpy(got, to_numpy(out.expert_offsets), scale, cfg.layout)
                yd = to_device(fw, y.reshape(-1, cfg.hidden_size), ids, None)[0].reshape(got.shape)
                y_late = _slow_copy(fw, yd, caller)
                combined, ev = gpu.combine_async(y_late, handle, stream=caller)
                ev.wait(caller)
                caller.synchronize()
                assert np.array_equal(to_numpy(combined), ref.combine(y, want_handle)), msg + " combine"
                previous = (handle, want_handle)
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


def _expert_mlp_with_signals(tokens, y, scale, signals, cap: int, H: int, stream):
    """y[e] = tokens[e] * scale[e], expert by expert on ``stream``, each followed by its signal."""
    import cupy
    t = tokens.reshape(len(scale), cap, H)
    yv = y.reshape(len(scale), cap, H)
    with stream:
        for e in range(len(scale)):
            f = (t[e].astype(cupy.uint32) << 16).view(cupy.float32) * np.float32(scale[e])
            yv[e] = (f.view(cupy.uint32) >> 16).astype(cupy.uint16)
            signals.signal(e, stream=stream)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
def test_a_signalled_ll_combine_overlaps_the_expert_mlp_and_is_bit_identical(world, session_seed, graph):
    import cupy
    from ep import CommOverlapConfig, DispatchLayout, MoECommunicatorConfig, MoECommunicator

    def body():
        cfg = MoECommunicatorConfig(mode="ll", num_experts=8 * world.size, hidden_size=4096, topk=8,
                                    max_tokens_per_rank=64, timeout_s=20, output_layout=DispatchLayout.EXPERT_MAJOR,
                                    overlap=CommOverlapConfig(combine_num_sms=8))
        gpu = MoECommunicator(cfg, world, backend="gpu")
        ref = MoECommunicator(cfg, world, backend="cpu")
        cap, H, L = world.size * 64, 4096, gpu.num_local_experts
        scale = expert_scale(cfg, world.size)
        compute = cupy.cuda.Stream(non_blocking=True)
        signals = gpu.create_overlap_config(framework="cupy")
        T = 64 - 5 * world.rank
        x, ids, w = make_inputs(session_seed, world.rank, 0, T, cfg, "uniform", 0.1, True)
        xd, idsd, wd = to_device("cupy", x, ids, w)
        y = cupy.empty((L, cap, H), np.uint16)

        def step():
            out, handle = gpu.dispatch(xd, idsd, wd, stream=compute)
            start = cupy.cuda.Event(disable_timing=True)
            start.record(compute)
            # the combine starts with the MLP (after the dispatch only), on 8 SMs
            _expert_mlp_with_signals(out.tokens, y, scale, signals, cap, H, compute)
            combined, ev = gpu.combine_async(y, handle, previous_event=start, overlap=signals, stream=compute)
            ev.wait(compute)
            return out, combined

        try:
            for call in range(4):
                if call:
                    x, ids, w = make_inputs(session_seed, world.rank, call, T, cfg, "skewed", 0.1, True)
                    xd.set(x), idsd.set(ids.astype(np.int64)), wd.set(w)
                    cupy.cuda.Device().synchronize()
                world.Barrier()
                if graph and call == 0:
                    step()                               # eager first: state and views exist before capture
                    compute.synchronize()
                    world.Barrier()
                    compute.begin_capture()
                    out, combined = step()
                    g = compute.end_capture()
                if graph:
                    g.launch(compute)
                else:
                    out, combined = step()
                compute.synchronize()
                want, wh = ref.dispatch(x, ids, w)
                msg = f"seed={session_seed} rank={world.rank} call={call} graph={graph}"
                yn = mlp_numpy(want.tokens, want.expert_offsets, scale, cfg.layout)
                assert np.array_equal(to_numpy(combined), ref.combine(yn, wh)), msg
                assert not to_numpy(signals.counters).any(), msg + " counters back to zero"
        finally:
            gpu.close()
            ref.close()

    collective(world, body)
