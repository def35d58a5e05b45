"""The internode (two-hop) path on the CPU backend: whatever the nodes (1xW, 2x(W/2), ..., Wx1), every output is
bit-identical to one node's, and a token crosses the network at most once per destination node."""
from __future__ import annotations

import numpy as np
import pytest

from ep import ConfigError, DispatchLayout, MoECommunicator, reference
from ep.internode import Topology

from test_cpu_backend import (check_combine, check_dispatch, draw_inputs, expected_combine, expected_dispatch,
                              make_config, mlp, token_counts)

FLAT, EXPERT_MAJOR, TOKEN_MAJOR = DispatchLayout.FLAT, DispatchLayout.EXPERT_MAJOR, DispatchLayout.TOKEN_MAJOR


def node_sizes(world: int) -> list[int]:
    """Every ranks_per_node that divides the world, one node included (the flat path, for comparison)."""
    return [n for n in range(1, world + 1) if world % n == 0]


def expected_network_rows(topo: Topology, rank: int, idss: list, num_experts: int) -> tuple[int, int]:
    """(dispatch rows this rank sends across nodes, combine rows it sends across nodes as a forwarder)."""
    W = topo.world
    routed = [reference.routed_ranks(ids, num_experts, W) for ids in idss]
    node = topo.node_of(rank)
    dispatch = sum(int(routed[rank][:, topo.node_members(m)].any(axis=1).sum())
                   for m in range(topo.nodes) if m != node)
    combine = sum(int(routed[s][:, d].sum()) for s in topo.rail_members(topo.local_of(rank))
                  if topo.node_of(s) != node for d in topo.node_members(node))
    return dispatch, combine


@pytest.mark.parametrize("layout", [FLAT, EXPERT_MAJOR], ids=lambda l: l.value)
@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_every_node_size_gives_the_one_node_results_bit_for_bit(mpi, communicators, mode, layout):
    W, r = mpi.size, mpi.rank
    if mode == "ll" and layout is FLAT:
        pytest.skip("LL is expert-major")
    for call, rpn in enumerate(node_sizes(W)):
        cfg = make_config(mode, world=W, t_max=8, layout=layout, ranks_per_node=rpn,
                          alignment=4 if (mode == "ht" and layout is FLAT) else 1)
        comm = communicators(cfg)
        assert comm.topology.ranks_per_node == rpn and comm.topology.internode == (rpn < W)
        inp = draw_inputs(mpi, cfg, token_counts(W, 8, call)[r], call=call, drop=0.2, repeat=True)
        out, handle = comm.dispatch(inp.x, inp.ids, inp.w)
        refs = expected_dispatch(cfg, W, inp)
        with mpi.checking(f"dispatch, {W // rpn} node(s) of {rpn}"):
            check_dispatch(out, refs[r], cfg, W)
            if rpn < W:
                sent = comm._rt.two_hop.network_rows
                assert sent == expected_network_rows(comm.topology, r, inp.idss, cfg.num_experts)[0], \
                    "a token crosses the network once per destination node"
        y = mlp(np.asarray(out.tokens), out.expert_offsets, r, comm.num_local_experts)
        got = comm.combine(y, handle)
        with mpi.checking(f"combine, {W // rpn} node(s) of {rpn}"):
            check_combine(got, expected_combine(cfg, W, r, refs, inp), inp.x.shape[0], cfg.hidden_size)
            if rpn < W:
                assert comm._rt.two_hop.network_rows == expected_network_rows(comm.topology, r, inp.idss,
                                                                              cfg.num_experts)[1]


def test_token_major_with_weights_and_a_scaled_payload_are_topology_invariant(mpi, communicators):
    W, r = mpi.size, mpi.rank
    results = []
    for rpn in node_sizes(W):
        cfg = make_config("ht", world=W, hidden=64, topk=3, t_max=8, layout=TOKEN_MAJOR, ranks_per_node=rpn)
        comm = communicators(cfg)
        inp = draw_inputs(mpi, cfg, token_counts(W, 8, 1)[r], call=7, drop=0.2)
        out, handle = comm.dispatch(inp.x, inp.ids, inp.w)
        y = f32_scaled(np.asarray(out.tokens), r + 2)
        got_y, got_w = comm.combine(y, handle, topk_weights=np.asarray(out.topk_weights))
        x8 = mpi.rng(9).integers(0, 256, size=(inp.x.shape[0], 64), dtype=np.uint8)
        sc = np.ascontiguousarray(mpi.rng(10).standard_normal((inp.x.shape[0], 4)).astype(np.float32).T).T
        fp8, _ = comm.dispatch(x8, inp.ids, inp.w, scales=sc)
        results.append([np.asarray(a).copy() for a in (out.tokens, out.topk_ids, out.topk_weights, got_y, got_w,
                                                        fp8.tokens, fp8.scales)])
    with mpi.checking("TOKEN_MAJOR and FP8 payloads, every node size"):
        for rpn, res in zip(node_sizes(W), results):
            for name, a, b in zip(("tokens", "topk_ids", "topk_weights", "combined", "weights", "fp8 tokens",
                                   "fp8 scales"), res, results[-1]):
                assert a.dtype == b.dtype and np.array_equal(a, b), f"{name} with {rpn} ranks per node"


def f32_scaled(bits: np.ndarray, c: int) -> np.ndarray:
    return reference.f32_to_bf16(reference.bf16_to_f32(bits) * np.float32(c))


def test_ranks_per_node_must_divide_the_world_and_the_gpu_backend_refuses_several_nodes(mpi, communicators,
                                                                                        monkeypatch):
    W = mpi.size
    if W < 2:
        pytest.skip("needs two ranks")
    bad = next((n for n in range(2, W) if W % n), None)
    if bad is not None:
        mpi.raises(ConfigError, MoECommunicator, make_config("ht", world=W, ranks_per_node=bad), backend="cpu",
                   match=f"ranks_per_node \\({bad}\\) must divide the world size")
    mpi.raises(ConfigError, MoECommunicator, make_config("ht", world=W, ranks_per_node=1), backend="gpu",
               match="the GPU backend is intranode for now")
    monkeypatch.setenv("EP_RANKS_PER_NODE", "1")   # the knob overrides the field
    comm = communicators(make_config("ht", world=W))
    with mpi.checking("EP_RANKS_PER_NODE"):
        assert comm.effective_config.ranks_per_node == 1 and comm.topology.nodes == W
