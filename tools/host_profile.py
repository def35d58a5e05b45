"""Where an eager call's host time goes (one GPU, W=1). For each op (LL dispatch, LL combine, HT dispatch,
HT cached dispatch, HT combine): the median host time of N calls with perf_counter around the call and the
GPU idle before each (as ep.bench measures), then either a cProfile of the same calls (top entries by own
time) or, with --sections, the mean inclusive time per call of ep's host-path functions (timed by wrappers,
which cProfile's own overhead does not distort) and of the garbage collector.

    python3 tools/host_profile.py [N] [--top K] [--sections]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time

import numpy as np


def _ops(comm, mode, x, ids, stream):
    """name -> (setup, call): setup runs untimed before each call (an LL combine needs a fresh dispatch)."""
    out, h = comm.dispatch(x, ids, stream=stream)
    y = out.tokens
    if mode == "ll":
        fresh = {}

        def setup():
            fresh["out"], fresh["h"] = comm.dispatch(x, ids, stream=stream)
        return {"ll dispatch": (None, lambda: comm.dispatch(x, ids, stream=stream)),
                "ll combine": (setup, lambda: comm.combine(fresh["out"].tokens, fresh["h"], stream=stream))}
    return {"ht dispatch": (None, lambda: comm.dispatch(x, ids, stream=stream)),
            "ht cached dispatch": (None, lambda: comm.dispatch(x, ids, previous_handle=h, stream=stream)),
            "ht combine": (None, lambda: comm.combine(y, h, stream=stream))}


def _section_timers():
    """Wrap ep's host-path functions with perf_counter timers: returns (totals ns by label, reset)."""
    import gc

    from ep import arrays, communicator, gate, jit, structs, validation
    from ep.ll import LLRuntime
    from ep.ht import HtRuntime
    totals: dict[str, int] = {}
    targets = [(communicator.MoECommunicator, "_validated"), (communicator.MoECommunicator, "_launch"),
               (communicator.MoECommunicator, "_check_usable"), (validation, "dispatch_call"),
               (validation, "combine_call"), (validation, "settle"), (gate.OpGate, "pass_"), (structs.Params, "update"),
               (jit.Kernel, "launch"), (arrays, "check_array"), (arrays, "describe"), (arrays, "framework_of"),
               (validation, "check_handle"), (LLRuntime, "dispatch"), (LLRuntime, "combine"), (LLRuntime, "views"),
               (HtRuntime, "dispatch"), (HtRuntime, "combine")]
    for owner, name in targets:
        fn = getattr(owner, name)
        label = f"{getattr(owner, '__name__', owner)}.{name}".replace("ep.", "")

        def timed(*args, _fn=fn, _label=label, **kwargs):
            t0 = time.perf_counter_ns()
            try:
                return _fn(*args, **kwargs)
            finally:
                totals[_label] = totals.get(_label, 0) + time.perf_counter_ns() - t0
        setattr(owner, name, timed)
    gc_start = [0]

    def on_gc(phase, info):
        if phase == "start":
            gc_start[0] = time.perf_counter_ns()
        else:
            totals["gc"] = totals.get("gc", 0) + time.perf_counter_ns() - gc_start[0]
    gc.callbacks.append(on_gc)
    return totals


def main() -> int:
    import cupy

    from ep import MoECommunicator, MoECommunicatorConfig
    from ep import testing as T
    p = argparse.ArgumentParser()
    p.add_argument("n", type=int, nargs="?", default=300)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--sections", action="store_true")
    a = p.parse_args()
    totals = _section_timers() if a.sections else None
    rng = np.random.default_rng(0)
    stream = cupy.cuda.Stream(non_blocking=True)
    medians = {}
    for mode, tokens in (("ll", 128), ("ht", 512)):
        cfg = MoECommunicatorConfig(mode=mode, num_experts=256, hidden_size=7168, topk=8, max_tokens_per_rank=tokens)
        with MoECommunicator(cfg, backend="gpu") as comm:
            x = cupy.asarray(T.random_tokens(rng, tokens, 7168))
            ids = cupy.asarray(T.uniform_routing(rng, tokens, 256, 8))
            for name, (setup, call) in _ops(comm, mode, x, ids, stream).items():
                times, own = [], {}
                for _ in range(a.n):
                    if setup:
                        setup()
                    stream.synchronize()
                    before = dict(totals or {})
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
                    for label, ns in (totals or {}).items():
                        own[label] = own.get(label, 0) + ns - before.get(label, 0)
                medians[name] = statistics.median(times) * 1e6
                if totals is not None:
                    print(f"===== {name}: median host {medians[name]:.1f} us, mean {statistics.mean(times) * 1e6:.1f}; "
                          "mean inclusive us per call:")
                    for label, ns in sorted(own.items(), key=lambda kv: -kv[1]):
                        print(f"  {ns / a.n / 1e3:8.2f}  {label}")
                    continue
                prof = cProfile.Profile()
                for _ in range(a.n):
                    if setup:
                        setup()
                    stream.synchronize()
                    prof.enable()
                    call()
                    prof.disable()
                stream.synchronize()
                print(f"===== {name}: median host {medians[name]:.1f} us; cProfile of {a.n} calls, own time first")
                pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)
    small = cupy.ones(16, cupy.float32)
    with stream:
        times = []
        for _ in range(a.n):
            stream.synchronize()
            t0 = time.perf_counter()
            cupy.add(small, small, out=small)
            times.append(time.perf_counter() - t0)
    medians["cupy.add (16 floats)"] = statistics.median(times) * 1e6
    print("host us (median, perf_counter, GPU idle): " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
