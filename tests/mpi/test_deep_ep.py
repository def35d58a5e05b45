"""The deep_ep package (compat/): DeepEP V1's API on ep, in the call sequences vLLM, SGLang and Megatron make.

Collective like the rest of tests/mpi. Runs on the CPU backend in CI (torch CPU tensors) and on GPUs with
``EP_BACKEND=gpu`` (``make test-gpu``: W=1, and W=2/4/8 sharing one GPU); the expectations are built here in
NumPy from every rank's inputs, and bit-exact.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
deep_ep = pytest.importorskip("deep_ep")
MPI = pytest.importorskip("mpi4py.MPI")

from ep import reference, testing  # noqa: E402
from ep.config import DispatchLayout  # noqa: E402
from ep.reference import bf16_to_f32, f32_to_bf16  # noqa: E402

H = 256                  # hidden (LL FP8 with UE8M0 needs H % 512: that case uses 512)
EXPERTS_PER_RANK = 3
TOPK = 4


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def buffers(mpi):
    """Make Buffers over COMM_WORLD (as SGLang passes a group, tests pass comm=); destroyed after the test."""
    made = []

    def make(**kwargs):
        kwargs.setdefault("explicitly_destroy", True)
        buf = deep_ep.Buffer(None, comm=MPI.COMM_WORLD, **kwargs)
        made.append(buf)
        if buf._backend == "gpu":
            torch.cuda.set_device(buf._group.local_rank % torch.cuda.device_count())
        return buf
    yield make
    for buf in made:
        buf.destroy()


def device_of(buf):
    return torch.device("cuda", torch.cuda.current_device()) if buf._backend == "gpu" else torch.device("cpu")


def to_torch(bits: np.ndarray, device) -> torch.Tensor:
    """uint16 bf16 bit patterns -> a torch.bfloat16 tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).to(device)


def bits_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().cpu().view(torch.int16).numpy().view(np.uint16)


class World:
    """This rank's routed tokens as torch tensors, and every rank's as NumPy (index = rank)."""

    def __init__(self, mpi, device, num_tokens: int, *, call=0, drop=0.25, hidden=H, topk=TOPK):
        rng = mpi.rng(call)
        self.E = EXPERTS_PER_RANK * mpi.size
        self.K = topk = min(topk, self.E)
        self.H = hidden
        x = testing.random_tokens(rng, num_tokens, hidden)
        ids = testing.routing("uniform", rng, num_tokens, self.E, topk, drop)
        w = testing.random_weights(rng, num_tokens, topk)
        everyone = mpi.allgather((x, ids, w))
        self.xs, self.idss, self.ws = ([e[i] for e in everyone] for i in range(3))
        self.x = to_torch(x, device)
        self.ids = torch.from_numpy(ids).to(device)
        self.w = torch.from_numpy(w).to(device)
        self.R, self.rank, self.device = mpi.size, mpi.rank, device

    def owner(self, ids):
        return np.where(ids >= 0, ids // EXPERTS_PER_RANK, -1)

    def received(self):
        """TOKEN_MAJOR rows of this rank: (source, token) in source-rank then token order."""
        return [(s, t) for s in range(self.R) for t in range(len(self.idss[s]))
                if (self.owner(self.idss[s][t]) == self.rank).any()]

    def ranks_reached(self, s):
        ids = self.idss[s]
        return np.array([len(set(self.owner(ids[t])[ids[t] >= 0].tolist())) for t in range(len(ids))], np.float32)


def ht_dispatch(buf, world, *, alignment=1, worst=0, **kwargs):
    ntpr, ntprdma, ntpe, itr, _ = buf.get_dispatch_layout(world.ids, world.E)
    assert ntprdma is None
    return buf.dispatch(world.x, num_tokens_per_rank=ntpr, is_token_in_rank=itr, num_tokens_per_expert=ntpe,
                        topk_idx=world.ids, topk_weights=world.w, expert_alignment=alignment,
                        num_worst_tokens=worst, config=buf.get_dispatch_config(world.R), **kwargs)


def check_ht_dispatch(world, recv_x, recv_idx, recv_w, counts, handle, alignment=1, worst=0):
    rows = world.received()
    n = len(rows)
    want_x = np.array([world.xs[s][t] for s, t in rows], np.uint16).reshape(n, world.H)
    lo = world.rank * EXPERTS_PER_RANK
    want_idx = np.full((n, world.K), -1, np.int64)
    want_w = np.zeros((n, world.K), np.float32)
    for i, (s, t) in enumerate(rows):
        mine = world.owner(world.idss[s][t]) == world.rank
        want_idx[i, mine] = world.idss[s][t][mine] - lo
        want_w[i, mine] = world.ws[s][t][mine]
    if recv_x is not None:      # None: the caller checks a non-bf16 payload
        got_x = bits_of(recv_x)
        assert got_x.shape[0] == (worst or n)
        assert np.array_equal(got_x[:n], want_x), "recv_x rows differ (order: source rank, then source token)"
    assert recv_idx.dtype == torch.int64 and np.array_equal(recv_idx.cpu().numpy()[:n], want_idx)
    assert recv_w.dtype == torch.float32 and np.array_equal(recv_w.cpu().numpy()[:n], want_w)
    if worst:
        assert (recv_idx.cpu().numpy()[n:] == -1).all() and (recv_w.cpu().numpy()[n:] == 0).all()
        assert counts == []
    else:
        per_expert = [int((want_idx == e).sum()) for e in range(EXPERTS_PER_RANK)]
        assert counts == [-(-c // alignment) * alignment for c in per_expert]
    sent = np.array([[int((world.owner(ids) == d).any(axis=1).sum()) for d in range(world.R)] for ids in world.idss])
    prefix = handle[0].cpu().numpy()
    assert prefix.dtype == np.int32 and np.array_equal(prefix, np.cumsum(sent, axis=0)), "rank_prefix_matrix"
    return n


def expected_sum_over_ranks(world) -> np.ndarray:
    """HT combine of the unchanged rows: bf16(n_t * x_t), n_t the ranks token t reached (exact in fp32); +0 for
    a token that went nowhere."""
    x = world.xs[world.rank]
    n = world.ranks_reached(world.rank)[:, None]
    return f32_to_bf16(np.where(n > 0, bf16_to_f32(x) * n, np.float32(0)))


def token_count(mpi, call=0, zero_rank=None):
    return 0 if mpi.rank == zero_rank else 5 + 3 * ((mpi.rank + call) % 4)


# ---------------------------------------------------------------------------------------------- HT
def test_get_dispatch_layout_counts_tokens_per_rank_and_expert(mpi, buffers):
    buf = buffers()
    world = World(mpi, device_of(buf), 11)
    ntpr, ntprdma, ntpe, itr, event = buf.get_dispatch_layout(world.ids, world.E)
    ids = world.idss[mpi.rank]
    owners = world.owner(ids)
    want_in = np.stack([(owners == d).any(axis=1) for d in range(mpi.size)], axis=1)
    assert ntprdma is None and isinstance(event, deep_ep.EventOverlap)
    assert itr.dtype == torch.bool and np.array_equal(itr.cpu().numpy(), want_in)
    assert ntpr.dtype == torch.int32 and np.array_equal(ntpr.cpu().numpy(), want_in.sum(axis=0))
    assert ntpe.dtype == torch.int32
    assert np.array_equal(ntpe.cpu().numpy(), np.bincount(ids[ids >= 0], minlength=world.E))


@pytest.mark.parametrize("streams", ["sync", "async", "comm_stream"])
def test_ht_dispatch_then_combine_as_vllm_and_sglang_call_them(mpi, buffers, streams):
    """layout -> dispatch (weights, alignment) -> the caller reduces its rows -> combine, in each stream mode."""
    buf = buffers(num_nvl_bytes=int(1e9) // 128 * 128)
    alignment = 4
    for call in range(2):      # the second call reuses the communicator and grows nothing
        world = World(mpi, device_of(buf), token_count(mpi, call), call=call)
        kw = {} if streams == "sync" else {"async_finish": True, "previous_event": buf.capture(),
                                           "allocate_on_comm_stream": streams == "comm_stream"}
        recv_x, recv_idx, recv_w, counts, handle, event = ht_dispatch(buf, world, alignment=alignment, **kw)
        if streams != "sync":
            event.current_stream_wait()
        with mpi.checking("dispatch"):
            check_ht_dispatch(world, recv_x, recv_idx, recv_w, counts, handle, alignment)
        combined, combined_w, event = buf.combine(recv_x, handle, config=buf.get_combine_config(mpi.size), **kw)
        if streams != "sync":
            event.current_stream_wait()
        with mpi.checking("combine"):
            assert combined_w is None
            assert np.array_equal(bits_of(combined), expected_sum_over_ranks(world))


def test_ht_fp8_dispatch_moves_the_payload_and_its_scales_with_the_rows(mpi, buffers):
    """SGLang's normal mode dispatches (e4m3 [T, H], float32 scales [T, H/128]); cached dispatch too."""
    buf = buffers()
    world = World(mpi, device_of(buf), token_count(mpi))
    q, sc = reference.fp8_cast(world.xs[mpi.rank])
    everyone = mpi.allgather((q, sc))
    payload = torch.from_numpy(q).to(world.device).view(torch.float8_e4m3fn)
    scales = torch.from_numpy(sc).to(world.device)
    ntpr, _, ntpe, itr, _ = buf.get_dispatch_layout(world.ids, world.E)
    (rq, rs), recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        (payload, scales), num_tokens_per_rank=ntpr, is_token_in_rank=itr, num_tokens_per_expert=ntpe,
        topk_idx=world.ids, topk_weights=world.w)
    (cq, cs), *_ = buf.dispatch((payload, scales), handle=handle)
    with mpi.checking("FP8 HT dispatch"):
        rows = world.received()
        want_q = np.array([everyone[s][0][t] for s, t in rows], np.uint8).reshape(-1, H)
        want_s = np.array([everyone[s][1][t] for s, t in rows], np.float32).reshape(-1, H // 128)
        for got_q, got_s in ((rq, rs), (cq, cs)):
            assert got_q.dtype == torch.float8_e4m3fn and got_s.dtype == torch.float32
            assert np.array_equal(got_q.cpu().view(torch.uint8).numpy(), want_q)
            assert np.array_equal(got_s.cpu().numpy(), want_s)
        check_ht_dispatch(world, None, recv_idx, recv_w, counts, handle)


def test_megatron_backward_combines_weights_and_re_dispatches_the_gradient_cached(mpi, buffers):
    buf = buffers()
    world = World(mpi, device_of(buf), token_count(mpi))
    recv_x, recv_idx, recv_w, counts, handle, _ = ht_dispatch(buf, world)
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    with mpi.checking("combine with topk_weights"):
        ids, w = world.idss[mpi.rank], world.ws[mpi.rank]
        assert np.array_equal(combined_w.cpu().numpy(), np.where(ids >= 0, w, 0).astype(np.float32))
        assert np.array_equal(bits_of(combined), expected_sum_over_ranks(world))
    grad = to_torch(testing.random_tokens(mpi.rng(7), world.x.shape[0], H), world.device)
    again, idx2, w2, counts2, handle2, _ = buf.dispatch(grad, handle=handle)
    with mpi.checking("cached dispatch"):
        assert idx2 is None and w2 is None and counts2 is None and handle2 is None
        everyone = mpi.allgather(bits_of(grad))
        want = np.array([everyone[s][t] for s, t in world.received()], np.uint16).reshape(-1, H)
        assert np.array_equal(bits_of(again), want)


def test_num_worst_tokens_pads_with_unused_rows_and_combine_takes_the_padded_rows(mpi, buffers):
    buf = buffers()
    world = World(mpi, device_of(buf), token_count(mpi))
    worst = 16 * mpi.size
    recv_x, recv_idx, recv_w, counts, handle, _ = ht_dispatch(buf, world, worst=worst)
    with mpi.checking("padded dispatch"):
        check_ht_dispatch(world, recv_x, recv_idx, recv_w, counts, handle, worst=worst)
    combined, _, _ = buf.combine(recv_x, handle)
    with mpi.checking("combine of padded rows"):
        assert np.array_equal(bits_of(combined), expected_sum_over_ranks(world))
    # num_worst_tokens bounds every rank's tokens by num_worst_tokens // R: more raise on every rank
    with pytest.raises(ValueError, match="num_worst_tokens=.* allows .* tokens per rank|failed the input checks"):
        ht_dispatch(buf, world, worst=2 * mpi.size)
    recv_x, recv_idx, recv_w, counts, handle, _ = ht_dispatch(buf, world, worst=worst)
    with mpi.checking("the dispatch after the refusal"):
        check_ht_dispatch(world, recv_x, recv_idx, recv_w, counts, handle, worst=worst)


def test_ranks_with_zero_tokens_dispatch_and_combine(mpi, buffers):
    buf = buffers()
    world = World(mpi, device_of(buf), token_count(mpi, zero_rank=0))
    recv_x, recv_idx, recv_w, counts, handle, _ = ht_dispatch(buf, world)
    with mpi.checking("dispatch with an empty rank"):
        check_ht_dispatch(world, recv_x, recv_idx, recv_w, counts, handle)
    combined, _, _ = buf.combine(recv_x, handle)
    with mpi.checking("combine with an empty rank"):
        assert tuple(combined.shape) == (world.x.shape[0], H)
        assert np.array_equal(bits_of(combined), expected_sum_over_ranks(world))


def test_dispatch_without_topk_moves_each_token_to_its_ranks(mpi, buffers):
    buf = buffers()
    world = World(mpi, device_of(buf), token_count(mpi))
    ntpr, _, _, itr, _ = buf.get_dispatch_layout(world.ids, world.E)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(world.x, num_tokens_per_rank=ntpr,
                                                               is_token_in_rank=itr)
    with mpi.checking("dispatch without top-k"):
        rows = world.received()
        assert recv_idx is None and recv_w is None and counts == [len(rows)]
        want = np.array([world.xs[s][t] for s, t in rows], np.uint16).reshape(-1, H)
        assert np.array_equal(bits_of(recv_x), want)
    combined, _, _ = buf.combine(recv_x, handle)
    with mpi.checking("combine"):
        assert np.array_equal(bits_of(combined), expected_sum_over_ranks(world))


def test_many_handles_alive_and_a_larger_batch_grows_the_buffers(mpi, buffers):
    """Handles stay valid across later dispatches, including one that outgrows the first buffers."""
    buf = buffers()
    small = World(mpi, device_of(buf), token_count(mpi), call=0)
    big = World(mpi, device_of(buf), 300 + mpi.rank, call=1)       # > the first capacity (256 tokens)
    first = ht_dispatch(buf, small)
    second = ht_dispatch(buf, big)
    for world, (recv_x, _, _, _, handle, _) in ((big, second), (small, first)):
        combined, _, _ = buf.combine(recv_x, handle)
        with mpi.checking(f"combine of {world.x.shape[0]} tokens"):
            assert np.array_equal(bits_of(combined), expected_sum_over_ranks(world))


# ---------------------------------------------------------------------------------------------- LL
T_MAX = 16


def ll_buffer(buffers, mpi):
    E = EXPERTS_PER_RANK * mpi.size
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(T_MAX, 512, mpi.size, E)
    assert hint > 0 and hint % 128 == 0
    return buffers(num_rdma_bytes=hint, low_latency_mode=True, num_qps_per_rank=EXPERTS_PER_RANK)


def ll_reference(world, hidden=H):
    return reference.dispatch_world(world.xs, world.idss, [None] * world.R, world.E, hidden,
                                    layout=DispatchLayout.EXPERT_MAJOR, capacity=world.R * T_MAX)


def expert_outputs(refs, hidden=H):
    """The 'MLP' of every rank: local expert e's rows times 2^(e-1), exact in bf16."""
    ys = []
    for ref in refs:
        f = bf16_to_f32(ref.tokens) * (2.0 ** (np.arange(EXPERTS_PER_RANK, dtype=np.float32) - 1))[:, None, None]
        ys.append(f32_to_bf16(f))
    return ys


def check_ll_combine(world, combined, ys, refs, hidden=H):
    want = reference.combine_world(ys, refs, world.idss, world.ws, world.E, hidden)[world.rank]
    assert combined.dtype == torch.bfloat16 and tuple(combined.shape) == (world.x.shape[0], hidden)
    assert np.array_equal(bits_of(combined), want), "LL combine differs from the reference"


def check_ll_rows(recv_x, count, ref):
    got = bits_of(recv_x)
    assert tuple(recv_x.shape) == ref.tokens.shape
    assert count.dtype == torch.int32 and np.array_equal(count.cpu().numpy(), ref.counts)
    for e, c in enumerate(ref.counts):
        assert np.array_equal(got[e, :c], ref.tokens[e, :c]), f"rows of local expert {e}"


def check_ll_handle(world, handle, recv_x, count):
    """DeepEP's LL handle: src_info [L, R*T_max] = the source token of each row; layout_range [L, R] = per source
    rank begin << 32 | count, the rows of that rank (its tokens naming the expert, ascending)."""
    src_info, layout_range = handle[0], handle[1]
    assert src_info.dtype == torch.int32 and tuple(src_info.shape) == (EXPERTS_PER_RANK, world.R * T_MAX)
    assert layout_range.dtype == torch.int64 and tuple(layout_range.shape) == (EXPERTS_PER_RANK, world.R)
    si, lr, x, n_e = src_info.cpu().numpy(), layout_range.cpu().numpy(), bits_of(recv_x), count.cpu().numpy()
    for le in range(EXPERTS_PER_RANK):
        e = world.rank * EXPERTS_PER_RANK + le
        assert (lr[le] & 0xFFFFFFFF).sum() == n_e[le]
        for j in range(world.R):
            begin, n = int(lr[le, j] >> 32), int(lr[le, j] & 0xFFFFFFFF)
            tokens = np.nonzero((world.idss[j] == e).any(axis=1))[0]
            assert n == len(tokens) and np.array_equal(si[le, begin:begin + n], tokens), f"expert {le} source {j}"
            assert np.array_equal(x[le, begin:begin + n], world.xs[j][tokens]), f"rows of expert {le} source {j}"
    assert tuple(handle)[2:] == (T_MAX, H, world.E)


@pytest.mark.parametrize("mode", ["plain", "out", "zero_copy", "async"])
def test_ll_bf16_dispatch_and_weighted_combine_as_vllm_calls_them(mpi, buffers, mode):
    buf = ll_buffer(buffers, mpi)
    buf.clean_low_latency_buffer(T_MAX, H, EXPERTS_PER_RANK * mpi.size)
    stats = torch.zeros(EXPERTS_PER_RANK, dtype=torch.int32, device=device_of(buf))
    total = np.zeros(EXPERTS_PER_RANK, np.int64)
    for call in range(3):
        world = World(mpi, device_of(buf), token_count(mpi, call, zero_rank=0 if call == 2 else None), call=call)
        recv_x, count, handle, event, hook = buf.low_latency_dispatch(
            world.x, world.ids, T_MAX, world.E, cumulative_local_expert_recv_stats=stats, use_fp8=False,
            async_finish=mode == "async")
        if mode == "async":
            event.current_stream_wait()
        assert hook is None and len(handle) == 5 and tuple(handle[2:]) == (T_MAX, H, world.E)
        refs = ll_reference(world)
        total += refs[mpi.rank].counts
        with mpi.checking("LL dispatch"):
            check_ll_rows(recv_x, count, refs[mpi.rank])
            assert np.array_equal(stats.cpu().numpy(), total), "cumulative stats"
            check_ll_handle(world, handle, recv_x, count)
        ys = expert_outputs(refs)
        y = to_torch(ys[mpi.rank], world.device)
        out = None
        if mode == "zero_copy":
            target = buf.get_next_low_latency_combine_buffer(handle)
            target.copy_(y)
            y = target
        if mode == "out":
            out = torch.empty((world.x.shape[0], H), dtype=torch.bfloat16, device=world.device)
        combined, event, hook = buf.low_latency_combine(y, world.ids, world.w, handle, zero_copy=mode == "zero_copy",
                                                        async_finish=mode == "async", out=out)
        if mode == "async":
            event.current_stream_wait()
        with mpi.checking("LL combine"):
            assert hook is None
            if out is not None:
                assert combined.data_ptr() == out.data_ptr()
            check_ll_combine(world, combined, ys, refs)


@pytest.mark.parametrize("round_scale,ue8m0", [(False, False), (True, False), (True, True)],
                         ids=["fp32_scales", "pow2_scales", "ue8m0"])
def test_ll_fp8_dispatch_gives_deepgemm_layout_scales(mpi, buffers, round_scale, ue8m0):
    buf = ll_buffer(buffers, mpi)
    hidden = 512
    world = World(mpi, device_of(buf), token_count(mpi), hidden=hidden)
    (q, scales), count, handle, _, _ = buf.low_latency_dispatch(world.x, world.ids, T_MAX, world.E, use_fp8=True,
                                                                round_scale=round_scale, use_ue8m0=ue8m0)
    with mpi.checking("FP8 LL dispatch"):
        cast = [reference.fp8_cast(x, round_scale=round_scale, ue8m0=ue8m0) for x in world.xs]
        ref = reference.dispatch_world([c[0] for c in cast], world.idss, [None] * mpi.size, world.E, hidden,
                                       layout=DispatchLayout.EXPERT_MAJOR, capacity=mpi.size * T_MAX,
                                       scales=[c[1] for c in cast])[mpi.rank]
        assert q.dtype in (torch.float8_e4m3fn, torch.uint8)
        assert scales.dtype == (torch.int32 if ue8m0 else torch.float32)
        assert tuple(scales.shape) == (EXPERTS_PER_RANK, mpi.size * T_MAX, hidden // (512 if ue8m0 else 128))
        assert scales.stride(1) == 1, "scales token-contiguous (MN-major), as DeepGEMM's masked GEMM reads them"
        qb = q.cpu().view(torch.uint8).numpy()
        sc = scales.cpu().numpy()
        assert np.array_equal(count.cpu().numpy(), ref.counts)
        for e, c in enumerate(ref.counts):
            assert np.array_equal(qb[e, :c], ref.tokens[e, :c]) and np.array_equal(sc[e, :c], ref.scales[e, :c])
    refs = ll_reference(world, hidden)
    ys = expert_outputs(refs, hidden)
    combined, _, _ = buf.low_latency_combine(to_torch(ys[mpi.rank], world.device), world.ids, world.w, handle)
    with mpi.checking("combine after an FP8 dispatch"):
        check_ll_combine(world, combined, ys, refs, hidden)


def test_ll_two_batch_overlap_with_receive_hooks_as_sglang_runs_it(mpi, buffers):
    """Two micro-batches: both sends, both receives (hooks), then both combines with hooks."""
    buf = ll_buffer(buffers, mpi)
    worlds = [World(mpi, device_of(buf), token_count(mpi, c), call=c) for c in range(2)]
    sent = [buf.low_latency_dispatch(w.x, w.ids, T_MAX, w.E, use_fp8=False, return_recv_hook=True) for w in worlds]
    for _, _, _, _, hook in sent:
        hook()
    pending = []
    for world, (recv_x, count, handle, _, _) in zip(worlds, sent):
        refs = ll_reference(world)
        with mpi.checking("LL dispatch received through its hook"):
            check_ll_rows(recv_x, count, refs[mpi.rank])
        ys = expert_outputs(refs)
        combined, _, hook = buf.low_latency_combine(to_torch(ys[mpi.rank], world.device), world.ids, world.w, handle,
                                                    return_recv_hook=True)
        pending.append((world, combined, hook, ys, refs))
    for world, combined, hook, ys, refs in pending:
        hook()
        with mpi.checking("LL combine received through its hook"):
            check_ll_combine(world, combined, ys, refs)


def test_ht_and_ll_share_one_buffer_with_clean_between_as_sglang_auto_mode(mpi, buffers):
    buf = ll_buffer(buffers, mpi)
    world = World(mpi, device_of(buf), token_count(mpi))
    recv_x, _, _, _, handle, _ = ht_dispatch(buf, world)
    combined, _, _ = buf.combine(recv_x, handle)
    with mpi.checking("HT on an LL buffer"):
        assert np.array_equal(bits_of(combined), expected_sum_over_ranks(world))
    buf.clean_low_latency_buffer(T_MAX, H, world.E)
    recv, count, lhandle, _, _ = buf.low_latency_dispatch(world.x, world.ids, T_MAX, world.E, use_fp8=False)
    refs = ll_reference(world)
    ys = expert_outputs(refs)
    combined, _, _ = buf.low_latency_combine(to_torch(ys[mpi.rank], world.device), world.ids, world.w, lhandle)
    with mpi.checking("LL after HT"):
        check_ll_combine(world, combined, ys, refs)


def test_ll_dispatch_and_combine_capture_in_a_cuda_graph_and_replay_with_new_tokens(mpi, buffers):
    """vLLM and SGLang capture LL decode steps: no host synchronization inside, replays see new inputs."""
    buf = ll_buffer(buffers, mpi)
    if buf._backend != "gpu":
        pytest.skip("CUDA graphs need the GPU backend")
    first = World(mpi, device_of(buf), token_count(mpi), call=0)
    x, ids, w = first.x.clone(), first.ids.clone(), first.w.clone()
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float32, device=x.device)[:, None, None]

    def step():
        recv, _, handle, _, _ = buf.low_latency_dispatch(x, ids, T_MAX, first.E, use_fp8=False)
        return buf.low_latency_combine((recv.float() * scale).to(torch.bfloat16), ids, w, handle)[0]
    step()                       # builds the communicator outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        combined = step()
    for call in (1, 2):
        world = World(mpi, device_of(buf), token_count(mpi), call=call)   # same token count, new values
        x.copy_(world.x), ids.copy_(world.ids), w.copy_(world.w)
        graph.replay()
        torch.cuda.synchronize()
        refs = ll_reference(world)
        with mpi.checking(f"replay {call}"):
            check_ll_combine(world, combined, expert_outputs(refs), refs)


def test_ht_dispatch_with_num_worst_tokens_captures_in_a_cuda_graph_and_replays_new_routings(mpi, buffers):
    """num_worst_tokens: layout, dispatch and combine wait on nothing on the host, so a CUDA graph of them
    replays with new tokens and new routings written into the captured inputs."""
    buf = buffers()
    if buf._backend != "gpu":
        pytest.skip("CUDA graphs need the GPU backend")
    worst = 16 * mpi.size
    first = World(mpi, device_of(buf), token_count(mpi), call=0)
    x, ids, w = first.x.clone(), first.ids.clone(), first.w.clone()

    def step():
        ntpr, _, ntpe, itr, _ = buf.get_dispatch_layout(ids, first.E)
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=ntpr, is_token_in_rank=itr, num_tokens_per_expert=ntpe, topk_idx=ids,
            topk_weights=w, num_worst_tokens=worst)
        combined, _, _ = buf.combine(recv_x, handle)
        return recv_x, recv_idx, recv_w, counts, handle, combined
    step()                       # builds the communicator outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for call in (1, 2, 3):
        world = World(mpi, device_of(buf), token_count(mpi), call=call)   # same token count, new routing
        x.copy_(world.x), ids.copy_(world.ids), w.copy_(world.w)
        graph.replay()
        torch.cuda.synchronize()
        recv_x, recv_idx, recv_w, counts, handle, combined = outs
        with mpi.checking(f"replay {call}"):
            check_ht_dispatch(world, recv_x, recv_idx, recv_w, counts, handle, worst=worst)
            assert np.array_equal(bits_of(combined), expected_sum_over_ranks(world))


def test_internal_tensors_ignore_torch_default_dtype(mpi, buffers):
    """Callers change torch's defaults (training in float64, fp16 serving): every internal tensor names its dtype."""
    buf = ll_buffer(buffers, mpi)
    world = World(mpi, device_of(buf), token_count(mpi))
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        recv_x, recv_idx, recv_w, counts, handle, _ = ht_dispatch(buf, world, alignment=2)
        combined, _, _ = buf.combine(recv_x, handle)
        recv, count, lhandle, _, _ = buf.low_latency_dispatch(world.x, world.ids, T_MAX, world.E, use_fp8=False)
        refs = ll_reference(world)
        ys = expert_outputs(refs)
        lcombined, _, _ = buf.low_latency_combine(to_torch(ys[mpi.rank], world.device), world.ids, world.w, lhandle)
    finally:
        torch.set_default_dtype(saved)
    with mpi.checking("HT and LL under float64 defaults"):
        check_ht_dispatch(world, recv_x, recv_idx, recv_w, counts, handle, 2)
        assert np.array_equal(bits_of(combined), expected_sum_over_ranks(world))
        check_ll_combine(world, lcombined, ys, refs)


# ---------------------------------------------------------------------------------- surface, errors
def test_module_surface_and_static_helpers():
    assert deep_ep.__version__.startswith("1.0.0+ep")
    assert deep_ep.topk_idx_t is torch.int64
    from deep_ep.utils import EventHandle, EventOverlap      # where Megatron and torchtitan import them
    assert EventHandle is deep_ep.EventHandle and EventOverlap is deep_ep.EventOverlap
    with EventOverlap(EventHandle()) as overlap:
        assert overlap.extra_tensors is None
    with pytest.raises(ValueError, match="even"):
        deep_ep.Buffer.set_num_sms(7)
    saved = deep_ep.Buffer.num_sms
    try:
        deep_ep.Buffer.set_num_sms(24)
        assert deep_ep.Buffer.get_dispatch_config(8).num_sms == 24
    finally:
        deep_ep.Buffer.set_num_sms(saved)
    for R in (1, 2, 4, 8):
        cfg = deep_ep.Buffer.get_combine_config(R)
        assert cfg.get_nvl_buffer_size_hint(7168 * 2, R) > 0 and cfg.get_rdma_buffer_size_hint(7168 * 2, R) == 0
    with pytest.raises(NotImplementedError, match="intranode"):
        deep_ep.Buffer.get_dispatch_config(16)
    with pytest.raises(ValueError, match="num_max_nvl_chunked_send_tokens"):
        deep_ep.Config(20, 8, 8)
    assert deep_ep.Buffer.is_sm90_compiled()


def test_unsupported_features_raise_not_implemented_naming_them(mpi, buffers):
    with pytest.raises(NotImplementedError, match="shrink"):
        deep_ep.Buffer(None, comm=MPI.COMM_WORLD, enable_shrink=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        deep_ep.Buffer(None, comm=MPI.COMM_WORLD, num_nvl_bytes=100)
    buf = ll_buffer(buffers, mpi)
    world = World(mpi, device_of(buf), token_count(mpi))
    for kwargs, match in (({"use_nvfp4": True}, "NVFP4"), ({"dispatch_wait_recv_cost_stats": world.ids}, "timing"),
                          ({"async_finish": True, "return_recv_hook": True}, "cannot both")):
        error = ValueError if "cannot" in match else NotImplementedError
        with pytest.raises(error, match=match):
            buf.low_latency_dispatch(world.x, world.ids, T_MAX, world.E, **kwargs)
    with pytest.raises(TypeError, match="unexpected keyword"):
        buf.low_latency_dispatch(world.x, world.ids, T_MAX, world.E, use_fp16=True)
    # falsy branch keywords are accepted (callers pass them unconditionally)
    recv, count, handle, _, _ = buf.low_latency_dispatch(world.x, world.ids, T_MAX, world.E, use_fp8=False,
                                                          use_nvfp4=False, x_global_scale=None)
    y = torch.zeros_like(recv)
    for kwargs, match in (({"use_logfmt": True}, "LogFMT"), ({"overlap": True}, "single-batch overlap"),
                          ({"combine_wait_recv_cost_stats": world.ids}, "timing")):
        with pytest.raises(NotImplementedError, match=match):
            buf.low_latency_combine(y, world.ids, world.w, handle, **kwargs)
    combined, _, _ = buf.low_latency_combine(y, world.ids, world.w, handle, overlap=False, num_sms=None)
    assert (combined.float() == 0).all()
    recv_x, _, _, _, ht_handle, _ = ht_dispatch(buf, world)
    with pytest.raises(NotImplementedError, match="bias"):
        buf.combine(recv_x, ht_handle, bias=recv_x)
    with pytest.raises(ValueError, match="allocate_on_comm_stream"):
        buf.combine(recv_x, ht_handle, allocate_on_comm_stream=True)
    buf.combine(recv_x, ht_handle)      # the handle is still good
