"""LL mode on GPUs against the reference (CPU backend over the same ranks), including CUDA-graph replay."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_cases import build, expert_scale, make_inputs, to_device, to_numpy, valid_rows_equal
from gpu_cases import collective, multi_rank

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]

# (name, E, H, K, T_max, per-rank T pattern, routing, drop, weights, layout, framework, ids dtype, dups)
CASES = [
    ("dsv3_decode", 256, 7168, 8, 128, (128, 0, 77, 1), "uniform", 0.0, True, "expert_major", "cupy", np.int64, False),
    ("skewed_drop_torch", 64, 4096, 8, 64, (64, 13, 0, 64), "skewed", 0.25, False, "expert_major", "torch", np.int32,
     True),
    ("k1_w_experts_flat", "W", 2048, 1, 32, (0, 32, 31, 2), "uniform", 0.1, True, "flat", "cupy", np.int32, False),
    ("k8_e64_flat_torch", 64, 2048, 8, 16, (16, 16, 0, 9), "uniform", 0.0, True, "flat", "torch", np.int64, False),
    # W * T_max slots exceed one pass of the block's warps: row order must still follow (source, token).
    ("more_slots_than_threads", 64, 1024, 8, 200, (200, 150, 0, 199), "skewed", 0.1, True, "expert_major", "cupy",
     np.int64, False),
]


def _scaled(tokens, scale, cap, H):
    """y = tokens * scale[e] on the device, exact (power-of-two scales), any framework."""
    if type(tokens).__module__.startswith("torch"):
        import torch
        s = torch.from_numpy(scale).cuda().to(torch.bfloat16)
        return (tokens.reshape(len(scale), cap, H) * s[:, None, None]).reshape(tokens.shape)
    import cupy
    f = (tokens.astype(cupy.uint32) << 16).view(cupy.float32).reshape(len(scale), cap, H)
    f = f * cupy.asarray(scale)[:, None, None]
    return (f.view(cupy.uint32) >> 16).astype(cupy.uint16).reshape(tokens.shape)


def _check(world, cfg, out, want, msg):
    cap, H = world.size * cfg.max_tokens_per_rank, cfg.hidden_size
    counts = to_numpy(out.num_tokens_per_expert)
    assert np.array_equal(counts, want.num_tokens_per_expert), msg
    assert valid_rows_equal(to_numpy(out.tokens), want.tokens, counts, cap, H), msg
    assert np.array_equal(to_numpy(out.expert_offsets), want.expert_offsets), msg


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dispatch_and_combine_match_the_reference_bit_exactly(world, session_seed, case):
    multi_rank(world)
    name, E, H, K, T_max, pattern, kind, drop, weights, layout, fw, ids_dtype, dups = case
    if fw == "torch":
        pytest.importorskip("torch")

    def body():
        cfg, gpu, ref = build(world, "ll", E, H, K, T_max, layout)
        scale = expert_scale(cfg, world.size)
        cap = world.size * T_max
        try:
            for call in range(4):
                T = pattern[(world.rank + call) % len(pattern)]
                x, ids, w = make_inputs(session_seed, world.rank, call, T, cfg, kind, drop, weights, dups)
                xd, idsd, wd = to_device(fw, x, ids, w, ids_dtype)
                out, handle = gpu.dispatch(xd, idsd, wd)
                want, want_handle = ref.dispatch(x, ids, w)
                msg = f"seed={session_seed} rank={world.rank} call={call} T={T}"
                _check(world, cfg, out, want, msg)
                y = _scaled(out.tokens, scale, cap, H)
                got = to_numpy(gpu.combine(y, handle))
                y_ref = to_numpy(y)
                assert np.array_equal(got, ref.combine(y_ref, want_handle)), msg
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


def test_a_handle_one_dispatch_old_combines_correctly_and_two_old_is_refused(world, session_seed):
    multi_rank(world)
    import cupy
    from ep import InvalidStateError

    def body():
        cfg, gpu, ref = build(world, "ll", 8 * world.size, 1024, 4, 16, "expert_major")
        try:
            seen = []
            for call in range(3):
                x, ids, w = make_inputs(session_seed, world.rank, call, 16 - world.rank, cfg, "uniform", 0.1, True)
                buf = cupy.empty((cfg.num_experts // world.size, world.size * 16, 1024), np.uint16)
                out, h = gpu.dispatch(*to_device("cupy", x, ids, w), output_buffer=buf)
                want, wh = ref.dispatch(x, ids, w)
                _check(world, cfg, out, want, f"seed={session_seed} call={call}")
                seen.append((out.tokens, h, wh))
            # age 1: the previous dispatch's handle still combines (its output_buffer kept its rows)
            tokens, h, wh = seen[1]
            got = to_numpy(gpu.combine(tokens, h))
            assert np.array_equal(got, ref.combine(to_numpy(tokens), wh))
            with pytest.raises(InvalidStateError):
                gpu.combine(seen[0][0], seen[0][1])
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


def _graph_case(world, session_seed, framework):
    cfg, gpu, ref = build(world, "ll", 64, 2048, 8, 32, "expert_major")
    T = 32 - 3 * world.rank
    x, ids, w = make_inputs(session_seed, world.rank, 0, T, cfg, "uniform", 0.1, True)
    xd, idsd, wd = to_device(framework, x, ids, w)
    try:
        if framework == "cupy":
            import cupy
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                out, h = gpu.dispatch(xd, idsd, wd)       # eager call: builds LL state, framework views
                gpu.combine(out.tokens, h)
                stream.synchronize()
                stream.begin_capture()
                out, h = gpu.dispatch(xd, idsd, wd)
                combined = gpu.combine(out.tokens, h)     # identity MLP
                graph = stream.end_capture()
            replay = lambda: (graph.launch(stream), stream.synchronize())   # noqa: E731
            def load(a, b, c):
                xd.set(a); idsd.set(b); wd.set(c)
                cupy.cuda.Device().synchronize()   # the copies ran on the legacy stream
        else:
            import torch
            out, h = gpu.dispatch(xd, idsd, wd)
            gpu.combine(out.tokens * 2, h)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out, h = gpu.dispatch(xd, idsd, wd)
                combined = gpu.combine(out.tokens * 2, h)
            replay = lambda: (graph.replay(), torch.cuda.synchronize())   # noqa: E731
            def load(a, b, c):
                xd.copy_(torch.from_numpy(a.view(np.int16)).view(torch.bfloat16))
                idsd.copy_(torch.from_numpy(b)); wd.copy_(torch.from_numpy(c))
        for call in range(1, 6):   # new values in the same input tensors, every replay checked
            x, ids, w = make_inputs(session_seed, world.rank, call, T, cfg, "skewed" if call % 2 else "uniform", 0.1, True)
            load(x, ids.astype(np.int64), w)
            world.Barrier()
            replay()
            want, wh = ref.dispatch(x, ids, w)
            msg = f"seed={session_seed} rank={world.rank} replay={call}"
            _check(world, cfg, out, want, msg)
            y = want.tokens if framework == "cupy" else _double(want.tokens)
            assert np.array_equal(to_numpy(combined), ref.combine(y, wh)), msg
    finally:
        gpu.close()
        ref.close()


def _double(bits: np.ndarray) -> np.ndarray:
    from ep.reference import bf16_to_f32, f32_to_bf16
    return f32_to_bf16(bf16_to_f32(bits) * 2)


@pytest.mark.parametrize("framework", ["cupy", "torch"])
def test_a_captured_graph_replays_correctly_with_new_input_values(world, session_seed, framework):
    multi_rank(world)
    if framework == "torch":
        pytest.importorskip("torch")
    collective(world, _graph_case, world, session_seed, framework)
