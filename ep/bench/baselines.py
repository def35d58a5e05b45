"""The GPU-only baselines of an HT case (same process, run, routing and shapes as ep's numbers):
the link ceiling (ceiling.py) and the NCCL all-to-all dispatcher (nccl_a2a.py), plus the ratio lines."""
from __future__ import annotations

from . import ceiling, nccl_a2a, report, timing
from .workload import Shape, Volume


def run(ctx, shape: Shape, dev_inputs, vol: Volume, snaps: dict) -> dict:
    """{"ceiling": ..., "nccl": ...}; each is a result dict or {"skipped": reason}. Collective."""
    out = {"ceiling": ceiling.run(ctx, vol)}
    out["nccl"] = run_nccl(ctx, shape, dev_inputs, vol, snaps)
    return out


def run_nccl(ctx, shape: Shape, dev_inputs, vol: Volume, snaps: dict) -> dict:
    if not all(ctx.group.allgather(nccl_a2a.torch_usable(), "nccl baseline")):
        return {"skipped": "the NCCL dispatcher baseline needs torch with CUDA and NCCL on every rank"}
    ctx.torch_pg_created |= nccl_a2a.ensure_torch_process_group(ctx)
    clock, group = ctx.clock, ctx.group
    disp = nccl_a2a.TorchA2A(ctx, shape, dev_inputs)
    state = {}
    try:
        # Untimed first call: NCCL connects its peers on first use.
        _, st = disp.dispatch(clock.mark)
        disp.combine(st, st["tokens"], clock.mark)
        clock.synchronize()
        group.barrier()

        def sec_dispatch_combine():
            md, st = disp.dispatch(clock.mark)
            mc, _ = disp.combine(st, st["tokens"], clock.mark)    # identity MLP
            state["st"] = st
            marks = {"dispatch": (md[0], md[-1]), "dispatch+combine": (md[0], mc[-1])}
            for i, stage in enumerate(nccl_a2a.DISPATCH_STAGES):
                marks[f"dispatch: {stage}"] = (md[i], md[i + 1])
            return marks

        def sec_combine():
            st = state["st"]
            mc, _ = disp.combine(st, st["tokens"], clock.mark)
            marks = {"combine": (mc[0], mc[-1])}
            for i, stage in enumerate(nccl_a2a.COMBINE_STAGES):
                marks[f"combine: {stage}"] = (mc[i], mc[i + 1])
            return marks

        def snapshot():
            if ctx.args.validate:
                snaps["nccl dispatch"], snaps["nccl counts"] = disp.host_tokens(state["st"])

        samples = timing.run_sections(clock, group, [sec_dispatch_combine, sec_combine], ctx.args.warmup,
                                      ctx.args.iters, after_last=snapshot)
        stats = timing.gather_stats(group, samples)
    except BaseException:
        state.clear()      # no communicator destroy on the error path (cli._fail ends the job)
        raise
    state.clear()
    disp.close()
    logical, physical = vol.logical_per_rank(), vol.physical_per_rank()
    rows = []
    for op, factor in (("dispatch", 1), ("combine", 1), ("dispatch+combine", 2)):
        rows.append(report.op_row(f"nccl {op}", "nccl", stats[op], logical, physical, "nccl", factor))
        if op == "dispatch+combine":
            continue
        stages = nccl_a2a.DISPATCH_STAGES if op == "dispatch" else nccl_a2a.COMBINE_STAGES
        for stage in stages:
            moves = stage == "tokens"
            rows.append(report.op_row(f"  nccl {op}: {stage}", "nccl", stats[f"{op}: {stage}"],
                                      logical if moves else None, physical if moves else None, "nccl"))
    return {"impl": disp.label, "rows": rows}
