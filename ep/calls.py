"""The call records: what one validated dispatch or combine hands its runtime.

The communicator validates a call's arguments and builds one record; every runtime (CPU, HT, LL) takes that
record and nothing else, and never changes it (``dataclasses.replace`` makes a changed copy). A new argument
is a new field here, read by the runtimes that use it. Slotted, not frozen: a frozen dataclass's __init__
costs a few microseconds on every op's host path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .arrays import ArrayInfo


@dataclass(slots=True)
class DispatchCall:
    x: ArrayInfo                      # [T, H] bf16, or (HT, with scales) [T, row] of a one-byte payload
    topk_ids: ArrayInfo               # [T, K] int32 / int64
    weights: ArrayInfo | None         # [T, K] float32, None = ones
    previous: Any                     # the runtime state of previous_handle (a cached dispatch), or None
    output_buffer: ArrayInfo | None   # LL: [L, W*T_max, H] bf16 to write into instead of the owned output
    stream: Any                       # CuPy stream to launch on (None on the CPU backend)
    framework: str                    # "torch", "cupy" or "numpy": the framework of the outputs
    fp8: int = 0                      # LL cast: 0 bf16, 1 e4m3 + f32 scales, 2 power-of-two scales, 3 UE8M0
    cumulative_counts: ArrayInfo | None = None   # LL: [L] int32/int64 the call's counts are added to
    recv_hook: bool = False           # LL: launch the send half only; the returned hook launches the receive
    scales: ArrayInfo | None = None   # HT: [T, S] scales of x's rows (any strides), travelling with them
    worst_case: bool = False          # TOKEN_MAJOR: W * T_max output rows, no host wait (CUDA-graph capturable)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def cached(self) -> bool:
        return self.previous is not None


@dataclass(slots=True)
class CombineCall:
    expert_output: ArrayInfo          # the shape and row order of that dispatch's tokens, bf16
    state: Any                        # the runtime state of the handle
    out: ArrayInfo | None             # [T, H] bf16 to write into, or None (the runtime allocates)
    num_tokens: int
    stream: Any
    framework: str
    recv_hook: bool = False           # LL: as for dispatch
    ready: ArrayInfo | None = None    # LL overlap: [L] uint32 counters an expert's rows wait for
    ready_target: int = 0
    topk_weights: ArrayInfo | None = None   # TOKEN_MAJOR: [N, K] float32 rows summed like the tokens
    weights: ArrayInfo | None = None        # LL: [T, K] float32 combine-time weights, replacing the dispatch's
