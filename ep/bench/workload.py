"""Inputs of one benchmark case and the byte counts its bandwidths are computed from.

Byte counting (stated in the report): a dispatch moves each (token, destination rank) pair once, one bf16
row of ``H * 2`` bytes (with ``--dtype``, the payload row and its scales), whatever the number of that
rank's experts the token names. *Logical* bytes of a
rank = every pair that rank receives (its own tokens included); *physical* bytes = only the pairs from
other ranks, the ones that cross NVLink. A combine moves the same pairs back (one bf16 partial per (token,
rank)), so its byte counts are those of the dispatch it combines (bf16 rows also after a payload dispatch).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import testing
from ..reference import routed_ranks

HT_DEFAULTS = {"tokens": 4096, "hidden": 7168, "experts": 256, "topk": 8}
LL_DEFAULTS = {"tokens": 128, "hidden": 7168, "experts": 256, "topk": 8}


# HT payloads the bench can dispatch (--dtype): caller-quantized rows whose scales travel with them.
PAYLOADS = {k: testing.PAYLOAD_FORMATS[k] for k in ("fp8", "mxfp8", "nvfp4")}


@dataclass(frozen=True)
class Shape:
    mode: str
    tokens: int
    hidden: int
    experts: int
    topk: int
    dtype: str = "bf16"     # HT payload: bf16, or a key of PAYLOADS
    layout: str = "flat"    # HT output layout (a DispatchLayout value); LL is expert-major
    worst_case: bool = False   # HT TOKEN_MAJOR: dispatch(worst_case=True), no host wait (graph-capturable)

    @property
    def row_bytes(self) -> int:
        """Bytes one (token, rank) pair moves: the row and its scales."""
        if self.dtype == "bf16":
            return self.hidden * 2
        width, count, sdt = PAYLOADS[self.dtype]
        return width(self.hidden) + count(self.hidden) * np.dtype(sdt).itemsize


@dataclass
class Inputs:
    """One rank's inputs as NumPy arrays (the GPU path copies them to the device)."""

    x: np.ndarray          # uint16 bf16 [T, H], or a payload's bytes uint8 [T, row]
    topk_ids: np.ndarray   # int64 [T, K], -1 = unused slot
    weights: np.ndarray    # float32 [T, K]
    scales: np.ndarray | None = None   # the payload's scales [T, S] (column-major, as quantizers leave them)


def make_inputs(shape: Shape, routing: str, drop: float, seed: int, rank: int) -> Inputs:
    """Routing from ep.testing.routing seeded with ep.testing.seed_for(seed, rank), then tokens and weights
    from the same generator: the same (seed, rank) gives the same inputs on every backend and run."""
    rng = testing.seed_for(seed, rank)
    ids = testing.routing(routing, rng, shape.tokens, shape.experts, shape.topk, drop=drop)
    x = testing.random_tokens(rng, shape.tokens, shape.hidden)
    w = testing.random_weights(rng, shape.tokens, shape.topk)
    if shape.dtype == "bf16":
        return Inputs(x, ids, w)
    payload, sc = testing.random_payload(rng, shape.tokens, shape.hidden, shape.dtype, column_major=True)
    return Inputs(payload, ids, w, sc)


@dataclass(frozen=True)
class Volume:
    """Pairs and bytes of one routing, for the whole world (index [source][destination])."""

    pairs: np.ndarray      # int64 [W, W]: tokens source s sends to destination d
    row_bytes: int

    @property
    def world(self) -> int:
        return self.pairs.shape[0]

    def send_bytes(self, rank: int) -> list[int]:
        """Bytes ``rank``'s dispatch sends to each destination (its own included)."""
        return [int(n) * self.row_bytes for n in self.pairs[rank]]

    def logical_bytes(self, rank: int) -> int:
        return int(self.pairs[:, rank].sum()) * self.row_bytes

    def physical_bytes(self, rank: int) -> int:
        return (int(self.pairs[:, rank].sum()) - int(self.pairs[rank, rank])) * self.row_bytes

    def offgpu_send_bytes(self, rank: int) -> int:
        return (int(self.pairs[rank].sum()) - int(self.pairs[rank, rank])) * self.row_bytes

    def logical_per_rank(self) -> list[int]:
        return [self.logical_bytes(r) for r in range(self.world)]

    def physical_per_rank(self) -> list[int]:
        return [self.physical_bytes(r) for r in range(self.world)]

    def as_dict(self) -> dict:
        return {"row_bytes": self.row_bytes, "pairs": self.pairs.tolist(),
                "logical_bytes_per_rank": self.logical_per_rank(),
                "physical_bytes_per_rank": self.physical_per_rank(),
                "offgpu_send_bytes_per_rank": [self.offgpu_send_bytes(r) for r in range(self.world)]}


def volume(group, topk_ids: np.ndarray, shape: Shape) -> Volume:
    """Collective: every rank's per-destination pair counts."""
    W = group.size
    mine = routed_ranks(topk_ids, shape.experts, W).sum(axis=0).astype(np.int64).tolist()
    pairs = np.array(group.allgather(mine), dtype=np.int64).reshape(W, W)
    return Volume(pairs, shape.row_bytes)


def mean_bytes(values: list[int]) -> float:
    return float(sum(values)) / max(len(values), 1)
