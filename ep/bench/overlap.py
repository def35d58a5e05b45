"""Overlap benchmark: communication hidden behind compute.

    python -m ep.bench.overlap [--tokens-ht 4096] [--tokens-ll 128] [--iters 20]      (mpirun -np W for W > 1)

1. HT: a cached dispatch + combine (async ops on the comm stream) against an expert-MLP-sized GEMM on the
   compute stream (fp16 [M, 7168] x [7168, 2048] by cuBLAS through CuPy: the tensor-core rate of bf16).
   Reports the comm ops alone, the GEMM alone, both serialized on one stream, both overlapped, and the
   fraction of the communication hidden: (serial - overlapped) / comm.
2. LL: two micro-batches per step (dispatch, MLP, combine each), plain (one after the other) against the
   receive hooks (both sends first, then each receive half before its MLP), and the signalled combine (the
   combine starts with the MLP and sends each expert's rows once its signal says they are written).
On one GPU the gain reflects SM sharing and kernel fixed costs only; link overlap needs W > 1 on GPUs.
Times: CUDA events on the compute stream around each step after warm-up, medians (microseconds).
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np


def _median_us(stream, step, iters: int, warmup: int = 3) -> float:
    import cupy
    for _ in range(warmup):
        step()
    stream.synchronize()
    samples = []
    for _ in range(iters):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(stream)
        step()
        b.record(stream)
        b.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(a, b) * 1e3)
    return float(statistics.median(samples))


def _inputs(comm, T: int, seed: int, stream):
    """The bench's inputs (ep.bench.workload) of this rank for ``comm``'s shape, on the device."""
    from . import gpu, workload
    cfg = comm.config
    shape = workload.Shape(cfg.mode, T, cfg.hidden_size, cfg.num_experts, cfg.topk)
    return gpu.to_device(workload.make_inputs(shape, "uniform", 0.0, seed, comm.rank), stream)[:3]


def ht_section(group, T: int, iters: int, gemm_m: int) -> dict:
    import cupy
    from .. import MoECommunicator, MoECommunicatorConfig
    cfg = MoECommunicatorConfig(mode="ht", num_experts=256, hidden_size=7168, topk=8, max_tokens_per_rank=T)
    compute = cupy.cuda.Stream(non_blocking=True)
    a = cupy.random.standard_normal((gemm_m, 7168), dtype=np.float32).astype(np.float16)
    b = cupy.random.standard_normal((7168, 2048), dtype=np.float32).astype(np.float16)
    with MoECommunicator(cfg, group) as comm:
        x, ids, w = _inputs(comm, T, 1, compute)
        out, handle = comm.dispatch(x, ids, w, stream=compute)
        y = out.tokens

        def gemm():
            with compute:
                cupy.matmul(a, b)

        def comm_sync():
            o, h = comm.dispatch(x, ids, w, previous_handle=handle, stream=compute)
            comm.combine(y, h, stream=compute)

        def overlapped():
            o, h, ev = comm.dispatch_async(x, ids, w, previous_handle=handle, stream=compute)
            gemm()                                       # queued on compute while the comm stream works
            c, ev2 = comm.combine_async(y, h, previous_event=ev, stream=compute)
            ev2.wait(compute)

        r = {"comm": _median_us(compute, comm_sync, iters), "gemm": _median_us(compute, gemm, iters)}
        r["serial"] = _median_us(compute, lambda: (comm_sync(), gemm()), iters)
        r["overlapped"] = _median_us(compute, overlapped, iters)
    r["hidden"] = (r["serial"] - r["overlapped"]) / r["comm"] if r["comm"] else 0.0
    return r


def ll_section(group, T: int, iters: int) -> dict:
    import cupy
    from .. import CommOverlapConfig, MoECommunicator, MoECommunicatorConfig
    cfg = MoECommunicatorConfig(mode="ll", num_experts=256, hidden_size=7168, topk=8, max_tokens_per_rank=T,
                                overlap=CommOverlapConfig(combine_num_sms=16))
    compute = cupy.cuda.Stream(non_blocking=True)
    with MoECommunicator(cfg, group) as comm:
        L = comm.num_local_experts
        batches = [_inputs(comm, T, s, compute) for s in (2, 3)]
        out0, _ = comm.dispatch(*batches[0], stream=compute)
        shape = out0.tokens.shape
        ys = [cupy.empty(shape, np.uint16) for _ in batches]
        signals = comm.create_overlap_config(framework="cupy")

        def mlp(tokens, y, signal=False):
            """The stand-in expert MLP: a copy per expert (its cost is not the point here), then its signal."""
            tv, yv = tokens.reshape(L, -1, 7168), y.reshape(L, -1, 7168)
            with compute:
                for e in range(L):
                    yv[e] = tv[e]
                    if signal:
                        signals.signal(e, stream=compute)

        def plain():
            for xb, yb in zip(batches, ys):
                o, h = comm.dispatch(*xb, stream=compute)
                mlp(o.tokens, yb)
                comm.combine(yb, h, stream=compute)

        def hooks():
            sent = [comm.dispatch(*xb, stream=compute, return_recv_hook=True) for xb in batches]
            pending = []
            for (o, h, hook), yb in zip(sent, ys):
                hook()
                mlp(o.tokens, yb)
                pending.append(comm.combine(yb, h, stream=compute, return_recv_hook=True)[1])
            for hook in pending:
                hook()

        def signalled():
            for xb, yb in zip(batches, ys):
                o, h = comm.dispatch(*xb, stream=compute)
                start = cupy.cuda.Event(disable_timing=True)
                start.record(compute)
                mlp(o.tokens, yb, signal=True)
                c, ev = comm.combine_async(yb, h, previous_event=start, overlap=signals, stream=compute)
                ev.wait(compute)

        return {"plain": _median_us(compute, plain, iters), "hooks": _median_us(compute, hooks, iters),
                "signalled": _median_us(compute, signalled, iters)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens-ht", type=int, default=4096)
    p.add_argument("--tokens-ll", type=int, default=128)
    p.add_argument("--gemm-m", type=int, default=8192, help="rows of the stand-in expert GEMM (default 8192)")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    ht = ht_section(None, args.tokens_ht, args.iters, args.gemm_m)
    ll = ll_section(None, args.tokens_ll, args.iters)
    print(f"HT T={args.tokens_ht} cached dispatch+combine vs GEMM [{args.gemm_m}x7168]x[7168x2048] fp16 (us): "
          f"comm {ht['comm']:.1f}  gemm {ht['gemm']:.1f}  serial {ht['serial']:.1f}  overlapped "
          f"{ht['overlapped']:.1f}  hidden {100 * ht['hidden']:.0f}% of comm")
    print(f"LL T={args.tokens_ll} two micro-batches per step (us): plain {ll['plain']:.1f}  hooks {ll['hooks']:.1f}  "
          f"signalled combine {ll['signalled']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
