"""HT cached dispatch and combine inside a torch CUDA graph, replayed between eager calls, bit-exact.

A cached dispatch and a combine never wait on the host, so they can be captured; their sequence numbers
(dispatch epoch, barrier generation) live on the device, so replays and eager calls interleave in any order.
"""
from __future__ import annotations

import numpy as np
import pytest

from ep import testing as T
from gpu_cases import build, collective, expert_scale, make_inputs, mlp_numpy, multi_rank, to_numpy

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]


@pytest.mark.parametrize("owned", [False, True], ids=["fresh_outputs", "owned_output"])
def test_a_graph_of_cached_dispatch_mlp_and_combine_replays_bit_exactly_between_eager_calls(world, session_seed, owned):
    multi_rank(world)
    torch = pytest.importorskip("torch")

    def body():
        cfg, gpu, ref = build(world, "ht", 64, 1024, 8, 256, "flat", owned=owned)
        scale = expert_scale(cfg, world.size)
        T_mine = 200 + 7 * (world.rank % 8)   # <= T_max (256) at every world size
        try:
            x0, ids, w0 = make_inputs(session_seed, world.rank, 0, T_mine, cfg, "uniform", 0.1, True, duplicates=True)
            xd = torch.from_numpy(x0.view(np.int16)).cuda().view(torch.bfloat16)
            idsd = torch.from_numpy(ids).cuda()
            wd = torch.from_numpy(w0).cuda()
            out, handle = gpu.dispatch(xd, idsd, wd)          # eager: the routing the graph reuses
            want0, _ = ref.dispatch(x0, ids, w0)
            offsets = want0.expert_offsets
            row_scale = np.ones((to_numpy(out.tokens).shape[0], 1), np.float32)
            for e in range(len(scale)):
                row_scale[offsets[e]:offsets[e + 1]] = scale[e]
            row_scale_d = torch.from_numpy(row_scale).cuda().to(torch.bfloat16)   # powers of two: exact

            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                g_out, g_handle = gpu.dispatch(xd, idsd, wd, previous_handle=handle)
                g_y = g_out.tokens * row_scale_d
                g_combined = gpu.combine(g_y, g_handle)

            def check(call: int, what: str):
                x, w = xd_host[call], wd_host[call]
                want, want_handle = ref.dispatch(x, ids, w)
                msg = f"seed={session_seed} rank={world.rank} {what}"
                assert np.array_equal(to_numpy(g_out.tokens), want.tokens), msg
                assert np.array_equal(to_numpy(g_out.num_tokens_per_expert), want.num_tokens_per_expert), msg
                y = mlp_numpy(want.tokens, want.expert_offsets, scale, cfg.layout)
                assert np.array_equal(to_numpy(g_combined), ref.combine(y, want_handle)), msg

            xd_host, wd_host = {}, {}
            for call in range(1, 5):
                rng = T.seed_for(session_seed, world.rank, 100 + call)
                xd_host[call] = T.random_tokens(rng, T_mine, cfg.hidden_size)
                wd_host[call] = T.random_weights(rng, T_mine, cfg.topk)
                xd.copy_(torch.from_numpy(xd_host[call].view(np.int16)).view(torch.bfloat16))
                wd.copy_(torch.from_numpy(wd_host[call]))
                graph.replay()
                if call == 2:        # twice in a row: dispatch, combine, dispatch, combine from replays alone
                    graph.replay()
                torch.cuda.synchronize()
                check(call, f"replay {call}")
                if call % 2:         # eager calls in between advance the device epochs on every rank alike
                    x_e, ids_e, w_e = make_inputs(session_seed, world.rank, 10 + call, 64, cfg, "skewed", 0.0, True)
                    e_out, e_handle = gpu.dispatch(torch.from_numpy(x_e.view(np.int16)).cuda().view(torch.bfloat16),
                                                   torch.from_numpy(ids_e).cuda(), torch.from_numpy(w_e).cuda())
                    e_cached, _ = gpu.dispatch(torch.from_numpy(x_e.view(np.int16)).cuda().view(torch.bfloat16),
                                               torch.from_numpy(ids_e).cuda(), torch.from_numpy(w_e).cuda(),
                                               previous_handle=e_handle)
                    e_comb = gpu.combine(e_cached.tokens, e_handle)
                    want_e, want_e_handle = ref.dispatch(x_e, ids_e, w_e)
                    assert np.array_equal(to_numpy(e_cached.tokens), want_e.tokens)
                    assert np.array_equal(to_numpy(e_comb), ref.combine(want_e.tokens, want_e_handle))
        finally:
            torch.cuda.synchronize()
            gpu.close()
            ref.close()

    collective(world, body)


def test_a_graph_of_worst_case_dispatch_and_combine_replays_new_routings_bit_exactly(world, session_seed):
    """worst_case=True: an uncached TOKEN_MAJOR dispatch (routing and count exchange included) and its combine
    captured once, replayed with new tokens, routings and weights written into the captured inputs; eager
    calls in between. Rows past the received ones: ids -1, weights 0; rank_prefix as the reference's."""
    multi_rank(world)
    torch = pytest.importorskip("torch")

    def body():
        cfg, gpu, ref = build(world, "ht", 8 * world.size, 1024, 4, 64, "token_major")
        T_mine, N = 40 + 5 * (world.rank % 4), world.size * 64

        def inputs(call):
            x, ids, w = make_inputs(session_seed, world.rank, 200 + call, T_mine, cfg, "skewed", 0.15, True, True)
            return x, ids, w

        def dev(x, ids, w):
            return (torch.from_numpy(x.view(np.int16)).cuda().view(torch.bfloat16), torch.from_numpy(ids).cuda(),
                    torch.from_numpy(w).cuda())

        def check(out, combined, x, ids, w, what):
            want, want_handle = ref.dispatch(x, ids, w)
            n = np.asarray(want.tokens).shape[0]
            msg = f"seed={session_seed} rank={world.rank} {what}"
            rid, rw = to_numpy(out.topk_ids), to_numpy(out.topk_weights)
            assert rid.shape == (N, cfg.topk) and to_numpy(out.tokens).shape == (N, cfg.hidden_size), msg
            assert np.array_equal(to_numpy(out.tokens)[:n], want.tokens), msg
            assert np.array_equal(rid[:n], want.topk_ids) and (rid[n:] == -1).all(), msg
            assert np.array_equal(rw[:n], want.topk_weights) and (rw[n:] == 0).all(), msg
            assert np.array_equal(to_numpy(out.num_tokens_per_expert), want.num_tokens_per_expert), msg
            assert np.array_equal(to_numpy(out.rank_prefix), np.asarray(want.rank_prefix)), msg
            y = (np.asarray(want.tokens).view(np.uint16).astype(np.uint32) << 16).view(np.float32) * 2
            y = (y.view(np.uint32) >> 16).astype(np.uint16)   # x2 is exact in bf16
            want_y, want_w = ref.combine(y, want_handle, topk_weights=np.asarray(want.topk_weights))
            got_y, got_w = combined
            assert np.array_equal(to_numpy(got_y), np.asarray(want_y)), msg + " combine"
            assert np.array_equal(to_numpy(got_w), np.asarray(want_w)), msg + " combined weights"

        try:
            x0, ids0, w0 = inputs(0)
            xd, idsd, wd = dev(x0, ids0, w0)
            out, handle = gpu.dispatch(xd, idsd, wd, worst_case=True)      # eager first
            check(out, gpu.combine(out.tokens * 2, handle, topk_weights=out.topk_weights), x0, ids0, w0, "eager")
            assert out.num_tokens_per_expert_host is None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                g_out, g_handle = gpu.dispatch(xd, idsd, wd, worst_case=True)
                g_comb = gpu.combine(g_out.tokens * 2, g_handle, topk_weights=g_out.topk_weights)
            for call in range(1, 5):
                x, ids, w = inputs(call)
                for d, h in zip((xd, idsd, wd), dev(x, ids, w)):
                    d.copy_(h)
                graph.replay()
                if call == 2:
                    graph.replay()
                torch.cuda.synchronize()
                check(g_out, g_comb, x, ids, w, f"replay {call}")
                if call % 2:   # eager calls in between: a host-sized dispatch and a worst-case one
                    xe, idse, we = inputs(10 + call)
                    e_out, e_handle = gpu.dispatch(*dev(xe, idse, we))
                    gpu.combine(e_out.tokens, e_handle)
                    w_out, w_handle = gpu.dispatch(*dev(xe, idse, we), worst_case=True)
                    check(w_out, gpu.combine(w_out.tokens * 2, w_handle, topk_weights=w_out.topk_weights),
                          xe, idse, we, f"eager after replay {call}")
        finally:
            torch.cuda.synchronize()
            gpu.close()
            ref.close()

    collective(world, body)


def test_a_worst_case_dispatch_with_an_invalid_id_moves_nothing_and_a_later_call_reports_it(world, session_seed):
    """Nothing waits on a worst-case exchange: every rank's kernels move nothing (ids -1, zero counts) and the
    exchange's record reaches the host; the next call after it raises on every rank, then calls are exact."""
    multi_rank(world)
    torch = pytest.importorskip("torch")
    from ep import PeerInputError

    def body():
        cfg, gpu, ref = build(world, "ht", 8 * world.size, 1024, 4, 32, "token_major")
        try:
            x, ids, w = make_inputs(session_seed, world.rank, 300, 20, cfg, "uniform", 0.1, True)
            bad = ids.copy()
            if world.rank == 0:
                bad[5, 2] = cfg.num_experts + 1

            def dev(i):
                return (torch.from_numpy(x.view(np.int16)).cuda().view(torch.bfloat16), torch.from_numpy(i).cuda(),
                        torch.from_numpy(w).cuda())
            out, _ = gpu.dispatch(*dev(bad), worst_case=True)
            gpu.synchronize()
            assert (to_numpy(out.topk_ids) == -1).all() and (to_numpy(out.topk_weights) == 0).all()
            assert (to_numpy(out.num_tokens_per_expert) == 0).all() and (to_numpy(out.rank_prefix) == 0).all()
            expected = ValueError if world.rank == 0 else PeerInputError
            with pytest.raises(expected, match="earlier"):
                gpu.dispatch(*dev(ids), worst_case=True)
            out, handle = gpu.dispatch(*dev(ids), worst_case=True)
            want, _ = ref.dispatch(x, ids, w)
            n = np.asarray(want.tokens).shape[0]
            assert np.array_equal(to_numpy(out.tokens)[:n], want.tokens)
            assert np.array_equal(to_numpy(out.topk_ids)[:n], want.topk_ids)
        finally:
            torch.cuda.synchronize()
            gpu.close()
            ref.close()

    collective(world, body)
