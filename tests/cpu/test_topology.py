"""Nodes and rails: which ranks share NVLink and which share the network hop (ep.internode)."""
from __future__ import annotations

import pytest

from ep import ConfigError
from ep.internode import Topology, topology


def test_nodes_are_consecutive_ranks_and_rails_share_a_local_index():
    t = Topology(8, 4)
    assert (t.nodes, t.internode) == (2, True)
    assert t.node_members(1) == [4, 5, 6, 7] and t.rail_members(2) == [2, 6]
    assert (t.node_of(6), t.local_of(6), t.rank_of(1, 2)) == (1, 2, 6)
    assert not Topology(4, 4).internode


def test_without_a_node_size_the_ranks_of_a_host_form_a_node():
    assert topology(None, ["a", "a", "b", "b"]).ranks_per_node == 2
    assert topology(None, ["a"] * 4) == Topology(4, 4)


def test_virtual_nodes_split_a_host_but_a_node_never_spans_two_hosts():
    assert topology(1, ["a", "a"]).nodes == 2
    with pytest.raises(ConfigError, match="a node's ranks must share a host"):
        topology(4, ["a", "a", "b", "b"])
    with pytest.raises(ConfigError, match="must divide the world size"):
        topology(3, ["a"] * 4)
    with pytest.raises(ConfigError, match="must share a host"):
        topology(None, ["a", "b", "a", "b"])   # hosts interleaved: launch ranks host by host
    with pytest.raises(ConfigError, match="ranks per host differ"):
        topology(None, ["a", "a", "b", "b", "b", "b"])
