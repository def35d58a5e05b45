"""Ranks in nodes and rails, and the two-hop data path across nodes.

A node is ``ranks_per_node`` consecutive ranks (rank = node * ranks_per_node + local); a rail is the ranks
of one local index on every node. Across nodes a token crosses the network at most once per destination
node, to its rail peer there (the rank of the source's local index), which forwards it over NVLink to the
ranks of that node owning its experts. Combine mirrors it: each expert rank's bf16 partial of a token goes
over NVLink to the rail peer of the token's source, then over the network to the source, which sums the
partials in ascending rank order as on one node. So every result is bit-identical whatever the topology
(1x4 == 2x2 == 4x1): a node does not pre-reduce its partials, since an fp32 sum regrouped by node rounds
differently (the price: one row per expert rank, not per node, on the combine's network hop).

The CPU backend runs both hops over its host group (a message only between rail peers, then only between
node peers); on GPUs the network hop is meant to be NCCL grouped send/recv on a per-rail communicator
(docs/internode.md), not built yet.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import reference
from .errors import ConfigError


@dataclass(frozen=True)
class Topology:
    """Which ranks share a node (NVLink, CUDA IPC) and which share a rail (the network hop)."""

    world: int
    ranks_per_node: int

    def __post_init__(self):
        if self.ranks_per_node < 1 or self.world % self.ranks_per_node:
            raise ConfigError(f"ranks_per_node ({self.ranks_per_node}) must divide the world size ({self.world})")

    @property
    def nodes(self) -> int:
        return self.world // self.ranks_per_node

    @property
    def internode(self) -> bool:
        return self.nodes > 1

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_of(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def rank_of(self, node: int, local: int) -> int:
        return node * self.ranks_per_node + local

    def node_members(self, node: int) -> list[int]:
        return [self.rank_of(node, j) for j in range(self.ranks_per_node)]

    def rail_members(self, local: int) -> list[int]:
        return [self.rank_of(m, local) for m in range(self.nodes)]


def topology(ranks_per_node: int | None, hosts: list) -> Topology:
    """The topology of a group whose ranks run on ``hosts`` (index = rank). ranks_per_node None: the ranks
    of a host form a node (hosts must hold equal, consecutive blocks of ranks). A node given smaller than a
    host is a virtual node (tests of the internode path on one machine); a node never spans two hosts."""
    world = len(hosts)
    if ranks_per_node is None:
        per_host = {h: hosts.count(h) for h in hosts}
        if len(set(per_host.values())) != 1:
            raise ConfigError(f"ranks per host differ ({per_host}): nodes need equal numbers of ranks; launch the "
                              "same number on every host, or set ranks_per_node")
        ranks_per_node = per_host[hosts[0]]
    topo = Topology(world, ranks_per_node)
    for node in range(topo.nodes):
        members = topo.node_members(node)
        if len({hosts[r] for r in members}) != 1:
            raise ConfigError(f"ranks {members[0]}..{members[-1]} form node {node} (ranks_per_node="
                              f"{ranks_per_node}) but run on hosts {sorted({hosts[r] for r in members})}: a node's "
                              "ranks must share a host (launch ranks host by host, or set ranks_per_node)")
    return topo


class TwoHopExchange:
    """The CPU backend's internode data path over its host group. ``network_rows``: the rows the last op
    sent across nodes from this rank (each a token's row, or a partial, on one rail hop)."""

    def __init__(self, group, topo: Topology):
        self.group, self.topo = group, topo
        self.rank = group.rank
        self.node, self.local = topo.node_of(self.rank), topo.local_of(self.rank)
        self.network_rows = 0

    def _hop(self, members: list[int], outgoing: dict, what: str) -> dict:
        """One hop: this rank sends outgoing[d] to each member d (None to nobody else) and gets {src: obj}
        from the members that sent it something."""
        objs = [outgoing.get(d) if d in members else None for d in range(self.topo.world)]
        got = self.group.alltoall(objs, what)
        return {s: got[s] for s in members if got[s] is not None}

    def dispatch(self, x: np.ndarray, ids: np.ndarray, w: np.ndarray | None, num_experts: int,
                 scales: np.ndarray | None) -> list[reference.RankSlice]:
        """The slices every source rank sends this rank (index = source), as one flat exchange would give."""
        topo = self.topo
        wts = np.ones(ids.shape, np.float32) if w is None else np.asarray(w, np.float32)
        routed = reference.routed_ranks(ids, num_experts, topo.world)
        # 1. the network hop: each token once to the rail peer of every node holding one of its experts
        outgoing = {}
        for m in range(topo.nodes):
            sel = np.nonzero(routed[:, topo.node_members(m)].any(axis=1))[0].astype(np.int64)
            outgoing[topo.rank_of(m, self.local)] = reference.RankSlice(
                self.rank, sel, x[sel], ids[sel], wts[sel], None if scales is None else scales[sel])
        self.network_rows = sum(len(s.token_index) for d, s in outgoing.items() if topo.node_of(d) != self.node)
        arrived = self._hop(topo.rail_members(self.local), outgoing, "cpu dispatch rail hop")
        # 2. the NVLink hop: forward each arrived token to the ranks of this node that own its experts
        forward: dict = {d: [] for d in topo.node_members(self.node)}
        for src in sorted(arrived):
            s = arrived[src]
            r = reference.routed_ranks(s.topk_ids, num_experts, topo.world)
            for d in forward:
                keep = np.nonzero(r[:, d])[0]
                forward[d].append(reference.RankSlice(s.source, s.token_index[keep], s.x[keep], s.topk_ids[keep],
                                                      s.weights[keep], None if s.scales is None else s.scales[keep]))
        got = self._hop(topo.node_members(self.node), forward, "cpu dispatch node hop")
        received: list = [None] * topo.world
        for slices in got.values():
            for s in slices:
                received[s.source] = s
        return received

    def combine(self, back: list) -> list:
        """Deliver back[s] (this rank's payload for source rank s) to every source: over NVLink to the rail
        peer of s on this node, then across the network to s. Returns {expert rank d: its payload} as a list."""
        topo = self.topo
        # 1. the NVLink hop: to the rank of this node on the source's rail
        to_forwarder: dict = {}
        for s, payload in enumerate(back):
            to_forwarder.setdefault(topo.rank_of(self.node, topo.local_of(s)), []).append((s, payload))
        at_forwarder = self._hop(topo.node_members(self.node), to_forwarder, "cpu combine node hop")
        # 2. the network hop: each expert rank's payload for source s, to s
        to_source: dict = {}
        for d in sorted(at_forwarder):
            for s, payload in at_forwarder[d]:
                to_source.setdefault(s, []).append((d, payload))
        self.network_rows = sum(_rows(p) for s, items in to_source.items() if topo.node_of(s) != self.node
                                for _, p in items)
        arrived = self._hop(topo.rail_members(self.local), to_source, "cpu combine rail hop")
        out: list = [None] * topo.world
        for items in arrived.values():
            for d, payload in items:
                out[d] = payload
        return out


def _rows(payload) -> int:
    """Rows of a combine payload: an array, or a (rows, weights) tuple (TOKEN_MAJOR)."""
    first = payload[0] if isinstance(payload, tuple) else payload
    return int(np.asarray(first).shape[0])
