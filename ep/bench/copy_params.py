"""NumPy mirror of ``ep::BenchCopyParams`` (ep/bench/cuda/bench_copy.cu) and the constants its kernels use.

``tests/cpu/test_bench_cpu.py`` compiles static_asserts generated from :data:`BENCH_COPY_PARAMS` against
the C struct (NVRTC, no GPU needed), so the two cannot drift.
"""
from __future__ import annotations

import numpy as np

from .. import structs
from ..constants import MAX_WORLD_SIZE

BENCH_COPY_PARAMS = np.dtype([
    ("src", np.uint64, (MAX_WORLD_SIZE,)),
    ("dst", np.uint64, (MAX_WORLD_SIZE,)),
    ("bytes", np.uint64, (MAX_WORLD_SIZE,)),
    ("max_bytes", np.uint64),
    ("rank", np.int32),
    ("world", np.int32),
], align=True)

C_NAME = "BenchCopyParams"
SOURCE = "bench_copy.cu"
VECTOR_ENTRY = "bench_a2a_copy"
TMA_ENTRY = "bench_a2a_copy_tma"
TMA_STAGES = 3          # bench_copy.cu kBenchTmaStages
TMA_CHUNK = 16384       # bench_copy.cu kBenchTmaChunk: bytes of one bulk copy
TMA_MAX_WARPS = 4       # 4 warps x 3 stages x 16 KB = 192 KB of the 227 KB a Hopper block can have


def pack(src: list[int], dst: list[int], nbytes: list[int], rank: int, world: int) -> structs.Params:
    """The launch params; lists are per destination rank (length ``world``), unused slots zero."""
    if not (len(src) == len(dst) == len(nbytes) == world <= MAX_WORLD_SIZE):
        raise ValueError(f"need {world} entries per list (world <= {MAX_WORLD_SIZE})")
    if any(n % 16 for n in nbytes):
        raise ValueError(f"per-peer byte counts must be multiples of 16, got {nbytes}")
    pad = [0] * (MAX_WORLD_SIZE - world)
    return structs.pack(BENCH_COPY_PARAMS, src=list(src) + pad, dst=list(dst) + pad, bytes=list(nbytes) + pad,
                        max_bytes=max(nbytes) if nbytes else 0, rank=rank, world=world)


def static_asserts() -> str:
    """C++ static_asserts pinning sizeof/offsetof of ep::BenchCopyParams to the NumPy dtype."""
    return structs.static_asserts(C_NAME, BENCH_COPY_PARAMS)
