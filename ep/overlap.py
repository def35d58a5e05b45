"""Overlapping communication with compute: async ops on a communication stream, and the per-expert readiness
signals of a block-level overlapped LL combine.

Async ops (``MoECommunicator.dispatch_async`` / ``combine_async``): the op runs on the communicator's own
stream after ``previous_event`` (default: everything queued so far on the caller's stream) and returns a
:class:`CommEvent` the caller joins with ``current_stream_wait()`` before it reads the outputs.

Memory discipline. Inputs and outputs stay referenced by the event until it is joined or found complete.
torch: outputs are allocated on the caller's stream and every torch input and output is marked used by the
comm stream (``record_stream``, outside CUDA graph capture), so the caching allocator never hands their
memory out while the comm stream still works on it. CuPy: outputs come from the comm stream's pool; an async
op waiting on the caller's stream (the default) is ordered after everything the caller did with the
previous outputs, so reuse is safe; with an explicit ``previous_event`` the caller owns that ordering.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import arrays
from .errors import InvalidStateError


class CommEvent:
    """The completion of an async op on the communication stream.

    ``current_stream_wait()`` makes the caller's current stream (torch's for torch outputs, CuPy's otherwise)
    wait for the op; ``wait(stream)`` any stream; ``synchronize()`` the host; ``query()`` says whether it
    completed. On the CPU backend the op has completed when the call returns."""

    __slots__ = ("_event", "_framework", "_keep")

    def __init__(self, event, framework: str, keep: tuple = ()):
        self._event = event          # a CuPy event, or None (CPU backend: already complete)
        self._framework = framework
        self._keep = keep            # the op's arrays, alive until the op is joined

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
        self._keep = ()

    def synchronize(self) -> None:
        if self._event is not None:
            self._event.synchronize()
        self._keep = ()

    def query(self) -> bool:
        done = self._event is None or bool(self._event.done)
        if done:
            self._keep = ()
        return done


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
    """The join logic of a communicator's async ops on its device's comm stream."""

    def __init__(self, device: int):
        import cupy
        self.stream = comm_stream(device)
        self._start = cupy.cuda.Event(disable_timing=True)

    def enter(self, caller_stream, previous_event) -> None:
        """Order the comm stream after previous_event (or, when None, after the caller's stream so far)."""
        import cupy
        rt = cupy.cuda.runtime
        if previous_event is None:
            rt.eventRecord(self._start.ptr, caller_stream.ptr)
            raw = self._start.ptr
        else:
            raw = event_pointer(previous_event)
        if raw:
            rt.streamWaitEvent(self.stream.ptr, raw, 0)

    def leave(self, framework: str, arrays_used: tuple) -> CommEvent:
        """The op's completion event; torch arrays are marked used by the comm stream."""
        import cupy
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self.stream)
        if framework == arrays.TORCH:
            _record_stream(arrays_used, self.stream.ptr)
        return CommEvent(done, framework, arrays_used)


def _record_stream(objs: tuple, stream_ptr: int) -> None:
    import torch
    if torch.cuda.is_current_stream_capturing():   # graph memory is not freed between replays
        return
    ext = torch.cuda.ExternalStream(stream_ptr)
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
        info = arrays.describe(self.counters, "overlap.counters", self.framework)
        comm._rt.check_ready(self)
        return info, self.target


def counters_array(framework: str, L: int):
    """Zeroed [L] 32-bit counters in ``framework`` (numpy on the CPU backend)."""
    if framework == arrays.TORCH:
        import torch
        return torch.zeros(L, dtype=torch.int32, device=torch.device("cuda", torch.cuda.current_device()))
    if framework == arrays.CUPY:
        import cupy
        return cupy.zeros(L, dtype=np.uint32)
    return np.zeros(L, dtype=np.uint32)
