"""How every figure of the benchmark is timed, the same way for ep and for the baselines.

One timed *section* = (L2 flush) -> device synchronize -> cross-rank barrier (MPI, or torch.distributed
under torchrun) -> device barrier kernel (GPU: aligns the ranks' start to a few microseconds, which host
barriers do not) -> marks around the ops. A mark is a CUDA event on the bench stream (GPU) or a host
clock reading (CPU backend: host wall time). Warm-up sections are run and thrown away.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

L2_FLUSH_BYTES = 256 << 20   # larger than any current GPU's L2 (H200: 60 MB), so no input stays cached


@dataclass
class Stats:
    """Per-rank statistics of one timed op over the measured iterations (microseconds)."""

    median: float
    min: float
    max: float
    n: int

    @staticmethod
    def of(samples_us: list[float]) -> "Stats":
        return Stats(float(statistics.median(samples_us)), float(min(samples_us)), float(max(samples_us)),
                     len(samples_us))


class HostClock:
    """CPU backend: marks are host wall-clock readings; nothing to flush or synchronize."""

    kind = "host wall time"

    def mark(self):
        return time.perf_counter()

    def elapsed_us(self, start, end) -> float:
        return (end - start) * 1e6

    def prepare(self) -> None:
        pass

    def device_barrier(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass


class GpuClock:
    """GPU: CUDA events on ``stream``; an L2 flush by writing a 256 MB scratch buffer; a device barrier
    kernel (ep_barrier over the bench's own signal buffer) right before the first mark."""

    kind = "CUDA events"

    def __init__(self, stream, group, device_barrier):
        import cupy
        self._cupy = cupy
        self.stream = stream
        self.group = group
        self._barrier = device_barrier
        with stream:
            self._scratch = cupy.empty(L2_FLUSH_BYTES // 4, dtype=np.uint32)
        self._flushes = 0

    def mark(self):
        ev = self._cupy.cuda.Event()
        ev.record(self.stream)
        return ev

    def elapsed_us(self, start, end) -> float:
        end.synchronize()
        return self._cupy.cuda.get_elapsed_time(start, end) * 1e3

    def prepare(self) -> None:
        """L2 flush (a kernel writing the scratch buffer) on the bench stream."""
        self._flushes += 1
        with self.stream:
            self._scratch.fill(np.uint32(self._flushes))

    def device_barrier(self) -> None:
        if self._barrier is not None:
            self._barrier(self.stream)

    def synchronize(self) -> None:
        self._cupy.cuda.runtime.deviceSynchronize()
        if self._barrier is not None:
            self._barrier.check()

    def close(self) -> None:
        self._scratch = None
        if self._barrier is not None:
            self._barrier.close()
            self._barrier = None


def run_sections(clock, group, sections: list[Callable[[], dict]], warmup: int, iters: int,
                 after_last: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Run ``warmup + iters`` iterations; each iteration runs every section after a flush, a device
    synchronize and barriers. A section returns ``{op: (start_mark, end_mark)}``. Returns the measured
    samples ``{op: [us, ...]}``. ``after_last`` runs (untimed) once after the last iteration."""
    samples: dict[str, list[float]] = {}
    # NOTE: a garbage-collector pause between two launches shows up in the events (seen: 91 ms once).
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        _iterate(clock, group, sections, warmup, iters, samples)
    finally:
        if gc_was_enabled:
            gc.enable()
    clock.synchronize()
    if after_last is not None:
        after_last()
    return samples


def _iterate(clock, group, sections, warmup: int, iters: int, samples: dict) -> None:
    for it in range(warmup + iters):
        for section in sections:
            clock.prepare()
            clock.synchronize()
            group.barrier()
            clock.device_barrier()
            marks = section()
            for op, (start, end) in marks.items():
                us = clock.elapsed_us(start, end)
                if it >= warmup:
                    samples.setdefault(op, []).append(us)


def gather_stats(group, samples: dict[str, list[float]]) -> dict[str, dict]:
    """Per op: every rank's Stats, and the cross-rank summary (the headline is the slowest rank's median).

    Returns ``{op: {"ranks": [Stats-as-dict per rank], "median": max over ranks of the median,
    "median_min_rank": min over ranks of the median, "min": min over ranks and iterations,
    "max": max over ranks and iterations}}``. Collective."""
    mine = {op: Stats.of(v).__dict__ for op, v in samples.items()}
    everyone = group.allgather(mine)
    out = {}
    for op in samples:
        ranks = [r[op] for r in everyone]
        out[op] = {"median": max(r["median"] for r in ranks), "median_min_rank": min(r["median"] for r in ranks),
                   "min": min(r["min"] for r in ranks), "max": max(r["max"] for r in ranks), "ranks": ranks}
    return out


def host_times(clock, group, calls: dict[str, Callable[[], None]], warmup: int, iters: int) -> dict[str, list[float]]:
    """Host time of each call as a user sees it: the GPU idle (synchronized), the ranks aligned (barrier),
    then perf_counter around the call alone. Returns ``{name: [us, ...]}``."""
    samples: dict[str, list[float]] = {}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for it in range(warmup + iters):
            for name, call in calls.items():
                clock.synchronize()
                group.barrier()
                t0 = time.perf_counter()
                call()
                t1 = time.perf_counter()
                if it >= warmup:
                    samples.setdefault(name, []).append((t1 - t0) * 1e6)
    finally:
        if gc_was_enabled:
            gc.enable()
    clock.synchronize()
    return samples
