"""Input checks of dispatch and combine, and the abort codes that tell peers which check failed.

Every check runs before anything is launched and raises ValueError / TypeError (CapacityError,
InvalidStateError) naming the argument. The communicator then shares the outcome with every peer in the
op's first rendezvous, the op gate (ep/gate.py), carrying this rank's abort code (0 = passed), and
:func:`settle` turns everyone's outcome into the same decision on every rank: the failing rank raises its
own error, the others PeerInputError naming it and :func:`describe_abort` of its code; ranks calling
different ops raise InvalidStateError. Nothing is launched in either case.
"""
from __future__ import annotations

import numpy as np

from . import arrays, jit, reference
from .calls import CombineCall, DispatchCall
from .config import DispatchHandle, DispatchLayout
from .errors import CapacityError, EPError, InvalidStateError


# An abort code names the argument and the kind of error: 1 + 8 * argument + kind.
ARGUMENTS = ("x", "topk_ids", "weights", "scales", "previous_handle", "output_buffer", "expert_output", "out",
             "handle", "stream", "cast", "cumulative_counts", "return_recv_hook", "overlap", "topk_weights",
             "previous_event", "(other)")
KINDS = (ValueError, TypeError, CapacityError, InvalidStateError, NotImplementedError, EPError)
# What a rank's failed checks raise: the exceptions the communicator shares with its peers.
INPUT_ERRORS = (ValueError, TypeError, NotImplementedError, EPError)
# Ops as the gate carries them.
OP_KINDS = {"dispatch": 1, "cached dispatch": 2, "combine": 3, "combine with weights": 4}
OP_NAMES = {v: k for k, v in OP_KINDS.items()}
EARLIER = 128   # abort-code flag: the error belongs to an earlier call of the rank (found on the device)


def abort_code(exc: BaseException) -> int:
    arg = getattr(exc, "ep_argument", "(other)")
    a = ARGUMENTS.index(arg) if arg in ARGUMENTS else len(ARGUMENTS) - 1
    kind = next((i for i, cls in enumerate(KINDS) if type(exc) is cls), None)
    if kind is None:
        kind = next((i for i, cls in enumerate(KINDS) if isinstance(exc, cls)), len(KINDS) - 1)
    return (1 + 8 * a + kind) | getattr(exc, "ep_code_flags", 0)


def describe_abort(code: int) -> str:
    earlier = " of an earlier call" if code & EARLIER else ""
    code &= EARLIER - 1
    if code < 1:
        return f"unknown reason (code {code})"
    a, kind = divmod(code - 1, 8)
    arg = ARGUMENTS[a] if a < len(ARGUMENTS) else "(other)"
    name = KINDS[kind].__name__ if kind < len(KINDS) else "error"
    return (f"{name} in argument {arg}" if arg != "(other)" else name) + earlier


def settle(rank: int, op: str, failure: BaseException | None, outcomes: list[tuple[str, int]]) -> None:
    """The same decision on every rank from everyone's (op, abort code) of this call: returns when every
    rank called ``op`` and passed its checks; else raises (a failing rank's own error is raised by the
    caller, so this returns for it)."""
    if failure is not None:
        return
    if any(o != op for o, _ in outcomes):
        calls = ", ".join(f"rank {r}: {o}" for r, (o, _) in enumerate(outcomes))
        raise InvalidStateError(f"the ranks called different ops ({calls}); every rank must make the same calls "
                                "in the same order. Nothing was sent")
    bad = [(r, code) for r, (_, code) in enumerate(outcomes) if code]
    if bad:
        from .errors import PeerInputError
        detail = "; ".join(f"rank {r}: {describe_abort(code)}" for r, code in bad)
        raise PeerInputError(f"rank(s) {[r for r, _ in bad]} failed the input checks of this {op} ({detail}); "
                             f"nothing was sent and the communicator stays usable")


def _same_framework(arr, name: str, fw: str, like: str = "x") -> None:
    if arrays.framework_of(arr, name) != fw:
        raise arrays.argument_error(TypeError, name, f"{name} must come from the same framework as {like} ({fw})")


def stream_of(comm, stream, fw: str):
    """The stream an op of ``fw`` arrays runs on: ``stream`` resolved, or the caller's current one (None on
    the CPU backend)."""
    if comm.backend != "gpu":
        if stream is not None:
            raise arrays.argument_error(ValueError, "stream", "stream: the CPU backend takes no stream")
        return None
    try:
        resolved = arrays.resolve_stream(stream, fw)
    except Exception as exc:
        raise arrays.argument_error(TypeError, "stream", f"stream: expected a torch or CuPy stream or a raw "
                                                         f"cudaStream_t, got {type(stream).__name__} ({exc})")
    if not hasattr(resolved, "ptr"):
        raise arrays.argument_error(TypeError, "stream", f"stream: expected a torch or CuPy stream or a raw "
                                                         f"cudaStream_t, got {type(stream).__name__}")
    return resolved


def check_handle(comm, handle, name: str) -> None:
    if not isinstance(handle, DispatchHandle):
        raise arrays.argument_error(TypeError, name, f"{name} must be a DispatchHandle, got {type(handle).__name__}")
    if handle._owner != comm._id:
        raise arrays.argument_error(InvalidStateError, name, f"{name} comes from another communicator")
    if handle._mode != comm.config.mode:
        raise arrays.argument_error(InvalidStateError, name,
                                    f"{name} is a {handle._mode} handle, this communicator is {comm.config.mode}")
    try:
        comm._rt.check_handle(handle._state)
    except InvalidStateError as exc:
        exc.ep_argument = name
        raise


def check_previous_event(comm, event) -> None:
    """An async op's previous_event: None, an ep.CommEvent, or (GPU) a CuPy event or torch.cuda.Event."""
    if event is None:
        return
    from .overlap import CommEvent, event_pointer
    if comm.backend != "gpu" and not isinstance(event, CommEvent):
        raise arrays.argument_error(TypeError, "previous_event", "previous_event: the CPU backend takes an "
                                                                 f"ep.CommEvent, got {type(event).__name__}")
    event_pointer(event)


def _check_recv_hook(comm, op: str, return_recv_hook) -> None:
    """return_recv_hook is a bool, LL's, and this op may start now (at most two sends wait for their hook)."""
    if not isinstance(return_recv_hook, bool):
        raise arrays.argument_error(TypeError, "return_recv_hook", "return_recv_hook must be a bool")
    if return_recv_hook:
        _ll_only(comm, "return_recv_hook")
    if comm.config.mode == "ll":
        try:
            comm._rt.check_pending(op, return_recv_hook)
        except InvalidStateError as exc:
            exc.ep_argument = "return_recv_hook"
            raise


def _ll_only(comm, name: str) -> None:
    if comm.config.mode != "ll":
        raise arrays.argument_error(ValueError, name, f"{name} applies to mode='ll' only")


def _cast_mode(comm, cast) -> int:
    if cast is None:
        return 0
    from .config import Fp8Cast
    _ll_only(comm, "cast")
    if not isinstance(cast, Fp8Cast):
        raise arrays.argument_error(TypeError, "cast", f"cast must be an ep.Fp8Cast or None, got {type(cast).__name__}")
    cfg = comm.config
    block = 512 if cast.ue8m0 else 128
    if cfg.hidden_size % block:
        raise arrays.argument_error(ValueError, "cast", f"cast: FP8{' UE8M0' if cast.ue8m0 else ''} needs hidden_size "
                                                        f"% {block} == 0, got {cfg.hidden_size}")
    cap = comm.world_size * cfg.max_tokens_per_rank
    if cap % 4:
        raise arrays.argument_error(ValueError, "cast", f"cast: the token-contiguous scales need W * max_tokens_per_rank "
                                                        f"% 4 == 0 (16-byte rows for TMA), got {cap}")
    return cast.mode


def dispatch_call(comm, x, topk_ids, weights, scales, previous_handle,
                  output_buffer, stream, cast=None, cumulative_counts=None, return_recv_hook=False,
                  worst_case=False) -> DispatchCall:
    cfg = comm.config
    gpu = comm.backend == "gpu"
    fw = arrays.framework_of(x, "x")
    if gpu and fw == arrays.NUMPY:
        raise arrays.argument_error(TypeError, "x", "x: the GPU backend takes torch CUDA tensors or CuPy arrays, "
                                                    "got a NumPy array")
    dev = comm.device
    bf16 = arrays.bf16_dtypes(fw)
    si = None
    if scales is not None:
        xi, si = _scaled_payload(comm, x, scales, fw)
    else:
        xi = arrays.check_array(x, "x", shape=(None, cfg.hidden_size), dtypes=bf16, device=dev, fw=fw)
    T = xi.shape[0]
    if T > cfg.max_tokens_per_rank:
        raise arrays.argument_error(CapacityError, "x", f"x: {T} tokens exceed max_tokens_per_rank="
                                                        f"{cfg.max_tokens_per_rank}; nothing was sent")
    _same_framework(topk_ids, "topk_ids", fw)
    ii = arrays.check_array(topk_ids, "topk_ids", shape=(T, cfg.topk), dtypes=("int32", "int64"), device=dev, fw=fw)
    wi = None
    if weights is not None:
        _same_framework(weights, "weights", fw)
        wi = arrays.check_array(weights, "weights", shape=(T, cfg.topk), dtypes=("float32",), device=dev, fw=fw)
    previous = None
    if previous_handle is not None:
        if cfg.mode != "ht":
            raise arrays.argument_error(ValueError, "previous_handle", "previous_handle applies to mode='ht' only")
        check_handle(comm, previous_handle, "previous_handle")
        previous = previous_handle._state
        if previous_handle.num_tokens != T:
            raise arrays.argument_error(ValueError, "previous_handle", f"previous_handle was made for "
                                        f"{previous_handle.num_tokens} tokens, x has {T}")
        if comm.tuning.debug_checks and not comm._rt.same_routing(previous, ii):
            raise arrays.argument_error(ValueError, "topk_ids", "topk_ids differ from the routing previous_handle "
                                                                "was made for (EP_DEBUG_CHECKS)")
    elif _checks_ids_on_host(comm) and not worst_case:   # a worst-case dispatch reports them later
        ids = _host(ii.obj) if gpu else arrays.to_numpy(ii.obj)
        try:
            reference.check_topk_ids(ids, cfg.num_experts)
        except ValueError as exc:
            raise arrays.argument_error(ValueError, "topk_ids", f"{exc}; nothing was sent") from None
    oi = None
    if output_buffer is not None:
        if cfg.mode != "ll":
            raise arrays.argument_error(ValueError, "output_buffer", "output_buffer applies to mode='ll' only")
        _same_framework(output_buffer, "output_buffer", fw)
        cap = comm.world_size * cfg.max_tokens_per_rank
        oi = arrays.check_array(output_buffer, "output_buffer", shape=(comm.num_local_experts, cap, cfg.hidden_size),
                                dtypes=bf16, device=dev, fw=fw)
    fp8 = _cast_mode(comm, cast)
    if fp8 and oi is not None:
        raise arrays.argument_error(ValueError, "output_buffer", "output_buffer takes bf16 tokens; with cast= the "
                                                                 "FP8 tokens and scales are communicator-owned")
    ci = None
    if cumulative_counts is not None:
        _ll_only(comm, "cumulative_counts")
        _same_framework(cumulative_counts, "cumulative_counts", fw)
        ci = arrays.check_array(cumulative_counts, "cumulative_counts", shape=(comm.num_local_experts,),
                                dtypes=("int32", "int64"), device=dev, fw=fw)
    _check_recv_hook(comm, "dispatch", return_recv_hook)
    if worst_case:
        if cfg.mode != "ht" or cfg.layout is not DispatchLayout.TOKEN_MAJOR:
            raise arrays.argument_error(ValueError, "worst_case", "worst_case applies to mode='ht' with "
                                                                  "output_layout=TOKEN_MAJOR only")
        if previous is not None:
            raise arrays.argument_error(ValueError, "worst_case", "worst_case: a cached dispatch takes the layout "
                                                                  "of its previous_handle; pass worst_case=False")
    return DispatchCall(x=xi, topk_ids=ii, weights=wi, previous=previous, output_buffer=oi,
                        stream=stream_of(comm, stream, fw), framework=fw, fp8=fp8, cumulative_counts=ci,
                        recv_hook=return_recv_hook, scales=si, worst_case=bool(worst_case))


def _scaled_payload(comm, x, scales, fw: str):
    """HT dispatch of a block-scaled payload: x [T, row] of one-byte elements (FP8, packed FP4) and its scales
    [T, S] (any dtype of arrays.SCALE_DTYPES, any strides). A row and its scales share one data slot of
    2 * hidden_size bytes."""
    from .config import QuantScales
    cfg = comm.config
    if cfg.mode != "ht":
        raise arrays.argument_error(ValueError, "scales", "scales applies to mode='ht' (LL casts bf16 in the kernel: "
                                                          "pass cast=ep.Fp8Cast())")
    if cfg.owned_output:
        raise arrays.argument_error(ValueError, "scales", "scales: owned_output takes bf16 tokens")
    arr = scales.scales if isinstance(scales, QuantScales) else scales
    xi = arrays.check_array(x, "x", shape=(None, None), dtypes=arrays.BYTE_PAYLOADS, device=comm.device, fw=fw)
    row = xi.shape[1] * xi.itemsize
    if row % 16 or row == 0:
        raise arrays.argument_error(ValueError, "x", f"x: a scaled payload's rows must be a positive multiple of 16 "
                                                     f"bytes, got {row}")
    _same_framework(arr, "scales", fw)
    si = arrays.check_array(arr, "scales", shape=(xi.shape[0], None), dtypes=arrays.SCALE_DTYPES, device=comm.device,
                            fw=fw, contiguous=False)
    if si.itemsize not in (1, 4):
        raise arrays.argument_error(TypeError, "scales", f"scales: elements of 1 or 4 bytes, got {si.itemsize}")
    if any(st < 0 for st in si.strides()):
        raise arrays.argument_error(ValueError, "scales", "scales: negative strides are not supported")
    need = -(-row // 16) * 16 + si.shape[1] * si.itemsize
    if need > 2 * cfg.hidden_size:
        raise arrays.argument_error(ValueError, "scales", f"x and scales: {row} payload bytes + {si.shape[1]} scales of "
                                                          f"{si.itemsize} bytes exceed the {2 * cfg.hidden_size}-byte "
                                                          "slot a row has (2 * hidden_size)")
    return xi, si


def combine_call(comm, expert_output, handle, out, stream, return_recv_hook=False,
                 overlap=None, topk_weights=None, weights=None) -> CombineCall:
    cfg = comm.config
    check_handle(comm, handle, "handle")
    fw = arrays.framework_of(expert_output, "expert_output")
    if comm.backend == "gpu" and fw == arrays.NUMPY:
        raise arrays.argument_error(TypeError, "expert_output", "expert_output: the GPU backend takes torch CUDA "
                                                                "tensors or CuPy arrays")
    bf16 = arrays.bf16_dtypes(fw)
    yi = arrays.check_array(expert_output, "expert_output", shape=tuple(handle._state.tokens_shape), dtypes=bf16,
                            device=comm.device, fw=fw)
    T = handle.num_tokens
    oi = None
    if out is not None:
        _same_framework(out, "out", fw, like="expert_output")
        oi = arrays.check_array(out, "out", shape=(T, cfg.hidden_size), dtypes=bf16, device=comm.device, fw=fw)
    _check_recv_hook(comm, "combine", return_recv_hook)
    ready, target = None, 0
    if overlap is not None:
        _ll_only(comm, "overlap")
        from .overlap import OverlapSignals
        if not isinstance(overlap, OverlapSignals):
            raise arrays.argument_error(TypeError, "overlap", "overlap must be an ep.OverlapSignals from "
                                                              f"create_overlap_config, got {type(overlap).__name__}")
        sms = comm.effective_config.overlap.combine_num_sms
        if sms is None:
            raise arrays.argument_error(ValueError, "overlap", "overlap: a signalled combine waits on the device for "
                                        "the MLP's signals, so it must leave the MLP SMs: set "
                                        "CommOverlapConfig(combine_num_sms=...) (e.g. 8-32)")
        if comm.backend == "gpu":
            if comm.tuning.ll.combine_blocks >= jit.sm_count():
                raise arrays.argument_error(ValueError, "overlap", f"overlap: combine_num_sms={sms} takes every SM; "
                                            "the MLP it waits for would never run")
        ready, target = overlap.check(comm, fw)
    wi = None
    if topk_weights is not None:
        if cfg.layout is not DispatchLayout.TOKEN_MAJOR:
            raise arrays.argument_error(ValueError, "topk_weights", "topk_weights applies to the TOKEN_MAJOR layout")
        _same_framework(topk_weights, "topk_weights", fw, like="expert_output")
        wi = arrays.check_array(topk_weights, "topk_weights", shape=(yi.shape[0], cfg.topk), dtypes=("float32",),
                                device=comm.device, fw=fw)
    cw = None
    if weights is not None:
        _ll_only(comm, "weights")
        _same_framework(weights, "weights", fw, like="expert_output")
        cw = arrays.check_array(weights, "weights", shape=(T, cfg.topk), dtypes=("float32",), device=comm.device,
                                fw=fw)
    return CombineCall(expert_output=yi, state=handle._state, out=oi, num_tokens=T,
                       stream=stream_of(comm, stream, fw), framework=fw, recv_hook=return_recv_hook, ready=ready,
                       ready_target=target, topk_weights=wi, weights=cw)


def _checks_ids_on_host(comm) -> bool:
    """Where expert ids are checked before the launch. GPU HT finds invalid ids in the count exchange (every
    rank raises together); LL treats them as unused and reports them on the next call, on both backends,
    unless EP_DEBUG_CHECKS asks for a synchronous check; the CPU backend's HT checks them here."""
    if comm.config.mode == "ll":
        return comm.tuning.debug_checks
    return comm.backend != "gpu"


def _host(arr) -> np.ndarray:
    """A NumPy copy of a device array (EP_DEBUG_CHECKS only: it synchronizes)."""
    if arrays.framework_of(arr) == arrays.TORCH:
        return arr.detach().cpu().numpy()
    import cupy
    return cupy.asnumpy(arr)
