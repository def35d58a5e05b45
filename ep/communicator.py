"""MoECommunicator: validate, build the call record, hand it to the mode runtime. No kernel details here."""
from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import warnings
import weakref

from . import arrays, envs, internode, jit, sizes, tuning, validation
from .bootstrap import Group, bind_device, make_group
from .calls import CombineCall, DispatchCall
from .config import DispatchHandle, MoECommunicatorConfig
from .errors import ConfigError, EPError, EPTimeoutError, InvalidStateError, PeerInputError

log = logging.getLogger("ep")
_ids = itertools.count(1)
_open: "weakref.WeakSet[MoECommunicator]" = weakref.WeakSet()


def collective_check(group: Group, fn, peer_error=PeerInputError, what: str = "check"):
    """Run the local check ``fn`` on every rank and share the outcome: a rank whose check failed re-raises
    its own exception, the others raise ``peer_error`` naming the failing ranks. Returns fn's result."""
    result, failure = None, None
    try:
        result = fn()
    except validation.INPUT_ERRORS as exc:
        failure = exc
    failed = group.allgather(None if failure is None else f"{type(failure).__name__}: {failure}", what=what)
    if failure is not None:
        raise failure
    bad = {r: msg for r, msg in enumerate(failed) if msg is not None}
    if bad:
        raise peer_error(f"rank(s) {sorted(bad)} failed: " + "; ".join(f"rank {r}: {m}" for r, m in bad.items()))
    return result


def choose_backend(knob: str) -> str:
    if knob != "auto":
        return knob
    try:
        import cupy
        return "gpu" if cupy.cuda.runtime.getDeviceCount() > 0 else "cpu"
    except Exception:
        return "cpu"


def _flat_fields(obj, prefix: str = "") -> dict:
    """{dotted field: repr} of a (nested) config dataclass, for naming the field ranks disagree on."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat_fields(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = repr(value)
    return out


_collected_unclosed: list[int] = []   # ranks of communicators garbage-collected without close()


@atexit.register
def _warn_unclosed() -> None:
    ranks = sorted({c.rank for c in list(_open) if not c._closed} | set(_collected_unclosed))
    count = len([c for c in list(_open) if not c._closed]) + len(_collected_unclosed)
    if count:
        warnings.warn(f"{count} MoECommunicator(s) of rank(s) {ranks} were never closed; call close() on every "
                      "rank (it is collective) or use the communicator as a context manager", RuntimeWarning)


class MoECommunicator:
    """Dispatch MoE tokens to the ranks owning their experts and combine the expert outputs back.

    Collective: every rank of ``group`` constructs it with the same config and calls dispatch/combine in
    the same order. ``group``: None (torch.distributed's world group when torch.distributed is initialized,
    else ``MPI.COMM_WORLD``), an mpi4py communicator or a torch.distributed process group; ep works on a
    private duplicate of it. ``backend``: "gpu", "cpu" or None (knob ``EP_BACKEND``, default: gpu when
    visible). Raises ConfigError when the config does not fit the world size, or ranks disagree on config
    or knobs (naming the field), EPTimeoutError when a rank of the group never arrives.
    """

    def __init__(self, config: MoECommunicatorConfig, group=None, *, backend: str | None = None):
        if not isinstance(config, MoECommunicatorConfig):
            raise ConfigError(f"config must be a MoECommunicatorConfig, got {type(config).__name__}")
        self.config = config
        self._closed = True   # until fully built: close() is a no-op
        try:   # the group's bound: the effective timeout if the knobs parse here (their errors are shared below)
            group_timeout = tuning.effective_config(config, envs.read()).timeout_s
        except ConfigError:
            group_timeout = config.timeout_s
        self._group: Group = make_group(group, timeout_s=group_timeout)
        W = self._group.size

        def check():
            knobs = envs.read()
            eff = tuning.effective_config(config, knobs)
            chosen = backend or choose_backend(knobs.backend)
            if chosen not in ("gpu", "cpu"):
                raise ConfigError(f"backend must be 'gpu' or 'cpu', got {chosen!r}")
            sizes.check_row_index_range(eff, W)
            topo = internode.topology(eff.ranks_per_node, self._group.hosts)
            if topo.internode and chosen == "gpu":
                raise ConfigError(f"these {W} ranks form {topo.nodes} nodes of {topo.ranks_per_node}: the GPU "
                                  "backend is intranode for now (its NCCL network hop is not built); run every "
                                  "rank of a communicator on one node, or use backend='cpu'")
            return knobs, eff, chosen, tuning.resolve(eff, W, knobs), topo

        # Every rank validates, then all agree, so a bad config or knob on one rank raises on every rank
        # instead of leaving the others waiting in a collective.
        try:
            knobs, eff, self._backend, self.tuning, self.topology = collective_check(self._group, check, ConfigError,
                                                                                     "config")
            self._agree_on_config(eff, knobs)
            logging.getLogger("ep").setLevel(knobs.log_level)
            self.effective_config = eff
            self._id = next(_ids)
            self._broken: BaseException | None = None
            self._async = None   # the comm stream of async ops (first use)
            self.device = -1
            if self._backend == "cpu":
                from .cpu_backend import CpuRuntime
                self._rt = CpuRuntime(eff, self._group, self.tuning, self.topology)
            else:
                self.device, self.tuning = collective_check(self._group, lambda: self._bind(eff, knobs), ConfigError,
                                                            "device")
                if eff.mode == "ht":
                    from .ht import HtRuntime
                    self._rt = HtRuntime(eff, self._group, self.tuning)
                else:
                    from .ll import LLRuntime
                    self._rt = LLRuntime(eff, self._group, self.tuning)   # buffers built on first use
        except BaseException:
            self._group.close()
            raise
        self._closed = False
        _open.add(self)

    def _bind(self, eff: MoECommunicatorConfig, knobs) -> tuple[int, tuning.Tuning]:
        device = bind_device(self._group, eff.shared_gpu)
        return device, tuning.resolve(eff, self._group.size, knobs, sms=jit.sm_count())

    def _agree_on_config(self, eff: MoECommunicatorConfig, knobs) -> None:
        mine = dict(_flat_fields(eff), backend=self._backend, debug_checks=repr(knobs.debug_checks),
                    debug_trap=repr(knobs.debug_trap))
        everyone = self._group.allgather(mine, what="config")
        for r, other in enumerate(everyone):
            for name in mine:
                if other.get(name) != mine[name]:
                    raise ConfigError(f"ranks differ in {name} (config field, with the env overrides applied): rank "
                                      f"{self._group.rank} has {mine[name]}, rank {r} has {other.get(name)}")

    # -------------------------------------------------------------------------------- properties
    @property
    def rank(self) -> int:
        return self._group.rank

    @property
    def world_size(self) -> int:
        return self._group.size

    @property
    def num_local_experts(self) -> int:
        return self.config.num_experts // self._group.size

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def buffer_bytes(self) -> int:
        """Device bytes this communicator's buffers take (``required_bytes`` of its tuning)."""
        return self.tuning.buffer_bytes

    @staticmethod
    def required_bytes(config: MoECommunicatorConfig, world_size: int) -> int:
        """Device bytes a communicator of ``config`` keeps at ``world_size`` ranks, computed before anything is
        allocated: the config with this process's env overrides applied, resolved as a communicator would."""
        knobs = envs.read()
        return tuning.resolve(tuning.effective_config(config, knobs), world_size, knobs).buffer_bytes

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"rank {self.rank}/{self.world_size}"
        return f"MoECommunicator({state}, backend={getattr(self, '_backend', '?')}, {self.tuning.describe()})" \
            if hasattr(self, "tuning") else f"MoECommunicator({state})"

    # ------------------------------------------------------------------------------------ checks
    def _check_usable(self) -> None:
        if self._closed:
            raise InvalidStateError("the communicator is closed")
        if self._broken is not None:
            raise InvalidStateError(f"the communicator is unusable after an earlier failure: {self._broken}")
        try:
            self._rt.check_errors()
        except EPTimeoutError as exc:
            self._broken = exc
            raise

    def prepare(self) -> None:
        """Build lazily created resources now (LL buffers and kernels). Collective. Call it before
        capturing a CUDA graph if no LL call has run yet."""
        self._check_usable()
        self._run(self._rt.prepare)

    def _run(self, fn, *args):
        try:
            return fn(*args)
        except EPTimeoutError as exc:
            self._broken = exc
            raise

    def _validated(self, op: str, build):
        """The call record from ``build``; its outcome is shared with the peers (``Runtime.agree``) before
        anything moves, so one rank's bad input raises on every rank."""
        record, failure = None, None
        try:
            record = build()
        except validation.INPUT_ERRORS as exc:
            failure = exc
        if failure is None:
            failure = self._rt.take_input_error()
        self._run(self._rt.agree, op, failure)
        if failure is not None:
            raise failure
        return record

    # ---------------------------------------------------------------------------------- dispatch
    def dispatch(self, x, topk_ids, weights=None, scales=None, *, previous_handle: DispatchHandle | None = None,
                 output_buffer=None, stream=None, cast=None, cumulative_counts=None, return_recv_hook: bool = False,
                 worst_case: bool = False):
        """Send every token to the ranks owning its experts; return the local experts' rows.

        x: ``[T, H]`` bf16 (torch.bfloat16, or uint16 bit patterns), C-contiguous, T <= max_tokens_per_rank;
          with scales (HT) ``[T, row]`` of a one-byte payload (FP8 e4m3/e5m2, packed FP4 uint8).
        scales (HT): the payload's block scales ``[T, S]`` (float32, packed UE8M0 int32, E8M0 / E4M3 bytes; any
          strides), or an ep.QuantScales: they travel with the rows into ``out.scales``.
        topk_ids: ``[T, K]`` int32/int64, -1 = unused slot. weights: ``[T, K]`` float32 or None (ones).
        previous_handle (HT): reuse that dispatch's routing and layout (its topk_ids; this call's x and weights),
          skipping the count exchange; ``EP_DEBUG_CHECKS=1`` checks that topk_ids equal the handle's.
        output_buffer (LL): ``[L, W*T_max, H]`` bf16 to write into instead of the owned buffer.
        stream: torch/CuPy stream or raw pointer; default the caller's current stream.
        cast (LL): an ep.Fp8Cast to receive e4m3 tokens and their scales (``out.scales``) cast in the kernel.
        cumulative_counts (LL): ``[L]`` int32/int64 on the device the call's rows per expert are added to.
        return_recv_hook (LL): launch only the send half; the call also returns a hook that launches the
          receive half (call it once, before using the outputs; no SM is held in between).
        worst_case (HT TOKEN_MAJOR, uncached): size the outputs for the most rows this rank can receive
          (``W * max_tokens_per_rank``; rows past the received ones: topk_ids -1, weights 0) instead of waiting
          on the host for the count exchange, so the dispatch (and its combines) can be captured in a CUDA
          graph. Invalid topk_ids then move nothing and are reported at a later call.
        Returns (DispatchOutput, DispatchHandle), plus the hook with return_recv_hook. Raises ValueError /
        TypeError on bad input before any launch (every rank raises in that call: the peers PeerInputError,
        a ValueError), and EPTimeoutError on a time-out.
        """
        out, handle, hook, _ = self._dispatch(x, topk_ids, weights, scales, previous_handle, output_buffer, stream,
                                              cast, cumulative_counts, return_recv_hook, None, None, worst_case)
        return (out, handle, hook) if return_recv_hook else (out, handle)

    def dispatch_async(self, x, topk_ids, weights=None, scales=None, *, previous_event=None,
                       previous_handle: DispatchHandle | None = None, output_buffer=None, stream=None, cast=None,
                       cumulative_counts=None, worst_case: bool = False):
        """:meth:`dispatch` on the communicator's own stream, after ``previous_event`` (an ep.CommEvent, CuPy
        event or torch.cuda.Event; default: everything queued so far on ``stream``, the caller's current stream).
        Returns (DispatchOutput, DispatchHandle, ep.CommEvent): call ``event.current_stream_wait()`` before
        reading the outputs. The arrays stay referenced (and, for torch, marked used by the comm stream)
        until then; see ep.overlap. An HT dispatch without previous_handle still waits on the host for the
        count exchange (the output sizes), unless worst_case; a cached one, and LL, return at once."""
        out, handle, _, event = self._dispatch(x, topk_ids, weights, scales, previous_handle, output_buffer, stream,
                                               cast, cumulative_counts, False, True, previous_event, worst_case)
        return out, handle, event

    def _dispatch(self, x, topk_ids, weights, scales, previous_handle, output_buffer, stream, cast, cumulative_counts,
                  return_recv_hook, asynchronous, previous_event, worst_case=False):
        self._check_usable()
        op = "dispatch" if previous_handle is None else "cached dispatch"

        def build():
            call = validation.dispatch_call(self, x, topk_ids, weights, scales, previous_handle, output_buffer,
                                            stream, cast, cumulative_counts, return_recv_hook, worst_case)
            if asynchronous:
                validation.check_previous_event(self, previous_event)
            return call
        call: DispatchCall = self._validated(op, build)
        (out, state, hook), event = self._launch(self._rt.dispatch, call, asynchronous, previous_event, stream,
                                                 (x, topk_ids, weights, scales, cumulative_counts),
                                                 lambda result: (result[0],))
        handle = DispatchHandle(self._id, self.config.mode, state, call.num_tokens, call.framework)
        return out, handle, hook, event

    def _launch(self, method, call, asynchronous: bool, previous_event, named_stream, inputs: tuple, outputs_of):
        """(what the runtime's ``method`` returned, the CommEvent of an async op or None). An async GPU op runs
        on the comm stream (ep.overlap.AsyncRunner); once one has run, every op waits for the previous one.
        ``named_stream``: the caller's stream= (torch then allocates the outputs from that stream's pool)."""
        runner = self._async
        if not asynchronous or self.backend != "gpu":
            if runner is not None:
                runner.before(call.stream)
            with arrays.allocating_on(call.stream if named_stream is not None else None, call.framework):
                result = self._run(method, call)
            if runner is not None:
                runner.after(call.stream)
            if not asynchronous:
                return result, None
            from .overlap import CommEvent
            return result, CommEvent(None, call.framework)   # the CPU backend: complete already
        if runner is None:
            from .overlap import AsyncRunner
            runner = self._async = AsyncRunner(self.device)
        caller = call.stream
        runner.enter(caller, previous_event)
        call = dataclasses.replace(call, stream=runner.stream)
        with runner.allocating(call.framework):
            result = self._run(method, call)
        from .overlap import tensors_of
        return result, runner.leave(call.framework, caller, tensors_of(*inputs), tensors_of(*outputs_of(result)))

    # ----------------------------------------------------------------------------------- combine
    def combine(self, expert_output, handle: DispatchHandle, *, out=None, stream=None, return_recv_hook: bool = False,
                overlap=None, topk_weights=None, weights=None):
        """Sum the expert outputs of every token back on its source rank.

        expert_output: bf16, the shape and row order of that dispatch's ``tokens`` (bf16 also after an FP8
        dispatch). out: optional ``[T, H]`` bf16 to write into (returned). Returns ``[T, H]`` bf16 with
        ``out[t] = sum_k w[t,k] * expert_output[row(t,k)]`` rounded as documented in ep.reference.
        return_recv_hook (LL): as for dispatch; returns (out, hook).
        overlap (LL): an ep.OverlapSignals from create_overlap_config: the combine reads an expert's rows
          only once its counter says they are written.
        weights (LL): ``[T, K]`` float32 routing weights of this rank's tokens given at combine time, used
          instead of the dispatch's (DeepEP's LL passes its weights to combine, not dispatch); every rank
          passes them to the same combines.
        TOKEN_MAJOR: expert_output ``[N, H]`` holds each row already weighted and summed over this rank's
          experts; the result is, per source token, the sum of its rows in ascending rank order (fp32, rounded
          once). topk_weights: optional ``[N, K]`` float32 summed the same way; then returns (out, weights).
        Raises like dispatch.
        """
        result, hook, _ = self._combine(expert_output, handle, out, stream, return_recv_hook, overlap, topk_weights,
                                        weights, False, None)
        return (result, hook) if return_recv_hook else result

    def combine_async(self, expert_output, handle: DispatchHandle, *, previous_event=None, out=None, stream=None,
                      overlap=None, topk_weights=None, weights=None):
        """:meth:`combine` on the communicator's own stream, after ``previous_event`` (as for
        :meth:`dispatch_async`). Returns (out, ep.CommEvent), or ((out, weights), event) with topk_weights."""
        result, _, event = self._combine(expert_output, handle, out, stream, False, overlap, topk_weights, weights,
                                         True, previous_event)
        return result, event

    def _combine(self, expert_output, handle, out, stream, return_recv_hook, overlap, topk_weights, weights,
                 asynchronous, previous_event):
        self._check_usable()

        def build():
            call = validation.combine_call(self, expert_output, handle, out, stream, return_recv_hook, overlap,
                                           topk_weights, weights)
            if asynchronous:
                validation.check_previous_event(self, previous_event)
            return call
        call: CombineCall = self._validated("combine" if weights is None else "combine with weights", build)
        (result, hook), event = self._launch(self._rt.combine, call, asynchronous, previous_event, stream,
                                             (expert_output, out, topk_weights, weights,
                                              None if overlap is None else overlap.counters),
                                             lambda res: (res[0],))
        if topk_weights is not None:
            result = tuple(result)
        return result, hook, event

    def row_sources(self, handle: DispatchHandle, *, stream=None):
        """LL: where the rows of ``handle``'s dispatch came from, as two arrays in the dispatch's framework:
        ``src_token`` int32 ``[L, W*T_max]``, the source token index of each row (-1 past the expert's rows),
        and ``src_counts`` int32 ``[L, W]``, the rows of each local expert from each source: source s's rows of
        expert l are ``[sum(src_counts[l, :s]), + src_counts[l, s])`` (sources in rank order, tokens ascending).
        What DeepEP's LL handle encodes as src_info / layout_range. Local (no communication), queued on
        ``stream`` after the dispatch; the handle must still be combinable (its receive hook called)."""
        self._check_usable()
        if self.config.mode != "ll":
            raise arrays.argument_error(ValueError, "handle", "row_sources applies to mode='ll' only")
        validation.check_handle(self, handle, "handle")
        fw = handle._framework
        s = validation.stream_of(self, stream, fw)
        with arrays.allocating_on(s if stream is not None else None, fw):
            return self._run(self._rt.row_sources, handle._state, fw, s)

    def create_overlap_config(self, *, target: int = 1, framework: str | None = None):
        """Readiness counters for a block-level overlapped LL combine: an ep.OverlapSignals (see there) with
        ``[L]`` zeroed counters in ``framework`` ("torch" or "cupy"; default torch when it is imported, on
        the CPU backend numpy). Pass it as ``combine(..., overlap=signals)``; the MLP signals each expert's
        counter ``target`` times once its rows are written. Not collective."""
        from .overlap import OverlapSignals, counters_array
        self._check_usable()
        if self.config.mode != "ll":
            raise ValueError("create_overlap_config: the block-level overlapped combine is LL's (mode='ll')")
        if isinstance(target, bool) or not isinstance(target, int) or not 1 <= target < 2 ** 31:
            raise ValueError(f"create_overlap_config: target must be an int in [1, 2^31), got {target!r}")
        if self.backend == "cpu":
            fw = arrays.NUMPY
        else:
            import sys
            fw = framework or (arrays.TORCH if "torch" in sys.modules else arrays.CUPY)
            if fw not in (arrays.TORCH, arrays.CUPY):
                raise ValueError(f"create_overlap_config: framework must be 'torch' or 'cupy', got {framework!r}")
        return OverlapSignals(self, counters_array(fw, self.num_local_experts, self.device), target, fw)

    # ---------------------------------------------------------------------------------- lifetime
    def synchronize(self) -> None:
        """Wait for this rank's queued ep work (bounded by the device waits); raise what it reported (an
        EPTimeoutError, or a PeerInputError for a peer's failed input checks of an earlier call)."""
        self._check_usable()
        self._rt.synchronize()
        self._check_usable()

    def close(self) -> None:
        """Collective and idempotent: wait for queued work, barrier, unmap peers, barrier, free. Every wait is
        bounded by timeout_s; if a peer never arrives the buffers are left mapped (a live peer could still
        write into them) and EPTimeoutError is raised."""
        if self._closed:
            return
        self._closed = True
        _open.discard(self)
        try:
            self._rt.synchronize()
        except EPError as exc:
            log.warning("[rank %d] synchronize before close: %s", self.rank, exc)
        except Exception as exc:
            log.warning("[rank %d] synchronize before close failed: %s", self.rank, exc)
        # A peer may still be in a bounded wait (the op gate, a device wait) before it reaches close.
        bound = 2 * self._group.timeout_s + 1.0
        try:
            self._group.barrier("close", bound)
        except EPError as exc:
            log.error("[rank %d] close: peers did not arrive (%s); leaving the buffers mapped", self.rank, exc)
            self._group.close()
            raise
        self._rt.close()
        try:
            self._group.barrier("close", bound)
        finally:
            self._group.close()

    def __enter__(self) -> "MoECommunicator":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Leaving on an exception: show it now (the peers may make close wait up to timeout_s), then close
        # without ever raising over it.
        log.error("[rank %d] leaving the MoECommunicator context on %s: %s; closing (bounded by %.1f s)",
                  self.rank, exc_type.__name__, exc, self._group.timeout_s, exc_info=(exc_type, exc, tb))
        try:
            self.close()
        except Exception as close_exc:
            log.error("[rank %d] close after %s failed: %s", self.rank, exc_type.__name__, close_exc)

    def __del__(self):
        if getattr(self, "_closed", True) is False:   # reported once, at exit
            _collected_unclosed.append(self._group.rank)
