"""Baseline 1, the link ceiling: an all-to-all that moves each rank's real off-GPU dispatch volume per peer
(the bytes its dispatch sends to each other rank), as fast as this machine can, by every method we know:
  ce-memcpy   copy engines: cudaMemcpyAsync into the peers' IPC-mapped buffers, 1, 2 or 4 streams per
              peer (pieces of its bytes), all started together from one event;
              (cudaMemcpyPeerAsync is not tried: with IPC mappings it needs the peer's device ordinal and a
              context on that device in every process; cudaMemcpyDefault reaches the peer through UVA and
              uses the same copy engines);
  sm-vector   bench_a2a_copy (ep/bench/cuda/bench_copy.cu): 16-byte loads, 8 in flight per lane, 16-byte stores;
  sm-tma      bench_a2a_copy_tma: per-warp TMA bulk load -> bulk store pipeline, 3 stages;
the SM kernels at several block counts (16/24/32/64/all SMs, and 2x/4x the SMs for the vector kernel)
and block sizes. The best median wins.
Every variant is timed like ep (timing.py): flush, synchronize, MPI barrier, device barrier, events.
"""
from __future__ import annotations

import logging

import numpy as np

from .. import jit, runtime_base
from ..tuning import KernelSet
from ..peer_memory import SymmetricBuffer
from ..sizes import round_up
from . import copy_params, gpu, report, timing
from .workload import Volume

log = logging.getLogger("ep.bench")

SM_BLOCKS = (16, 24, 32, 64)      # plus the SM count; the tuning grid of the brief
VECTOR_WAVES = (2, 4)             # vector kernel also at 2x and 4x the SM count (blocks, several per SM)
VECTOR_THREADS = (512, 1024)
TMA_WARPS = (2, 4)                # TMA: 96 or 192 KB of shared memory per block, one block per SM
CE_SPLITS = (1, 2, 4)             # copy-engine pieces (streams) per peer


class _Setup:
    """Buffers and parameters shared by every method. Collective to build and close."""

    def __init__(self, ctx, vol: Volume):
        import cupy
        group = ctx.group
        W, rank = group.size, group.rank
        self.send = vol.send_bytes(rank)
        self.send[rank] = 0                       # the ceiling moves only what crosses NVLink
        slot = round_up(max([int(vol.pairs[s, d]) * vol.row_bytes for s in range(W) for d in range(W) if s != d]
                            + [16]), 256)
        self.slot = slot
        self.recv = SymmetricBuffer(group, W * slot, "bench.ceiling")
        try:
            with ctx.stream:
                self.src_arr = cupy.empty(W * slot, dtype=np.uint8)
                gpu.fill_random_bytes(self.src_arr, rank)
            ctx.stream.synchronize()
            base = int(self.src_arr.data.ptr)
            self.src = [base + d * slot for d in range(W)]
            self.dst = [int(self.recv.peer_ptrs[d]) + rank * slot for d in range(W)]
            self.peers = [(rank + i) % W for i in range(1, W)]
        except BaseException:
            self.recv.close()
            raise

    def close(self, group) -> None:
        import cupy
        cupy.cuda.runtime.deviceSynchronize()
        group.barrier()                            # no peer still writing into our receive buffer
        self.recv.close()
        self.src_arr = None


def _copy_engine(ctx, setup: _Setup, splits: int):
    """A section issuing ``splits`` cudaMemcpyAsync per peer (consecutive pieces), each on its own stream,
    all waiting on the start event recorded on the bench stream; the bench stream then waits for every
    copy. More than one piece per peer lets more copy engines work on one link."""
    import cupy
    from cupy.cuda import runtime
    jobs = []
    for d in setup.peers:
        n = setup.send[d]
        piece = round_up(-(-n // splits), 16) if n else 0
        for i in range(splits):
            lo, hi = min(i * piece, n), min((i + 1) * piece, n)
            jobs.append((cupy.cuda.Stream(non_blocking=True), setup.dst[d] + lo, setup.src[d] + lo, hi - lo))

    def section():
        m0 = ctx.clock.mark()
        for stream, dst, src, n in jobs:
            stream.wait_event(m0)
            if n:
                runtime.memcpyAsync(dst, src, n, runtime.memcpyDefault, stream.ptr)
            done = cupy.cuda.Event(disable_timing=True)
            done.record(stream)
            ctx.stream.wait_event(done)
        m1 = ctx.clock.mark()
        return {"a2a": (m0, m1)}
    return section


def _sm_kernel(ctx, setup: _Setup, kernel, blocks: int, threads: int, smem: int):
    params = copy_params.pack(setup.src, setup.dst, setup.send, ctx.group.rank, ctx.group.size)

    def section():
        m0 = ctx.clock.mark()
        kernel.launch(blocks, threads, params, smem=smem, stream=ctx.stream)
        m1 = ctx.clock.mark()
        return {"a2a": (m0, m1)}
    return section


def _probe(ctx, section) -> str | None:
    """Run a method once, untimed; agree across ranks whether it works (a failure on one rank must not
    leave the others waiting in a barrier). Returns the first error text or None."""
    error = None
    try:
        section()
        ctx.clock.synchronize()
    except Exception as exc:   # an unsupported copy path reports here, e.g. an invalid device pointer
        error = f"{type(exc).__name__}: {exc}"
    errors = [e for e in ctx.group.allgather(error) if e]
    return errors[0] if errors else None


def run(ctx, vol: Volume) -> dict:
    """Time every method; return {"methods": [...], "best": row, "winner": label}. Collective."""
    group = ctx.group
    W = group.size
    sent = [vol.offgpu_send_bytes(r) for r in range(W)]
    if W < 2 or max(sent) == 0:
        return {"skipped": "nothing crosses NVLink (one rank, or no token leaves its rank)"}
    setup = _Setup(ctx, vol)
    try:
        kernels = runtime_base.load_kernels(group, [KernelSet(jit.KernelVariant.of(copy_params.SOURCE),
                                                              (copy_params.VECTOR_ENTRY, copy_params.TMA_ENTRY))])
        sms = gpu.sm_count()
        block_grid = sorted({b for b in SM_BLOCKS if b <= sms} | {sms})
        candidates = [(f"ce-memcpy x{k}", f"copy engines (cudaMemcpyAsync, {k} stream(s)/peer)", 0,
                       _copy_engine(ctx, setup, k)) for k in CE_SPLITS]
        # The copy kernels wait for nothing, so their grid may exceed one wave (more loads in flight).
        for blocks in block_grid + [m * sms for m in VECTOR_WAVES]:
            for threads in VECTOR_THREADS:
                candidates.append((f"sm-vector {blocks}x{threads}", "bench_a2a_copy", blocks,
                                   _sm_kernel(ctx, setup, kernels[copy_params.VECTOR_ENTRY], blocks, threads, 0)))
            if blocks > sms:
                continue
            for warps in TMA_WARPS:
                smem = warps * copy_params.TMA_STAGES * copy_params.TMA_CHUNK
                candidates.append((f"sm-tma {blocks}x{warps * 32}", "bench_a2a_copy_tma", blocks,
                                   _sm_kernel(ctx, setup, kernels[copy_params.TMA_ENTRY], blocks, warps * 32, smem)))
        methods = []
        for label, what, blocks, section in candidates:
            error = _probe(ctx, section)
            if error:
                methods.append({"method": label, "what": what, "failed": error})
                continue
            samples = timing.run_sections(ctx.clock, group, [section], ctx.args.warmup, ctx.args.iters)
            stats = timing.gather_stats(group, samples)["a2a"]
            row = report.op_row(f"ceiling {label}", "ceiling", stats, None, sent, blocks or "CE",
                                note=what)
            methods.append({"method": label, "what": what, "row": row})
    except BaseException:
        setup.src_arr = None   # no collective close on the error path (cli._fail ends the job)
        raise
    setup.close(group)
    timed = [m for m in methods if "row" in m]
    if not timed:
        return {"skipped": "every ceiling method failed: " + "; ".join(m["failed"] for m in methods), "methods": methods}
    best = min(timed, key=lambda m: m["row"]["us"]["median"])
    # The table shows the best of each family, the JSON every variant.
    families = {}
    for m in timed:
        fam = m["method"].split()[0]
        if fam not in families or m["row"]["us"]["median"] < families[fam]["row"]["us"]["median"]:
            families[fam] = m
    return {"methods": methods, "best": best["row"], "winner": best["method"],
            "family_best": [families[f]["row"] for f in sorted(families)]}
