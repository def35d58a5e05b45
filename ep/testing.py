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


# Block-scaled formats HT dispatch carries as they are: (payload bytes per row, scales per row, scale dtype),
# given the hidden size H.
PAYLOAD_FORMATS = {
    "fp8": (lambda H: H, lambda H: H // 128, np.float32),      # e4m3 + float32 per 128 channels
    "fp8_ue8m0": (lambda H: H, lambda H: H // 512, np.int32),  # e4m3 + UE8M0 per 128, four exponents per int32
    "mxfp8": (lambda H: H, lambda H: H // 32, np.uint8),       # e4m3 + E8M0 per 32
    "nvfp4": (lambda H: H // 2, lambda H: H // 16, np.uint8),  # packed E2M1 + E4M3 per 16
}
# The payload cases the tests run: (name, format, scales passed column-major).
PAYLOAD_CASES = [
    ("fp8_f32_scales", "fp8", False),
    ("fp8_f32_scales_column_major", "fp8", True),
    ("fp8_ue8m0_int32", "fp8_ue8m0", True),
    ("mxfp8_e8m0_bytes", "mxfp8", False),
    ("nvfp4_e4m3_bytes", "nvfp4", True),
]


def random_payload(rng: np.random.Generator, num_tokens: int, hidden: int, fmt: str,
                   column_major: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [T, row] random payload bytes, [T, S] non-zero scales) of a PAYLOAD_FORMATS format;
    column_major: the scales as quantizers leave them (the view ``s.T.contiguous().T``)."""
    width, count, dtype = PAYLOAD_FORMATS[fmt]
    x = rng.integers(0, 256, size=(num_tokens, width(hidden)), dtype=np.uint8)
    if dtype == np.float32:
        sc = rng.standard_normal((num_tokens, count(hidden))).astype(np.float32)
    else:
        sc = rng.integers(1, 2 ** 30 if dtype == np.int32 else 256, size=(num_tokens, count(hidden))).astype(dtype)
    return x, (np.ascontiguousarray(sc.T).T if column_major else sc)


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
