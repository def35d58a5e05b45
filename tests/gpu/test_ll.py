"""LL mode on GPUs against the reference (CPU backend over the same ranks), including CUDA-graph replay."""
from __future__ import annotations

import numpy as np
import pytest

import time

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
    # T up to 1024 on every rank independently, E whose routing bitmap needs several column tiles.
    ("t1024_independent", 64, 512, 8, 1024, (1024, 0, 333, 1), "uniform", 0.05, True, "expert_major", "cupy",
     np.int64, True),
    ("e1024_tiled_bitmap", 1024, 256, 8, 512, (512, 77, 0, 512), "skewed", 0.1, True, "expert_major", "cupy",
     np.int32, False),
]
# The hidden sizes decode serving uses (a partial last 2 KB chunk at 2560, 5120, 6144).
HIDDEN = [2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192]


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


@pytest.mark.parametrize("H", HIDDEN)
def test_every_served_hidden_size_is_bit_exact(world, session_seed, H):
    multi_rank(world)
    case = (f"h{H}", 32, H, 8, 16, (16, 3, 0, 9), "uniform", 0.1, True, "expert_major", "cupy", np.int64, False)
    _run_case(world, session_seed, case)


def _run_case(world, session_seed, case):
    name, E, H, K, T_max, pattern, kind, drop, weights, layout, fw, ids_dtype, dups = case

    def body():
        cfg, gpu, ref = build(world, "ll", E, H, K, T_max, layout)
        scale = expert_scale(cfg, world.size)
        cap = world.size * T_max
        try:
            for call in range(3):
                T = pattern[(world.rank + call) % len(pattern)]
                x, ids, w = make_inputs(session_seed, world.rank, call, T, cfg, kind, drop, weights, dups)
                xd, idsd, wd = to_device(fw, x, ids, w, ids_dtype)
                out, handle = gpu.dispatch(xd, idsd, wd)
                want, want_handle = ref.dispatch(x, ids, w)
                msg = f"seed={session_seed} rank={world.rank} H={H} call={call} T={T}"
                _check(world, cfg, out, want, msg)
                y = _scaled(out.tokens, scale, cap, H)
                assert np.array_equal(to_numpy(gpu.combine(y, handle)), ref.combine(to_numpy(y), want_handle)), msg
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


@pytest.mark.parametrize("cast", ["fp8", "fp8_pow2", "fp8_ue8m0"])
@pytest.mark.parametrize("fw", ["cupy", "torch"])
def test_the_fp8_cast_is_bit_exact_tokens_and_token_contiguous_scales(world, session_seed, cast, fw):
    multi_rank(world)
    if fw == "torch":
        torch = pytest.importorskip("torch")
    from ep import Fp8Cast
    c = {"fp8": Fp8Cast(), "fp8_pow2": Fp8Cast(round_scale=True), "fp8_ue8m0": Fp8Cast(ue8m0=True)}[cast]

    def body():
        cfg, gpu, ref = build(world, "ll", 64, 7168, 8, 32, "expert_major")
        try:
            for call in range(3):
                T = (32, 5, 0, 17)[(world.rank + call) % 4]
                x, ids, w = make_inputs(session_seed, world.rank, call, T, cfg, "uniform", 0.1, True)
                if call == 1 and T:   # special values: zeros, a tiny group (amax floor), huge values
                    x[0, :128] = 0
                    x[0, 128:256] = 0x0001
                    x[0, 256:384] = 0x7F00
                xd, idsd, wd = to_device(fw, x, ids, w)
                out, handle = gpu.dispatch(xd, idsd, wd, cast=c)
                want, _ = ref.dispatch(x, ids, w, cast=c)
                msg = f"seed={session_seed} rank={world.rank} call={call} T={T} {cast}"
                counts = to_numpy(out.num_tokens_per_expert)
                assert np.array_equal(counts, want.num_tokens_per_expert), msg
                got_t = to_numpy(out.tokens.view(torch.uint8) if fw == "torch" else out.tokens)
                want_t = np.asarray(want.tokens.view(np.uint8) if hasattr(want.tokens, "view") else want.tokens)
                got_s = to_numpy(out.scales.contiguous() if fw == "torch" else out.scales)
                want_s = np.asarray(want.scales)
                assert out.scales.shape == want_s.shape, msg
                for e, n in enumerate(counts):
                    assert np.array_equal(got_t[e, :n], want_t[e, :n]), msg + f" tokens of expert {e}"
                    assert np.array_equal(got_s[e, :n], want_s[e, :n]), msg + f" scales of expert {e}"
                y = out.tokens.new_zeros(out.tokens.shape, dtype=torch.bfloat16) if fw == "torch" else None
                if y is None:
                    import cupy
                    y = cupy.zeros(out.tokens.shape, np.uint16)
                gpu.combine(y, handle)   # bf16 expert outputs after an FP8 dispatch
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


def test_cumulative_counts_add_every_dispatch_on_the_device(world, session_seed):
    multi_rank(world)
    import cupy

    def body():
        cfg, gpu, ref = build(world, "ll", 32, 1024, 4, 16, "expert_major")
        try:
            acc = cupy.full(cfg.num_experts // world.size, 7, np.int64)
            want = np.full(cfg.num_experts // world.size, 7, np.int64)
            for call in range(4):
                x, ids, w = make_inputs(session_seed, world.rank, call, 16 - call, cfg, "skewed", 0.0, True)
                out, _ = gpu.dispatch(*to_device("cupy", x, ids, w), cumulative_counts=acc)
                want += to_numpy(out.num_tokens_per_expert)
            assert np.array_equal(acc.get(), want)
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_receive_hooks_of_two_interleaved_micro_batches_give_the_plain_results(world, session_seed, graph):
    multi_rank(world)
    import cupy

    def body():
        cfg, gpu, ref = build(world, "ll", 64, 2048, 8, 32, "expert_major")
        try:
            inputs = [make_inputs(session_seed, world.rank, 10 + m, 32 - 5 * m - world.rank, cfg, "uniform", 0.1, True)
                      for m in range(2)]
            dev = [to_device("cupy", *inp) for inp in inputs]
            stream = cupy.cuda.Stream(non_blocking=True)

            def step():
                a_out, a_h, a_hook = gpu.dispatch(*dev[0], return_recv_hook=True, stream=stream)
                b_out, b_h, b_hook = gpu.dispatch(*dev[1], return_recv_hook=True, stream=stream)
                a_hook()
                a_y, a_c = gpu.combine(a_out.tokens, a_h, return_recv_hook=True, stream=stream)
                b_hook()
                a_c()
                b_y, b_c = gpu.combine(b_out.tokens, b_h, return_recv_hook=True, stream=stream)
                b_c()
                return (a_out, a_y), (b_out, b_y)

            with stream:
                if graph:
                    step()
                    stream.synchronize()
                    stream.begin_capture()
                    results = step()
                    g = stream.end_capture()
                    for _ in range(2):
                        g.launch(stream)
                else:
                    results = step()
                stream.synchronize()
            for m, (out, y) in enumerate(results):
                want, wh = ref.dispatch(*inputs[m])
                _check(world, cfg, out, want, f"micro-batch {m}")
                assert np.array_equal(to_numpy(y), ref.combine(want.tokens, wh)), f"micro-batch {m} combine"
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


def test_hook_misuse_raises_before_anything_is_launched(world, session_seed):
    multi_rank(world)
    from ep import InvalidStateError

    def body():
        cfg, gpu, ref = build(world, "ll", 32, 1024, 4, 16, "expert_major")
        try:
            x, ids, w = make_inputs(session_seed, world.rank, 0, 16, cfg, "uniform", 0.0, True)
            d = to_device("cupy", x, ids, w)
            out, h, hook = gpu.dispatch(*d, return_recv_hook=True)
            with pytest.raises(InvalidStateError, match="receive hook has not been called"):
                gpu.combine(out.tokens, h)
            hook()
            with pytest.raises(InvalidStateError, match="already called"):
                hook()
            want, wh = ref.dispatch(x, ids, w)
            assert np.array_equal(to_numpy(gpu.combine(out.tokens, h)), ref.combine(want.tokens, wh))
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


def test_one_ranks_bad_input_raises_on_every_rank_and_the_next_call_is_bit_exact(world, session_seed):
    multi_rank(world)
    from ep import PeerInputError

    def body():
        cfg, gpu, ref = build(world, "ll", 32, 1024, 4, 16, "expert_major")
        try:
            x, ids, w = make_inputs(session_seed, world.rank, 0, 16, cfg, "uniform", 0.0, True)
            xd, idsd, wd = to_device("cupy", x, ids, w)
            mine = world.rank == 0
            start = time.monotonic()
            with pytest.raises(ValueError) as info:
                gpu.dispatch(xd, idsd, wd[:, :2] if mine else wd)
            assert time.monotonic() - start < 1.0
            assert isinstance(info.value, PeerInputError) != mine
            out, h = gpu.dispatch(xd, idsd, wd)
            want, wh = ref.dispatch(x, ids, w)
            _check(world, cfg, out, want, "after the refusal")
            assert np.array_equal(to_numpy(gpu.combine(out.tokens, h)), ref.combine(want.tokens, wh))
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


def test_an_invalid_expert_id_is_an_unused_slot_reported_on_every_rank_in_the_next_call(world, session_seed):
    multi_rank(world)
    from ep import PeerInputError

    def body():
        cfg, gpu, ref = build(world, "ll", 32, 1024, 4, 16, "expert_major")
        try:
            x, ids, w = make_inputs(session_seed, world.rank, 0, 16, cfg, "uniform", 0.0, True)
            bad = ids.copy()
            if world.rank == 0:
                bad[3, 1] = cfg.num_experts + 5
            out, h = gpu.dispatch(*to_device("cupy", x, bad, w))
            gpu.synchronize()
            dropped = bad.copy()
            dropped[dropped >= cfg.num_experts] = -1
            want, wh = ref.dispatch(x, dropped, w)
            _check(world, cfg, out, want, "the invalid slot dropped")
            with pytest.raises(ValueError) as info:
                gpu.dispatch(*to_device("cupy", x, ids, w))
            assert isinstance(info.value, PeerInputError) == (world.rank != 0)
            out, h = gpu.dispatch(*to_device("cupy", x, ids, w))
            want, wh = ref.dispatch(x, ids, w)
            _check(world, cfg, out, want, "the next call")
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


@pytest.mark.parametrize("how", ["eager", "hook", "graph", "empty_rank"])
def test_combine_time_weights_replace_the_dispatchs_bit_exactly(world, session_seed, how):
    """DeepEP's LL gives the routing weights to combine: the result is the reference's with those weights.
    empty_rank: rank 0 has no tokens (its [0, K] weights have no address) and must still release the others."""
    multi_rank(world)
    import cupy

    def body():
        cfg, gpu, ref = build(world, "ll", 64, 2048, 8, 32, "expert_major")
        scale = expert_scale(cfg, world.size)
        cap = world.size * 32
        T = 0 if how == "empty_rank" and world.rank == 0 else 32 - 7 * world.rank % 32
        try:
            x, ids, w = make_inputs(session_seed, world.rank, 20, T, cfg, "skewed", 0.1, True, True)
            xd, idsd, wd = to_device("cupy", x, ids, w)
            later = cupy.empty((T, 8), cupy.float32)
            scale_d = cupy.asarray(scale)[:, None, None]   # on the device before any capture
            stream = cupy.cuda.Stream(non_blocking=True)

            def step():
                out, h = gpu.dispatch(xd, idsd, None if how == "hook" else wd, stream=stream)
                f = (out.tokens.astype(cupy.uint32) << 16).view(cupy.float32).reshape(-1, cap, 2048) * scale_d
                y = (f.view(cupy.uint32) >> 16).astype(cupy.uint16).reshape(out.tokens.shape)   # exact: powers of 2
                if how == "hook":
                    got, hook = gpu.combine(y, h, weights=later, return_recv_hook=True, stream=stream)
                    hook()
                else:
                    got = gpu.combine(y, h, weights=later, stream=stream)
                return got

            with stream:
                if how == "graph":
                    step()
                    stream.synchronize()
                    stream.begin_capture()
                    got = step()
                    graph = stream.end_capture()
            for call in range(3):    # new combine-time weights each time, every result checked
                w2 = np.random.default_rng([session_seed, world.rank, call]).random((T, 8), np.float32) * 2 - 1
                later.set(w2)
                cupy.cuda.Device().synchronize()
                world.Barrier()
                with stream:
                    if how == "graph":
                        graph.launch(stream)
                    else:
                        got = step()
                    stream.synchronize()
                want, wh = ref.dispatch(x, ids, None if how == "hook" else w)
                y_ref = to_numpy(_scaled(cupy.asarray(want.tokens), scale, cap, 2048))
                expected = ref.combine(y_ref, wh, weights=w2)
                assert np.array_equal(to_numpy(got), expected), f"seed={session_seed} rank={world.rank} call={call}"
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


@pytest.mark.parametrize("hook", [False, True], ids=["plain", "hook"])
def test_row_sources_name_each_rows_source_token_as_the_reference_says(world, session_seed, hook):
    """row_sources (DeepEP's src_info / layout_range) of a dispatch one newer dispatch ago, from the MetaRecs."""
    multi_rank(world)
    from ep import reference

    def body():
        cfg, gpu, ref = build(world, "ll", 8 * world.size, 1024, 4, 32, "expert_major")
        try:
            T = 32 - 5 * world.rank % 32
            x, ids, w = make_inputs(session_seed, world.rank, 40, T, cfg, "skewed", 0.1, True, True)
            xd, idsd, wd = to_device("cupy", x, ids, w)
            if hook:
                _, h, recv = gpu.dispatch(xd, idsd, wd, return_recv_hook=True)
                recv()
            else:
                _, h = gpu.dispatch(xd, idsd, wd)
            gpu.dispatch(xd, idsd, wd)   # one newer dispatch: h can still be combined, and asked
            src_token, src_counts = gpu.row_sources(h)
            want_token, want_counts = reference.row_sources(world.allgather(ids), world.rank, cfg.num_experts,
                                                            world.size, world.size * 32)
            msg = f"seed={session_seed} rank={world.rank}"
            assert np.array_equal(to_numpy(src_token), want_token), msg
            assert np.array_equal(to_numpy(src_counts), want_counts), msg
        finally:
            gpu.close()
            ref.close()

    collective(world, body)


def test_a_handle_two_sends_old_is_refused_even_before_the_newest_hook_runs(world, session_seed):
    """Dispatch n, n + 1, then n + 2 with its hook not yet called: n + 2's send half already rewrote n's parity
    (metadata, masks, token counts), so combining n, or asking its row sources, raises on every rank."""
    multi_rank(world)
    from ep import InvalidStateError

    def body():
        cfg, gpu, ref = build(world, "ll", 8 * world.size, 1024, 4, 16, "expert_major")
        try:
            x, ids, w = make_inputs(session_seed, world.rank, 50, 16, cfg, "uniform", 0.0, True)
            xd, idsd, wd = to_device("cupy", x, ids, w)
            out, h = gpu.dispatch(xd, idsd, wd)
            gpu.dispatch(xd, idsd, wd)
            out2, h2, recv = gpu.dispatch(xd, idsd, wd, return_recv_hook=True)
            with pytest.raises(InvalidStateError, match="dispatches old"):
                gpu.combine(out.tokens, h)
            with pytest.raises(InvalidStateError, match="dispatches old"):
                gpu.row_sources(h)
            recv()
            want, wh = ref.dispatch(x, ids, w)
            assert np.array_equal(to_numpy(gpu.combine(out2.tokens, h2)), ref.combine(want.tokens, wh))
        finally:
            gpu.close()
            ref.close()

    collective(world, body)
