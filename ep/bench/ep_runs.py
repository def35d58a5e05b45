"""ep's own numbers, through the public MoECommunicator API only.

Sections of one iteration (each after an L2 flush, a device synchronize and the barriers of timing.py):
  A  dispatch -> combine          marks: dispatch, dispatch+combine
  B  combine (A's handle again)   marks: combine           (timed alone, like the dispatch)
  C  (HT) cached dispatch         marks: cached dispatch   (previous_handle = A's handle)
LL then times a CUDA graph of dispatch -> (identity MLP: nothing) -> combine, captured once after
``prepare()`` and one eager dispatch+combine, replayed once per iteration.
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


def make_config(shape: Shape, num_sms: int, dispatch_nsm: int | None, combine_nsm: int | None) -> MoECommunicatorConfig:
    return MoECommunicatorConfig(
        mode=shape.mode, num_experts=shape.experts, hidden_size=shape.hidden, topk=shape.topk,
        max_tokens_per_rank=shape.tokens, num_sms=num_sms,
        overlap=CommOverlapConfig(dispatch_num_sms=dispatch_nsm, combine_num_sms=combine_nsm))


def config_dict(cfg: MoECommunicatorConfig) -> dict:
    d = asdict(cfg)
    d["output_layout"] = cfg.layout.value
    return d


def block_counts(cfg: MoECommunicatorConfig, knobs) -> dict[str, int]:
    """Blocks (= SMs) of the dispatch and combine data kernels: the rule of ep.runtime_base.block_count
    (env knob, else the overlap config, else num_sms), computed from public config and knobs."""
    return {"dispatch": knobs.dispatch_nsm or cfg.overlap.dispatch_num_sms or cfg.num_sms,
            "combine": knobs.combine_nsm or cfg.overlap.combine_num_sms or cfg.num_sms}


def _host(arr) -> np.ndarray:
    """A NumPy copy of a CuPy/NumPy array (bf16 stays uint16 bit patterns)."""
    if type(arr).__module__.startswith("cupy"):
        import cupy
        return cupy.asnumpy(arr)
    return np.array(arr, copy=True)


def run(ctx, shape: Shape, dev_inputs, vol: Volume) -> dict[str, Any]:
    """Time ep on one shape. Returns {"config", "rows", "snapshots", "skipped"}. Collective."""
    cfg = make_config(shape, ctx.args.num_sms, ctx.args.dispatch_nsm, ctx.args.combine_nsm)
    sms = block_counts(cfg, ctx.knobs)
    x, ids, w = dev_inputs
    gpu = ctx.backend == "gpu"
    stream = ctx.stream if gpu else None
    clock, group = ctx.clock, ctx.group
    state: dict[str, Any] = {}
    snaps: dict[str, np.ndarray] = {}
    skipped = []
    comm = MoECommunicator(cfg, group=group, backend=ctx.backend)
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
        if shape.mode == "ll":
            if gpu:
                samples.update(_ll_graph(ctx, comm, dev_inputs, snaps))
            else:
                skipped.append("ll graph replay: GPU only (CUDA graphs); not run on the CPU backend")
        stats = timing.gather_stats(group, samples)
    except BaseException:
        state.clear()      # no close(): it is collective, and the other ranks may be stuck (cli._fail)
        raise
    state.clear()
    comm.close()

    W = group.size
    logical = [vol.logical_bytes(r) for r in range(W)]
    physical = [vol.physical_bytes(r) for r in range(W)]
    both = f"{sms['dispatch']}/{sms['combine']}"
    rows = []
    order = [("dispatch", 1, sms["dispatch"]), ("cached dispatch", 1, sms["dispatch"]), ("combine", 1, sms["combine"]),
             ("dispatch+combine", 2, both), ("graph dispatch+combine", 2, both)]
    for op, factor, sm in order:
        if op in stats:
            rows.append(report.op_row(f"ep {op}", "ep", stats[op], logical, physical, sm, factor))
    return {"config": config_dict(cfg), "sms": sms, "rows": rows, "snapshots": snaps, "skipped": skipped}


def _ll_graph(ctx, comm, dev_inputs, snaps) -> dict[str, list[float]]:
    """Capture dispatch -> combine once into a CUDA graph and time its replays."""
    x, ids, w = dev_inputs
    stream, clock, group = ctx.stream, ctx.clock, ctx.group
    comm.prepare()
    out, handle = comm.dispatch(x, ids, w, stream=stream)    # eager once: owned views exist before capture
    comm.combine(out.tokens, handle, stream=stream)
    stream.synchronize()
    group.barrier()
    captured: dict[str, Any] = {}
    stream.begin_capture()
    try:
        out_g, handle_g = comm.dispatch(x, ids, w, stream=stream)
        captured["y"] = comm.combine(out_g.tokens, handle_g, stream=stream)
        captured["out"] = out_g
    except BaseException:
        try:
            stream.end_capture()         # leave the stream usable; the original error is the one to see
        except Exception:
            pass
        raise
    graph = stream.end_capture()
    graph.upload(stream)

    def sec_graph():
        m0 = clock.mark()
        graph.launch(stream)
        m1 = clock.mark()
        return {"graph dispatch+combine": (m0, m1)}

    def snapshot():
        if ctx.args.validate:
            snaps["graph dispatch"] = _host(captured["out"].tokens)
            snaps["graph counts"] = _host(captured["out"].num_tokens_per_expert)
            snaps["graph combine"] = _host(captured["y"])

    samples = timing.run_sections(clock, group, [sec_graph], ctx.args.warmup, ctx.args.iters, after_last=snapshot)
    captured.clear()
    return samples
