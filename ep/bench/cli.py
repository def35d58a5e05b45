"""Command line of ``python -m ep.bench``: arguments, the job's ranks, the cases, the output.

Launch one process per GPU: ``mpirun -np W python -m ep.bench [options]`` (or torchrun). Rank 0 prints
the tables and writes --json / --plot. See ``--help``.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .. import __version__, bootstrap, envs
from ..config import DispatchLayout
from ..errors import ConfigError
from . import ep_runs, procenv, report, timing, validate, workload

SWEEPABLE = {"num-sms": "num_sms", "tokens": "tokens", "experts": "experts", "dispatch-nsm": "dispatch_nsm",
             "combine-nsm": "combine_nsm"}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m ep.bench",
        description="Benchmark ep's dispatch/combine (HT and LL) against the link ceiling and an NCCL all-to-all "
                    "dispatcher. Launch one process per GPU: mpirun -np W python -m ep.bench ...")
    p.add_argument("--mode", choices=("ht", "ll", "all"), default="all", help="workloads to run (default all)")
    p.add_argument("--tokens", type=int, help="tokens per rank T (default HT 4096, LL 128)")
    p.add_argument("--hidden", type=int, help="hidden size H (default 7168)")
    p.add_argument("--experts", type=int, help="experts E (default 256)")
    p.add_argument("--topk", type=int, help="top-k K (default 8)")
    p.add_argument("--num-sms", type=int, default=None,
                   help="MoECommunicatorConfig.num_sms (default: the config's, 24 for HT and every SM for LL)")
    p.add_argument("--cast", choices=("bf16", "fp8", "fp8_pow2", "fp8_ue8m0"), default="bf16",
                   help="LL: dispatch bf16, or cast to e4m3 in the kernel (fp32 / power-of-two / UE8M0 scales)")
    p.add_argument("--dtype", choices=("bf16",) + tuple(workload.PAYLOADS), default="bf16",
                   help="HT: dispatch bf16 rows, or a caller-quantized payload with its scales: fp8 (e4m3 + float32 "
                        "per 128), mxfp8 (e4m3 + E8M0 per 32), nvfp4 (packed E2M1 + E4M3 per 16); combine stays bf16")
    p.add_argument("--dispatch-nsm", type=int, help="CommOverlapConfig.dispatch_num_sms")
    p.add_argument("--combine-nsm", type=int, help="CommOverlapConfig.combine_num_sms")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations (default 20)")
    p.add_argument("--routing", choices=("uniform", "skewed"), default="uniform")
    p.add_argument("--drop", type=float, default=0.0, help="fraction of top-k slots set to -1 (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validate", action="store_true", help="check the timed outputs bit for bit against ep.reference")
    p.add_argument("--json", metavar="PATH", help="write every figure and the environment as JSON (rank 0)")
    p.add_argument("--plot", metavar="PATH.png", help="plot GB/s against the swept value (needs matplotlib)")
    p.add_argument("--sweep", metavar="NAME=V1,V2,...", help=f"sweep one of {', '.join(SWEEPABLE)}")
    p.add_argument("--backend", choices=("gpu", "cpu"),
                   help="gpu (CUDA events) or cpu (NumPy reference over MPI, host wall times, no baselines); "
                        "default: EP_BACKEND, else gpu when CuPy sees a device")
    p.add_argument("--allow-shared-gpu", action="store_true",
                   help="run even when ranks share a GPU (more ranks than GPUs): the figures then prove that the code "
                        "runs and is bit-exact, never its speed, and every row says so")
    p.add_argument("--no-baselines", action="store_true", help="time ep only")
    p.add_argument("--layout", choices=("flat", "expert_major", "token_major"), default="flat",
                   help="HT output layout (default flat); token_major is DeepEP's (one row per token and rank)")
    p.add_argument("--worst-case", action="store_true",
                   help="HT token_major: dispatch(worst_case=True): no host wait, W * T_max output rows; the uncached "
                        "dispatch and its combine are also timed as CUDA-graph replays")
    p.add_argument("--owned-output", action="store_true",
                   help="HT: MoECommunicatorConfig(owned_output=True): dispatch writes into a communicator-owned output "
                        "(every section's tokens then view that one buffer)")
    args = p.parse_args(argv)
    for name in ("tokens", "hidden", "experts", "topk", "num_sms", "dispatch_nsm", "combine_nsm", "iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.worst_case and args.layout != "token_major":
        p.error("--worst-case needs --layout token_major")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if not 0.0 <= args.drop < 1.0:
        p.error(f"--drop must be in [0, 1), got {args.drop}")
    args.sweep_spec = None
    if args.sweep:
        name, _, values = args.sweep.partition("=")
        if name not in SWEEPABLE or not values:
            p.error(f"--sweep: expected NAME=V1,V2,... with NAME in {', '.join(SWEEPABLE)}, got {args.sweep!r}")
        try:
            vals = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            p.error(f"--sweep: values must be integers, got {values!r}")
        if not vals or min(vals) < 1:
            p.error(f"--sweep: values must be positive integers, got {values!r}")
        args.sweep_spec = (name, vals)
    if args.plot and not report.plot_available():
        p.error("--plot needs matplotlib, which is not installed (pip install matplotlib, or the 'plot' extra)")
    return args


@dataclass
class Context:
    args: Any
    group: Any
    backend: str
    knobs: Any
    device: int = -1
    stream: Any = None
    clock: Any = None
    torch_pg_created: bool = False
    shared_gpu: bool = False


def _cuda_devices() -> int:
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def _choose_backend(arg: str | None, knobs) -> str:
    if arg:
        return arg
    if knobs.backend != "auto":
        return knobs.backend
    return "gpu" if _cuda_devices() > 0 else "cpu"


def _make_group(backend: str):
    """The job's ranks: torch.distributed under torchrun, else MPI (mpirun, or one process)."""
    if not procenv.launched_by_torchrun():
        return bootstrap.make_group(None), False
    import torch.distributed as dist
    if not dist.is_initialized():
        if backend == "gpu":
            import torch
            _, _, local = procenv.torchrun_ranks()
            torch.cuda.set_device(local % torch.cuda.device_count())
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return bootstrap.make_group(dist.group.WORLD), True


def _shape(mode: str, args, sweep_name: str | None, value: int | None) -> workload.Shape:
    base = dict(workload.HT_DEFAULTS if mode == "ht" else workload.LL_DEFAULTS)
    for key in base:
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if sweep_name in ("tokens", "experts"):
        base[sweep_name] = value
    ht = mode == "ht"
    return workload.Shape(mode=mode, dtype=args.dtype if ht else "bf16", layout=args.layout if ht else "expert_major",
                          worst_case=args.worst_case and ht, **base)


def _environment(ctx: Context) -> dict:
    env = {"world_size": ctx.group.size, "backend": ctx.backend, "timing": timing.HostClock.kind,
           "launcher": "torchrun" if procenv.launched_by_torchrun() else "mpi", "hostname": socket.gethostname(),
           "python": platform.python_version(), "numpy": np.__version__, "ep_version": __version__,
           "knobs": ctx.knobs.as_dict(), "gpu_name": None, "driver_version": None, "cupy_version": None,
           "nccl_nvls_enable": procenv.get("NCCL_NVLS_ENABLE"), "shared_gpu": ctx.shared_gpu}
    if ctx.backend == "gpu":
        from . import gpu
        env.update(gpu.environment(ctx.device))
        env["timing"] = timing.GpuClock.kind
        env["devices"] = ctx.group.allgather(ctx.device)
        env["peer_access"] = gpu.peer_access_matrix(ctx.group, ctx.device)
    return env


def _run_case(ctx: Context, shape: workload.Shape, sweep, baseline_cache: dict) -> dict:
    args, group = ctx.args, ctx.group
    inputs = workload.make_inputs(shape, args.routing, args.drop, args.seed, group.rank)
    vol = workload.volume(group, inputs.topk_ids, shape)
    if ctx.backend == "gpu":
        from . import gpu
        dev_inputs = gpu.to_device(inputs, ctx.stream)
    else:
        dev_inputs = (inputs.x, inputs.topk_ids, inputs.weights, inputs.scales)
    res = ep_runs.run(ctx, shape, dev_inputs, vol)
    rows, skipped, snaps = res["rows"], list(res["skipped"]), res["snapshots"]
    base: dict = {}
    if shape.mode == "ht":
        if ctx.backend != "gpu":
            reason = "GPU-only baselines; backend cpu"
            base = {"ceiling": {"skipped": reason}, "nccl": {"skipped": reason}}
        elif ctx.shared_gpu:
            reason = "ranks share a GPU (NCCL refuses two ranks on one GPU; a ceiling would measure the sharing)"
            base = {"ceiling": {"skipped": reason}, "nccl": {"skipped": reason}}
        elif args.no_baselines:
            base = {"ceiling": {"skipped": "--no-baselines"}, "nccl": {"skipped": "--no-baselines"}}
        elif shape.dtype != "bf16":
            reason = f"--dtype {shape.dtype}: the baselines move bf16 rows"
            base = {"ceiling": {"skipped": reason}, "nccl": {"skipped": reason}}
        else:
            key = (shape, args.routing, args.drop, args.seed)
            if key in baseline_cache:
                base = {k: dict(v, reused_from_earlier_case=True) for k, v in baseline_cache[key].items()}
            else:
                from . import baselines
                base = baselines.run(ctx, shape, dev_inputs, vol, snaps)
                baseline_cache[key] = base
        ceil = base["ceiling"]
        for row in ceil.get("family_best", []):
            rows.append(dict(row, note=row["note"] + ("  <- best" if row is ceil.get("best") else "")))
        rows.extend(base["nccl"].get("rows", []))
    if ctx.shared_gpu:
        for row in rows:
            row["note"] = "shared GPU: not a speed figure" + (f"; {row['note']}" if row.get("note") else "")
    case = {
        "mode": shape.mode, "shape": asdict(shape), "routing": args.routing, "drop": args.drop, "seed": args.seed,
        "sweep": None if sweep is None else {"name": sweep[0], "value": sweep[1]},
        "config": res["config"], "sms": res["sms"], "bytes": vol.as_dict(),
        "timing": {"method": ctx.clock.kind, "warmup": args.warmup, "iters": args.iters,
                   "l2_flush_bytes": timing.L2_FLUSH_BYTES if ctx.backend == "gpu" else 0,
                   "barrier": "device synchronize + MPI barrier" + (" + device barrier kernel" if ctx.backend == "gpu" else ""),
                   "cross_rank": "median = max over ranks of each rank's median; rank-min = min over ranks"},
        "rows": rows, "baselines": {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in base.items()},
        "ratios": report.ratios(rows, base), "skipped": skipped, "validation": {"checked": False, "problems": []},
    }
    if args.validate:
        from .ep_runs import _cast
        ref, ref_combine = validate.reference_outputs(group, shape, inputs,
                                                      _cast(args.cast) if shape.mode == "ll" else None)
        flat = ref if ref.layout is DispatchLayout.FLAT or "nccl dispatch" not in snaps else \
            validate.flat_reference(group, shape, inputs)
        problems = validate.check_ep(snaps, ref, ref_combine, shape.mode) + validate.check_nccl(snaps, flat)
        everyone = group.allgather(problems)
        case["validation"] = {"checked": True,
                              "problems": [f"rank {r}: {p}" for r, ps in enumerate(everyone) for p in ps]}
    del dev_inputs
    if ctx.backend == "gpu":
        import cupy
        ctx.stream.synchronize()
        cupy.get_default_memory_pool().free_all_blocks()
        if "torch" in sys.modules and ctx.torch_pg_created:
            sys.modules["torch"].cuda.empty_cache()
    return case


def _run(ctx: Context) -> int:
    args, group = ctx.args, ctx.group
    rank0 = group.rank == 0
    modes = ("ht", "ll") if args.mode == "all" else (args.mode,)
    sweep_name, values = args.sweep_spec if args.sweep_spec else (None, [None])
    cases, cache = [], {}
    doc = {"schema": "ep.bench/1", "environment": _environment(ctx),
           "args": {k: v for k, v in vars(args).items() if k != "sweep_spec"}, "cases": cases}
    if rank0:
        env = doc["environment"]
        print(f"ep.bench: W={group.size} backend={ctx.backend} ({env['timing']})"
              + (f" GPU={env['gpu_name']} driver={env['driver_version']} cupy={env['cupy_version']}"
                 if ctx.backend == "gpu" else "  [CPU backend: host wall times; GPU-only baselines skipped]")
              + ("  [SHARED GPU: ranks time-slice one GPU; these times are not speed figures]"
                 if ctx.shared_gpu else ""), flush=True)
    start = time.monotonic()
    for i, value in enumerate(values):
        for mode in modes:
            if sweep_name and rank0:
                print(f"[sweep {i + 1}/{len(values)}] {sweep_name}={value} mode={mode} "
                      f"({time.monotonic() - start:.0f} s elapsed)", flush=True)
            if sweep_name in ("num-sms", "dispatch-nsm", "combine-nsm"):
                setattr(ctx.args, SWEEPABLE[sweep_name], value)
            shape = _shape(mode, args, sweep_name, value)
            case = _run_case(ctx, shape, None if sweep_name is None else (sweep_name, value), cache)
            cases.append(case)
            if rank0:
                print("\n" + report.format_case(case, group.size), flush=True)
    problems = [p for case in cases for p in case["validation"]["problems"]]
    doc["validation"] = {"requested": bool(args.validate), "passed": (not problems) if args.validate else None,
                         "problems": problems}
    if rank0:
        if args.json:
            report.write_json(args.json, doc)
            print(f"wrote {args.json}")
        if args.plot:
            report.plot(args.plot, doc)
            print(f"wrote {args.plot}")
        for p in problems:
            print(f"VALIDATION FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


def _fail(ctx: Context, exc: Exception) -> int:
    """One rank failed. At one rank, report and return (ConfigError: a usage problem, exit 2) or re-raise.
    With several ranks, take the whole job down at once: the other ranks may be waiting in a collective, so
    no collective clean-up is attempted (the process exits)."""
    group = ctx.group
    usage = isinstance(exc, ConfigError)
    if group.size == 1:
        if usage:
            print(f"ep.bench: {exc}", file=sys.stderr)
            return 2
        raise exc
    detail = f"{exc}\n" if usage else traceback.format_exc()
    sys.stderr.write(f"[rank {group.rank}] ep.bench failed: {detail}")
    sys.stderr.flush()
    comm = getattr(group, "comm", None)
    if comm is not None:
        comm.Abort(2 if usage else 1)
    os._exit(2 if usage else 1)     # torchrun: its agent stops the other workers


SHARED_GPU_REFUSAL = ("{ranks} ranks share {gpus} GPU(s) on this node: ranks on one GPU run by time-slicing, so "
                      "their times measure the sharing, not ep. Run one rank per GPU, or pass --allow-shared-gpu to run "
                      "anyway (correctness and --validate only; every row is then marked 'shared GPU').")


def _setup(ctx: Context) -> None:
    if ctx.backend == "gpu":
        import cupy
        from . import gpu
        gpus = gpu.visible_gpus()
        if ctx.group.local_size > gpus:
            if not ctx.args.allow_shared_gpu:
                raise ConfigError(SHARED_GPU_REFUSAL.format(ranks=ctx.group.local_size, gpus=gpus))
            ctx.shared_gpu = True
        ctx.device = bootstrap.bind_device(ctx.group, ctx.shared_gpu)
        ctx.stream = cupy.cuda.Stream(non_blocking=True)
        ctx.clock = timing.GpuClock(ctx.stream, ctx.group, gpu.DeviceBarrier(ctx.group))
    else:
        ctx.clock = timing.HostClock()


def _teardown(ctx: Context) -> None:
    """Collective: only on the success path (see _fail)."""
    if ctx.clock is not None:
        ctx.clock.close()
    if ctx.torch_pg_created:
        import torch.distributed as dist
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        knobs = envs.read()
        backend = _choose_backend(args.backend, knobs)
    except ConfigError as exc:
        print(f"ep.bench: {exc}", file=sys.stderr)
        return 2
    if backend == "gpu":
        if _cuda_devices() < 1:
            print("ep.bench: --backend gpu, but no CUDA GPU is visible (CuPy sees none); run on a GPU machine, or "
                  "pass --backend cpu with tiny shapes to exercise the code path", file=sys.stderr)
            return 2
        procenv.nccl_setup()
    elif args.tokens is None and args.hidden is None:
        print("ep.bench: CPU backend with the full default shapes is slow; pass e.g. --tokens 16 --hidden 64",
              file=sys.stderr)
    group, _ = _make_group(backend)
    ctx = Context(args=args, group=group, backend=backend, knobs=knobs)
    try:
        _setup(ctx)
        rc = _run(ctx)
    except Exception as exc:
        return _fail(ctx, exc)
    _teardown(ctx)
    return rc
