"""Overlapping communication with compute: async ops on a communication stream, and the per-expert readiness
signals of a block-level overlapped LL combine.

Async ops (``MoECommunicator.dispatch_async`` / ``combine_async``): the op runs on the communicator's own
stream after ``previous_event`` (default: everything queued so far on the caller's stream) and returns a
:class:`CommEvent` the caller joins with ``current_stream_wait()`` before it reads the outputs.

Ordering. Once a communicator has run an async op, each of its ops (async or not) first waits for the end of
its previous op, so ops run in call order whatever stream they are on.

Memory discipline. The op's arrays stay referenced until the op completed. torch: outputs are allocated from
the comm stream's pool and marked used by the caller's stream, inputs marked used by the comm stream
(``record_stream``, outside CUDA graph capture), so the caching allocator never hands their memory out while
a stream still works on it. CuPy (no record_stream): outputs come from the comm stream's pool; an async op
that waits on the caller's stream (the default) is ordered after everything the caller did with earlier
outputs; with an explicit ``previous_event`` the caller owns that ordering for memory it frees.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from . import arrays
from .errors import InvalidStateError


class CommEvent:
    """The completion of an async op on the communication stream.

    ``current_stream_wait()`` makes the caller's current stream (torch's for torch outputs, CuPy's otherwise)
    wait for the op; ``wait(stream)`` any stream; ``synchronize()`` the host; ``query()`` says whether it
    completed. On the CPU backend the op has completed when the call returns."""

    __slots__ = ("_event", "_framework")

    def __init__(self, event, framework: str):
        self._event = event          # a CuPy event, or None (CPU backend: already complete)
        self._framework = framework

    @property
    def ptr(self) -> int:
        """The raw cudaEvent_t (0 on the CPU backend)."""
        return 0 if self._event is None else int(self._event.ptr)

    def current_stream_wait(self) -> None:
        self.wait(None)

    def wait(self, stream=None) -> None:
        """Make ``stream`` (torch or CuPy stream, raw handle; None = the current stream) wait for the op."""
        if self._event is not None:
            import cupy
            target = arrays.resolve_stream(stream, self._framework)
            cupy.cuda.runtime.streamWaitEvent(target.ptr, self._event.ptr, 0)

    def synchronize(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def query(self) -> bool:
        return self._event is None or bool(self._event.done)


def event_pointer(event, name: str = "previous_event") -> int:
    """The raw cudaEvent_t of a CommEvent, CuPy event or torch.cuda.Event (TypeError otherwise)."""
    if isinstance(event, CommEvent):
        return event.ptr
    raw = getattr(event, "cuda_event", None)        # torch.cuda.Event
    if raw is None and type(event).__module__.startswith("cupy"):
        raw = getattr(event, "ptr", None)
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise arrays.argument_error(TypeError, name, f"{name}: expected an ep.CommEvent, a CuPy event or a "
                                                     f"torch.cuda.Event, got {type(event).__name__}")
    return raw


_COMM_STREAMS: dict = {}   # device -> the comm stream of every communicator on it (never destroyed)


def comm_stream(device: int):
    """The communication stream of ``device``, shared by its communicators and kept for the process' life:
    torch tensors marked used by it (record_stream) make the caching allocator record events on it when they
    are freed, which may be after their communicator is gone."""
    s = _COMM_STREAMS.get(device)
    if s is None:
        import cupy
        with cupy.cuda.Device(device):
            s = _COMM_STREAMS[device] = cupy.cuda.Stream(non_blocking=True)
    return s


class AsyncRunner:
    """A communicator's ops once it has run an async one: they run on two streams (the caller's and the comm
    stream), so each op's stream first waits for the end of the communicator's previous op (an event), in call
    order, as the runtimes' device counters and buffers assume. Inside a CUDA graph capture the graph's own
    dependencies order the ops (events from outside a capture cannot be waited on there). Async ops' arrays
    stay referenced here until their op completed."""

    def __init__(self, device: int):
        import cupy
        self.device = device
        self.stream = comm_stream(device)
        self._start = cupy.cuda.Event(disable_timing=True)
        self._last = cupy.cuda.Event(disable_timing=True)
        self._have_last = False
        self._inflight: list = []    # (done event, the op's arrays)

    def before(self, stream) -> None:
        """``stream`` (about to run an op) waits for the previous op's end."""
        if self._have_last and not stream.is_capturing():
            import cupy
            cupy.cuda.runtime.streamWaitEvent(stream.ptr, self._last.ptr, 0)

    def after(self, stream) -> None:
        if stream.is_capturing():
            return
        self._last.record(stream)
        self._have_last = True
        self._inflight = [(ev, keep) for ev, keep in self._inflight if not ev.done]

    def enter(self, caller_stream, previous_event) -> None:
        """Order the comm stream after previous_event (None: after the caller's stream so far) and after the
        previous op. During a capture the comm stream also joins the caller's stream, so it is captured too."""
        import cupy
        rt = cupy.cuda.runtime
        capturing = caller_stream.is_capturing()
        if previous_event is not None:
            raw = event_pointer(previous_event)
            if raw:
                rt.streamWaitEvent(self.stream.ptr, raw, 0)
        # an event recorded inside the capture has made the comm stream join it; one from before has not
        if previous_event is None or (capturing and not self.stream.is_capturing()):
            rt.eventRecord(self._start.ptr, caller_stream.ptr)
            rt.streamWaitEvent(self.stream.ptr, self._start.ptr, 0)
        self.before(self.stream)

    def allocating(self, framework: str):
        """Context of the op's launch: torch allocates its outputs from the comm stream's pool (the stream that
        writes them), so no block freed on the caller's stream with work still queued there is handed out."""
        if framework != arrays.TORCH:
            return contextlib.nullcontext()
        import torch
        return torch.cuda.stream(torch.cuda.ExternalStream(self.stream.ptr, device=self.device))

    def leave(self, framework: str, caller_stream, inputs: tuple, outputs: tuple) -> CommEvent:
        """The op's completion event. torch: inputs are marked used by the comm stream, outputs by the caller's
        stream, so the caching allocator reuses neither early."""
        import cupy
        capturing = self.stream.is_capturing()
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self.stream)
        self.after(self.stream)
        if not capturing:   # a graph's memory lives as long as the graph: nothing to hold or mark
            if framework == arrays.TORCH:
                _record_stream(inputs, self.stream.ptr, self.device)
                _record_stream(outputs, caller_stream.ptr, self.device)
            self._inflight.append((done, inputs + outputs))
        return CommEvent(done, framework)


def _record_stream(objs: tuple, stream_ptr: int, device: int) -> None:
    import torch
    ext = torch.cuda.ExternalStream(stream_ptr, device=device)
    for obj in objs:
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            obj.record_stream(ext)


def tensors_of(*objs) -> tuple:
    """The arrays among nested outputs (DispatchOutput fields, tuples), for CommEvent and record_stream."""
    found: list = []

    def walk(o: Any) -> None:
        if o is None or isinstance(o, (int, float, str, bool)):
            return
        if isinstance(o, (tuple, list)):
            for v in o:
                walk(v)
        elif hasattr(o, "__dataclass_fields__"):
            for name in o.__dataclass_fields__:
                walk(getattr(o, name))
        elif hasattr(o, "shape"):
            found.append(o)
    for obj in objs:
        walk(obj)
    return tuple(found)


class OverlapSignals:
    """Per-local-expert readiness counters of a block-level overlapped LL combine
    (``MoECommunicator.create_overlap_config``).

    ``counters``: ``[L]`` 32-bit device counters (CuPy uint32, or torch int32 read as unsigned), zero at
    first. The expert MLP adds to expert e's counter once its rows of ``expert_output`` are written:
    ``signal(e)`` (a one-thread kernel on the stream that wrote them; release semantics), or its own GEMM
    epilogue with a release atomic add. ``combine(..., overlap=signals)`` then reads expert e's rows only once
    its counter reaches ``target`` (so it can start sending early experts while later ones are still being
    computed, on the SMs of ``CommOverlapConfig.combine_num_sms``), waits for every counter at its end, takes
    ``target`` off each, and so leaves them ready for the next combine (eager or CUDA graph replay alike).
    One OverlapSignals serves one combine at a time: signal it for the next combine only after the current
    one (stream order). The result is bit-identical to a plain combine.
    """

    def __init__(self, comm, counters, target: int, framework: str):
        self._comm_id = comm._id
        self._comm = comm
        self.counters = counters
        self.target = target
        self.framework = framework

    @property
    def num_local_experts(self) -> int:
        return int(self.counters.shape[0])

    def signal(self, expert: int | None = None, *, count: int = 1, add: int = 1, stream=None) -> None:
        """Add ``add`` to the counters of experts [expert, expert + count) (None: every expert), after the
        work already queued on ``stream`` (default: the current stream)."""
        L = self.num_local_experts
        first, n = (0, L) if expert is None else (int(expert), int(count))
        if not (0 <= first and n >= 1 and first + n <= L):
            raise ValueError(f"signal: experts [{first}, {first + n}) outside [0, {L})")
        if not 1 <= int(add) < 2 ** 31:
            raise ValueError(f"signal: add must be in [1, 2^31), got {add}")
        self._comm._check_usable()
        self._comm._rt.signal_ready(self, first, n, int(add), stream)

    def check(self, comm, fw: str):
        """(ArrayInfo of the counters, target) for a combine of ``comm`` with outputs of framework ``fw``."""
        if comm._id != self._comm_id:
            raise arrays.argument_error(InvalidStateError, "overlap", "overlap: these signals belong to another "
                                                                      "communicator")
        if comm.backend == "gpu" and self.framework != fw:
            raise arrays.argument_error(TypeError, "overlap", f"overlap: {self.framework} signals with {fw} "
                                                              "expert_output")
        info = arrays.check_array(self.counters, "overlap", shape=(comm.num_local_experts,),
                                  dtypes=("uint32", "int32"), device=comm.device, fw=self.framework)
        comm._rt.check_ready(self)
        return info, self.target


def counters_array(framework: str, L: int, device: int):
    """Zeroed [L] 32-bit counters in ``framework`` on ``device`` (numpy on the CPU backend)."""
    if framework == arrays.TORCH:
        import torch
        return torch.zeros(L, dtype=torch.int32, device=torch.device("cuda", device))
    if framework == arrays.CUPY:
        import cupy
        with cupy.cuda.Device(device):
            return cupy.zeros(L, dtype=np.uint32)
    return np.zeros(L, dtype=np.uint32)
