"""Constants that the host and the kernels share: one table, checked against the C side in CPU CI.

``cuda_src/common/constants.cuh`` declares each of these as a ``constexpr``; ``tests/cpu/test_structs.py``
compiles the ``static_assert``s that :func:`static_asserts` renders against it (NVRTC, no GPU needed), so a
value edited on one side only fails CI. The error phases are generated from :data:`PHASES` the same way.
"""
from __future__ import annotations

# name -> (value, why this value)
TABLE: dict[str, tuple[int, str]] = {
    "kMaxWorld": (32, "peer masks are 32-bit words"),
    "kMaxTopk": (32, "a token's slots are one warp's lanes"),
    "kMaxLocalExperts": (1024, "per-(source, expert) count tables live in shared memory"),
    "kDupBit": (1 << 30, "route/lexp flag: the slot repeats an expert named by an earlier slot"),
    "kRouteChunk": (128, "tokens per block of the HT routing kernels (their block size)"),
    "kRoutePosTile": (2048, "columns per shared-memory tile of ht_route_positions (32 KB at 4 warps)"),
    "kHtChunkTokens": (4, "tokens per HT dispatch chunk: one sender warp sends it, then publishes its flag"),
    "kBarrierSlots": (32, "u64 flags per barrier in a signal buffer: one per rank"),
    "kCombineReduceWarps": (32, "warps per block of ht_combine_reduce/_sum/_gather: the narrow fold fits 64 registers"),
    "kSmemLimit": (227 * 1024, "Hopper: the most dynamic shared memory a block can opt in to"),
    "kMetaBytesMax": ((8 + 12 * 32 + 15) // 16 * 16, "one token's metadata record at kMaxTopk slots"),
    "kLLChunkChannels": (1024, "channels of one LL work item: 2 KB of bf16, one warp's 4 vectors per lane"),
    "kGatherMaxWarps": (16, "warps per block of the pull gather at most: its launch bounds give it 128 registers"),
}

MAX_WORLD_SIZE = TABLE["kMaxWorld"][0]
MAX_TOPK = TABLE["kMaxTopk"][0]
MAX_LOCAL_EXPERTS = TABLE["kMaxLocalExperts"][0]
DUP_BIT = TABLE["kDupBit"][0]
ROUTE_CHUNK = TABLE["kRouteChunk"][0]
ROUTE_POS_TILE = TABLE["kRoutePosTile"][0]
HT_CHUNK_TOKENS = TABLE["kHtChunkTokens"][0]
BARRIER_SLOTS = TABLE["kBarrierSlots"][0]
COMBINE_REDUCE_WARPS = TABLE["kCombineReduceWarps"][0]
SMEM_LIMIT = TABLE["kSmemLimit"][0]
META_BYTES_MAX = TABLE["kMetaBytesMax"][0]
LL_CHUNK_CHANNELS = TABLE["kLLChunkChannels"][0]
GATHER_MAX_WARPS = TABLE["kGatherMaxWarps"][0]

# Phases of the error record (cuda_src/common/constants.cuh enum Phase): code -> (C name, what Python prints).
PHASES: dict[int, tuple[str, str]] = {
    1: ("kPhaseBarrier", "barrier"),
    2: ("kPhaseHtCounts", "ht count exchange"),
    3: ("kPhaseHtDispatchRecv", "ht dispatch receive"),
    4: ("kPhaseHtCombineRecv", "ht combine receive"),
    5: ("kPhaseLLDispatchRecv", "ll dispatch receive"),
    6: ("kPhaseLLCombineRecv", "ll combine receive"),
    7: ("kPhaseBadExpertId", "invalid expert id"),
    8: ("kPhaseCapacity", "capacity"),
    9: ("kPhaseLLCombineWeights", "ll combine weights"),
}
PHASE_NAMES = {code: text for code, (_, text) in PHASES.items()}
PHASE_BY_C_NAME = {c_name: code for code, (c_name, _) in PHASES.items()}


def static_asserts() -> str:
    """C++ static_asserts pinning every constant and phase code of the C side to this table."""
    lines = [f'static_assert(ep::{name} == {value}, "{name} is mirrored in ep/constants.py");'
             for name, (value, _) in TABLE.items()]
    lines += [f'static_assert(ep::{c_name} == {code}, "{c_name} is mirrored in ep/constants.py");'
              for code, (c_name, _) in PHASES.items()]
    return "\n".join(lines)
