"""ep's own numbers, through the public MoECommunicator API only.

Sections of one iteration (each after an L2 flush, a device synchronize and the barriers of timing.py):
  A  dispatch -> combine          marks: dispatch, dispatch+combine
  B  combine (A's handle again)   marks: combine           (timed alone, like the dispatch)
  C  (HT) cached dispatch         marks: cached dispatch   (previous_handle = A's handle)
Then CUDA graphs, captured once and replayed once per iteration (GPU only): LL times dispatch -> (identity
MLP: nothing) -> combine, captured after ``prepare()`` and one eager dispatch+combine; HT times a cached
dispatch alone and a cached dispatch -> combine (A's handle; an uncached dispatch waits on the host, so it
cannot be captured), and with --worst-case (TOKEN_MAJOR, no host wait) the uncached dispatch alone and
dispatch -> combine too. A graph replay shows the ops without the host's Python in front of the kernels.
The expert MLP is the identity: combine takes the dispatch's ``tokens`` as the expert output.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from .. import MoECommunicator, MoECommunicatorConfig
from ..config import CommOverlapConfig, DispatchLayout
from . import report, timing
from .workload import Shape, Volume


def make_config(shape: Shape, num_sms: int, dispatch_nsm: int | None, combine_nsm: int | None,
                owned_output: bool = False, shared_gpu: bool = False) -> MoECommunicatorConfig:
    ht = shape.mode == "ht"
    layout = {"output_layout": DispatchLayout(shape.layout)} if ht else {}
    return MoECommunicatorConfig(
        mode=shape.mode, num_experts=shape.experts, hidden_size=shape.hidden, topk=shape.topk,
        max_tokens_per_rank=shape.tokens, num_sms=num_sms, owned_output=owned_output and ht, **layout,
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
    cast = _cast(ctx.args.cast) if shape.mode == "ll" else None
    cfg = make_config(shape, ctx.args.num_sms, ctx.args.dispatch_nsm, ctx.args.combine_nsm, ctx.args.owned_output,
                      ctx.shared_gpu)
    x, ids, w, sc = dev_inputs
    worst = shape.worst_case
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
            out, handle = comm.dispatch(x, ids, w, sc, stream=stream, cast=cast, worst_case=worst)
            m1 = clock.mark()
            y = comm.combine(_bf16_like(comm, out.tokens), handle, stream=stream)
            m2 = clock.mark()
            state.update(out=out, handle=handle, y_pipeline=y)
            return {"dispatch": (m0, m1), "dispatch+combine": (m0, m2)}

        def sec_combine():
            m0 = clock.mark()
            y = comm.combine(_bf16_like(comm, state["out"].tokens), state["handle"], stream=stream)
            m1 = clock.mark()
            state["y"] = y
            return {"combine": (m0, m1)}

        def sec_cached():
            m0 = clock.mark()
            out, _ = comm.dispatch(x, ids, w, sc, previous_handle=state["handle"], stream=stream)
            m1 = clock.mark()
            state["cached"] = out
            return {"cached dispatch": (m0, m1)}

        def snapshot():
            if ctx.args.validate:
                snaps["dispatch"] = _host(state["out"].tokens)
                snaps["counts"] = _host(state["out"].num_tokens_per_expert)
                if state["out"].scales is not None:
                    snaps["dispatch scales"] = _host(state["out"].scales)
                snaps["combine"] = _host(state["y"])
                snaps["combine (after dispatch)"] = _host(state["y_pipeline"])
                if "cached" in state:
                    snaps["cached dispatch"] = _host(state["cached"].tokens)
                    snaps["cached counts"] = _host(state["cached"].num_tokens_per_expert)

        sections = [sec_dispatch_combine, sec_combine] + ([sec_cached] if shape.mode == "ht" else [])
        samples = timing.run_sections(clock, group, sections, ctx.args.warmup, ctx.args.iters, after_last=snapshot)
        if gpu:
            graph_runs = _ll_graphs if shape.mode == "ll" else _ht_graphs
            samples.update(graph_runs(ctx, comm, dev_inputs, state, snaps, cast))
        else:
            skipped.append(f"{shape.mode} graph replay: GPU only (CUDA graphs); not run on the CPU backend")
        stats = timing.gather_stats(group, samples)
        host = _host_calls(comm, dev_inputs, state, stream, cast, worst)
        host_stats = timing.gather_stats(group, timing.host_times(clock, group, host, ctx.args.warmup,
                                                                  ctx.args.iters))
    except BaseException:
        state.clear()      # no close(): it is collective, and the other ranks may be stuck (cli._fail)
        raise
    state.clear()
    comm.close()

    logical, physical = vol.logical_per_rank(), vol.physical_per_rank()
    both = f"{sms['dispatch']}/{sms['combine']}"
    rows = []
    order = [("dispatch", 1, sms["dispatch"]), ("cached dispatch", 1, sms["dispatch"]), ("combine", 1, sms["combine"]),
             ("dispatch+combine", 2, both), ("graph dispatch", 1, sms["dispatch"]), ("graph combine", 1, sms["combine"]),
             ("graph dispatch+combine", 2, both), ("graph cached dispatch", 1, sms["dispatch"]),
             ("graph cached dispatch+combine", 2, both)]
    for op, factor, sm in order:
        if op in stats:
            rows.append(report.op_row(f"ep {op}", "ep", stats[op], logical, physical, sm, factor))
    for op in host_stats:
        rows.append(report.op_row(f"host {op}", "ep", host_stats[op], None, None, "-",
                                  note="host us: perf_counter around the call, GPU idle"))
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


def _cast(name: str | None):
    from ..config import Fp8Cast
    return {None: None, "bf16": None, "fp8": Fp8Cast(), "fp8_pow2": Fp8Cast(round_scale=True),
            "fp8_ue8m0": Fp8Cast(ue8m0=True)}[name]


def _host_calls(comm, dev_inputs, state, stream, cast, worst=False) -> dict:
    """The calls whose host time is measured: an eager dispatch, a combine of section A's handle (identity MLP,
    bf16), and (HT) a cached dispatch."""
    x, ids, w, sc = dev_inputs
    calls = {"dispatch": lambda: comm.dispatch(x, ids, w, sc, stream=stream, cast=cast, worst_case=worst)}
    if comm.config.mode == "ht":
        calls["cached dispatch"] = lambda: comm.dispatch(x, ids, w, sc, previous_handle=state["handle"],
                                                         stream=stream)
        calls["combine"] = lambda: comm.combine(_bf16_like(comm, state["out"].tokens), state["handle"], stream=stream)
    else:
        def dispatch_then_time_combine():
            out, handle = comm.dispatch(x, ids, w, stream=stream, cast=cast)
            state["host_ll"] = (out, handle)
        calls = {"dispatch": dispatch_then_time_combine,
                 "combine": lambda: comm.combine(_bf16_like(comm, state["host_ll"][0].tokens), state["host_ll"][1],
                                                 stream=stream)}
    return calls


_BF16_Y: dict = {}


def _bf16_like(comm, tokens):
    """The expert output combine takes: the tokens themselves (bf16), or bf16 zeros of their rows after an FP8
    cast or a payload dispatch."""
    if str(tokens.dtype) in ("uint16", "bfloat16", "torch.bfloat16"):
        return tokens
    shape = tuple(tokens.shape[:-1]) + (comm.config.hidden_size,)
    key = (id(comm), shape, type(tokens).__module__)
    if key not in _BF16_Y:
        module = type(tokens).__module__
        if module.startswith("torch"):
            import torch
            _BF16_Y[key] = torch.zeros(shape, dtype=torch.bfloat16, device=tokens.device)
        elif module.startswith("cupy"):
            import cupy
            _BF16_Y[key] = cupy.zeros(shape, np.uint16)
        else:
            _BF16_Y[key] = np.zeros(shape, np.uint16)
    return _BF16_Y[key]


def _dispatch_then_combine(comm, dev_inputs, stream, previous_handle=None, cast=None, worst=False):
    """A graph body: dispatch (cached with ``previous_handle``; worst_case with ``worst``), the identity MLP,
    combine. Returns (out, y)."""
    x, ids, w, sc = dev_inputs
    out, handle = comm.dispatch(x, ids, w, sc, previous_handle=previous_handle, stream=stream, cast=cast,
                                worst_case=worst)
    return out, comm.combine(_bf16_like(comm, out.tokens), handle, stream=stream)


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


def _ll_graphs(ctx, comm, dev_inputs, state, snaps, cast=None) -> dict[str, list[float]]:
    """Capture dispatch -> combine once into a CUDA graph and time its replays; a graph of the dispatch alone
    and of the combine alone (of the graph's own dispatch) too."""
    stream = ctx.stream
    comm.prepare()
    for _ in range(2):   # eager twice: the owned views of both output halves exist before capture
        _dispatch_then_combine(comm, dev_inputs, stream, cast=cast)
    stream.synchronize()
    ctx.group.barrier()

    graph, (out_g, y_g) = _capture(stream, lambda: _dispatch_then_combine(comm, dev_inputs, stream, cast=cast))
    x, ids, w, _ = dev_inputs
    g_disp, (out_d, handle_d) = _capture(stream, lambda: comm.dispatch(x, ids, w, stream=stream, cast=cast))
    g_comb, _ = _capture(stream, lambda: comm.combine(_bf16_like(comm, out_d.tokens), handle_d, stream=stream))

    def snapshot():
        if ctx.args.validate:
            snaps["graph dispatch"] = _host(out_g.tokens)
            snaps["graph counts"] = _host(out_g.num_tokens_per_expert)
            snaps["graph combine"] = _host(y_g)

    return _time_graphs(ctx, {"graph dispatch+combine": graph, "graph dispatch": g_disp, "graph combine": g_comb},
                        snapshot)


def _ht_graphs(ctx, comm, dev_inputs, state, snaps, cast=None) -> dict[str, list[float]]:
    """Capture a cached dispatch (section A's handle) and a cached dispatch -> combine; time their replays."""
    x, ids, w, sc = dev_inputs
    stream, handle = ctx.stream, state["handle"]
    stream.synchronize()
    ctx.group.barrier()
    g1, (out1, _) = _capture(stream, lambda: comm.dispatch(x, ids, w, sc, previous_handle=handle, stream=stream))
    g2, (out2, y2) = _capture(stream, lambda: _dispatch_then_combine(comm, dev_inputs, stream, handle))
    graphs = {"graph cached dispatch": g1, "graph cached dispatch+combine": g2}
    worst = ctx.args.worst_case
    if worst:   # the uncached worst-case dispatch waits on nothing: it is captured whole
        g3, (out3, _) = _capture(stream, lambda: comm.dispatch(x, ids, w, sc, stream=stream, worst_case=True))
        g4, (out4, y4) = _capture(stream, lambda: _dispatch_then_combine(comm, dev_inputs, stream, worst=True))
        graphs.update({"graph dispatch": g3, "graph dispatch+combine": g4})

    def snapshot():
        if ctx.args.validate:
            snaps["graph cached dispatch"] = _host(out1.tokens)
            snaps["graph cached counts"] = _host(out1.num_tokens_per_expert)
            snaps["graph cached dispatch, second graph"] = _host(out2.tokens)
            snaps["graph combine"] = _host(y2)
            if worst:
                snaps["graph dispatch"] = _host(out3.tokens)
                snaps["graph counts"] = _host(out3.num_tokens_per_expert)
                snaps["graph dispatch, second graph"] = _host(out4.tokens)
                snaps["graph dispatch+combine"] = _host(y4)

    return _time_graphs(ctx, graphs, snapshot)
