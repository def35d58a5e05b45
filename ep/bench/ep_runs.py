"""ep's own numbers, through the public MoECommunicator API only.

Sections of one iteration (each after an L2 flush, a device synchronize and the barriers of timing.py):
  A  dispatch -> combine          marks: dispatch, dispatch+combine
  B  combine (A's handle again)   marks: combine           (timed alone, like the dispatch)
  C  (HT) cached dispatch         marks: cached dispatch   (previous_handle = A's handle)
Then CUDA graphs, captured once and replayed once per iteration (GPU only): LL times dispatch -> (identity
MLP: nothing) -> combine, captured after ``prepare()`` and one eager dispatch+combine; HT times a cached
dispatch alone and a cached dispatch -> combine (A's handle; an uncached dispatch waits on the host, so it
cannot be captured). A graph replay shows the ops without the host's Python in front of the kernels.
The expert MLP is the identity: combine takes the dispatch's ``tokens`` as the expert output.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from .. import MoECommunicator, MoECommunicatorConfig
from ..config import CommOverlapConfig
from . import report, timing
from .workload import Shape, Volume


def make_config(shape: Shape, num_sms: int, dispatch_nsm: int | None, combine_nsm: int | None,
                owned_output: bool = False, shared_gpu: bool = False) -> MoECommunicatorConfig:
    return MoECommunicatorConfig(
        mode=shape.mode, num_experts=shape.experts, hidden_size=shape.hidden, topk=shape.topk,
        max_tokens_per_rank=shape.tokens, num_sms=num_sms, owned_output=owned_output and shape.mode == "ht",
        overlap=CommOverlapConfig(dispatch_num_sms=dispatch_nsm, combine_num_sms=combine_nsm), shared_gpu=shared_gpu)


def config_dict(comm: MoECommunicator) -> dict:
    """The communicator's effective config (env overrides applied) and its resolved tuning."""
    cfg = comm.effective_config
    d = asdict(cfg)
    d["output_layout"] = cfg.layout.value
    d["tuning"] = comm.tuning.describe()
    return d


def block_counts(comm: MoECommunicator) -> dict[str, int]:
    """Blocks (= SMs) of the dispatch and combine data kernels, as the communicator resolved them."""
    plan = comm.tuning.ht if comm.tuning.mode == "ht" else comm.tuning.ll
    return {"dispatch": plan.dispatch_blocks, "combine": plan.combine_blocks}


def _host(arr) -> np.ndarray:
    """A NumPy copy of a CuPy/NumPy array (bf16 stays uint16 bit patterns)."""
    if type(arr).__module__.startswith("cupy"):
        import cupy
        return cupy.asnumpy(arr)
    return np.array(arr, copy=True)


def run(ctx, shape: Shape, dev_inputs, vol: Volume) -> dict[str, Any]:
    """Time ep on one shape. Returns {"config", "rows", "snapshots", "skipped"}. Collective."""
    cfg = make_config(shape, ctx.args.num_sms, ctx.args.dispatch_nsm, ctx.args.combine_nsm, ctx.args.owned_output,
                      ctx.shared_gpu)
    x, ids, w = dev_inputs
    gpu = ctx.backend == "gpu"
    stream = ctx.stream if gpu else None
    clock, group = ctx.clock, ctx.group
    state: dict[str, Any] = {}
    snaps: dict[str, np.ndarray] = {}
    skipped = []
    comm = MoECommunicator(cfg, group=group, backend=ctx.backend)
    sms, config = block_counts(comm), config_dict(comm)
    try:
        def sec_dispatch_combine():
            m0 = clock.mark()
            out, handle = comm.dispatch(x, ids, w, stream=stream)
            m1 = clock.mark()
            y = comm.combine(out.tokens, handle, stream=stream)
            m2 = clock.mark()
            state.update(out=out, handle=handle, y_pipeline=y)
            return {"dispatch": (m0, m1), "dispatch+combine": (m0, m2)}

        def sec_combine():
            m0 = clock.mark()
            y = comm.combine(state["out"].tokens, state["handle"], stream=stream)
            m1 = clock.mark()
            state["y"] = y
            return {"combine": (m0, m1)}

        def sec_cached():
            m0 = clock.mark()
            out, _ = comm.dispatch(x, ids, w, previous_handle=state["handle"], stream=stream)
            m1 = clock.mark()
            state["cached"] = out
            return {"cached dispatch": (m0, m1)}

        def snapshot():
            if ctx.args.validate:
                snaps["dispatch"] = _host(state["out"].tokens)
                snaps["counts"] = _host(state["out"].num_tokens_per_expert)
                snaps["combine"] = _host(state["y"])
                snaps["combine (after dispatch)"] = _host(state["y_pipeline"])
                if "cached" in state:
                    snaps["cached dispatch"] = _host(state["cached"].tokens)
                    snaps["cached counts"] = _host(state["cached"].num_tokens_per_expert)

        sections = [sec_dispatch_combine, sec_combine] + ([sec_cached] if shape.mode == "ht" else [])
        samples = timing.run_sections(clock, group, sections, ctx.args.warmup, ctx.args.iters, after_last=snapshot)
        if gpu:
            graph_runs = _ll_graphs if shape.mode == "ll" else _ht_graphs
            samples.update(graph_runs(ctx, comm, dev_inputs, state, snaps))
        else:
            skipped.append(f"{shape.mode} graph replay: GPU only (CUDA graphs); not run on the CPU backend")
        stats = timing.gather_stats(group, samples)
    except BaseException:
        state.clear()      # no close(): it is collective, and the other ranks may be stuck (cli._fail)
        raise
    state.clear()
    comm.close()

    logical, physical = vol.logical_per_rank(), vol.physical_per_rank()
    both = f"{sms['dispatch']}/{sms['combine']}"
    rows = []
    order = [("dispatch", 1, sms["dispatch"]), ("cached dispatch", 1, sms["dispatch"]), ("combine", 1, sms["combine"]),
             ("dispatch+combine", 2, both), ("graph dispatch+combine", 2, both),
             ("graph cached dispatch", 1, sms["dispatch"]), ("graph cached dispatch+combine", 2, both)]
    for op, factor, sm in order:
        if op in stats:
            rows.append(report.op_row(f"ep {op}", "ep", stats[op], logical, physical, sm, factor))
    return {"config": config, "sms": sms, "rows": rows, "snapshots": snaps, "skipped": skipped}


def _capture(stream, body):
    """(graph, what body returned): body's launches on ``stream`` captured into a CUDA graph."""
    stream.begin_capture()
    try:
        result = body()
    except BaseException:
        try:
            stream.end_capture()         # leave the stream usable; the original error is the one to see
        except Exception:
            pass
        raise
    graph = stream.end_capture()
    graph.upload(stream)
    return graph, result


def _dispatch_then_combine(comm, dev_inputs, stream, previous_handle=None):
    """A graph body: dispatch (cached with ``previous_handle``), the identity MLP, combine. Returns (out, y)."""
    x, ids, w = dev_inputs
    out, handle = comm.dispatch(x, ids, w, previous_handle=previous_handle, stream=stream)
    return out, comm.combine(out.tokens, handle, stream=stream)


def _time_graphs(ctx, graphs: dict, snapshot) -> dict[str, list[float]]:
    """Replay each named graph once per iteration (one section each) and time it."""
    stream, clock = ctx.stream, ctx.clock

    def section(name, graph):
        def run():
            m0 = clock.mark()
            graph.launch(stream)
            m1 = clock.mark()
            return {name: (m0, m1)}
        return run

    sections = [section(name, graph) for name, graph in graphs.items()]
    return timing.run_sections(clock, ctx.group, sections, ctx.args.warmup, ctx.args.iters, after_last=snapshot)


def _ll_graphs(ctx, comm, dev_inputs, state, snaps) -> dict[str, list[float]]:
    """Capture dispatch -> combine once into a CUDA graph and time its replays."""
    stream = ctx.stream
    comm.prepare()
    _dispatch_then_combine(comm, dev_inputs, stream)    # eager once: owned views exist before capture
    stream.synchronize()
    ctx.group.barrier()

    graph, (out_g, y_g) = _capture(stream, lambda: _dispatch_then_combine(comm, dev_inputs, stream))

    def snapshot():
        if ctx.args.validate:
            snaps["graph dispatch"] = _host(out_g.tokens)
            snaps["graph counts"] = _host(out_g.num_tokens_per_expert)
            snaps["graph combine"] = _host(y_g)

    return _time_graphs(ctx, {"graph dispatch+combine": graph}, snapshot)


def _ht_graphs(ctx, comm, dev_inputs, state, snaps) -> dict[str, list[float]]:
    """Capture a cached dispatch (section A's handle) and a cached dispatch -> combine; time their replays."""
    x, ids, w = dev_inputs
    stream, handle = ctx.stream, state["handle"]
    stream.synchronize()
    ctx.group.barrier()
    g1, (out1, _) = _capture(stream, lambda: comm.dispatch(x, ids, w, previous_handle=handle, stream=stream))
    g2, (out2, y2) = _capture(stream, lambda: _dispatch_then_combine(comm, dev_inputs, stream, handle))

    def snapshot():
        if ctx.args.validate:
            snaps["graph cached dispatch"] = _host(out1.tokens)
            snaps["graph cached counts"] = _host(out1.num_tokens_per_expert)
            snaps["graph cached dispatch, second graph"] = _host(out2.tokens)
            snaps["graph combine"] = _host(y2)

    return _time_graphs(ctx, {"graph cached dispatch": g1, "graph cached dispatch+combine": g2}, snapshot)
