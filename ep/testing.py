"""Inputs whose answers are known: routing generators and token makers shared by tests, bench and examples.

All generators are seeded; the same (seed, rank) gives the same inputs on every run and backend.
"""
from __future__ import annotations

import numpy as np

from .reference import f32_to_bf16


def uniform_routing(rng: np.random.Generator, num_tokens: int, num_experts: int, topk: int) -> np.ndarray:
    """int64 [T, K]: the top-k experts of |randn|+1 scores (distinct experts per token, random order)."""
    scores = np.abs(rng.standard_normal((num_tokens, num_experts))) + 1.0
    top = np.argsort(-scores, axis=1, kind="stable")[:, :topk]
    return top.astype(np.int64)


def skewed_routing(rng: np.random.Generator, num_tokens: int, num_experts: int, topk: int,
                   hot: int = 4, boost: float = 8.0) -> np.ndarray:
    """Like uniform_routing, but ``hot`` experts get ``boost`` added to their scores (most tokens pick them)."""
    scores = np.abs(rng.standard_normal((num_tokens, num_experts))) + 1.0
    hot_ids = rng.choice(num_experts, size=min(hot, num_experts), replace=False)
    scores[:, hot_ids] += boost
    return np.argsort(-scores, axis=1, kind="stable")[:, :topk].astype(np.int64)


def drop_slots(rng: np.random.Generator, topk_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Set a random ``fraction`` of the slots to -1 (unused)."""
    ids = topk_ids.copy()
    if fraction > 0:
        ids[rng.random(ids.shape) < fraction] = -1
    return ids


def routing(kind: str, rng: np.random.Generator, num_tokens: int, num_experts: int, topk: int,
            drop: float = 0.0) -> np.ndarray:
    """kind: "uniform" or "skewed"; ``drop``: fraction of -1 slots."""
    if kind == "uniform":
        ids = uniform_routing(rng, num_tokens, num_experts, topk)
    elif kind == "skewed":
        ids = skewed_routing(rng, num_tokens, num_experts, topk)
    else:
        raise ValueError(f"routing kind must be 'uniform' or 'skewed', got {kind!r}")
    return drop_slots(rng, ids, drop)


def random_tokens(rng: np.random.Generator, num_tokens: int, hidden: int) -> np.ndarray:
    """uint16 bf16 [T, H] of N(0, 1) values (never zeros)."""
    return f32_to_bf16(rng.standard_normal((num_tokens, hidden)).astype(np.float32))


def random_weights(rng: np.random.Generator, num_tokens: int, topk: int) -> np.ndarray:
    """float32 [T, K] in [0.05, 1)."""
    return (0.05 + 0.95 * rng.random((num_tokens, topk))).astype(np.float32)


def tagged_tokens(rank: int, num_tokens: int, hidden: int) -> np.ndarray:
    """uint16 bf16 rows that encode (source rank, token index): element j of token t of rank r is the
    bf16 of r*65536... kept exact: value = r + t/4096 + j/2^20 is not exact in bf16, so instead the first
    two elements carry r and t as small integers (exact in bf16 up to 256) and the rest a ramp."""
    rows = np.zeros((num_tokens, hidden), np.float32)
    rows[:, 0] = rank + 1
    rows[:, 1] = (np.arange(num_tokens) % 256) + 1
    rows[:, 2] = (np.arange(num_tokens) // 256) + 1
    rows[:, 3:] = np.linspace(-1, 1, max(hidden - 3, 0), dtype=np.float32)[None, :]
    return f32_to_bf16(rows)


def seed_for(seed: int, rank: int, call: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, rank, call])
