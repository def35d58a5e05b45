"""How a DeepEP call's stream arguments map onto ep: previous_event, async_finish, allocate_on_comm_stream.

DeepEP runs its ops on the Buffer's comm stream after ``previous_event`` (default: the caller's stream) and,
unless ``async_finish``, makes the caller's stream wait for it. ep's ``*_async`` ops do exactly the first half
(on ep's per-device comm stream, ``ep.overlap.comm_stream``); what this package computes around an op (dtype
conversions, padding) runs on that stream too, after the op, so the returned event covers it.
"""
from __future__ import annotations

import contextlib

import torch

from ep.overlap import comm_stream

from .utils import EventHandle, EventOverlap


def check_stream_args(previous_event, async_finish: bool, allocate_on_comm_stream: bool) -> None:
    if previous_event is not None and not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event must be a deep_ep.EventOverlap or None, got {type(previous_event).__name__}")
    if allocate_on_comm_stream and (previous_event is None or not async_finish):
        raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True (as in DeepEP)")


def raw_event(previous_event):
    """What ep takes as previous_event: a torch.cuda.Event / ep.CommEvent, or None."""
    if previous_event is None or previous_event.event is None:
        return None
    return previous_event.event.raw


def wait_on_host(previous_event) -> None:
    """The host waits for previous_event (before reading device counts it covers)."""
    raw = raw_event(previous_event)
    if raw is not None:
        raw.synchronize()


class StreamPlan:
    """One call's streams. ``on_comm``: the op runs asynchronously on the comm stream (GPU backend with
    async_finish or previous_event); ``post()`` is the context of the conversions after it; ``finish(outputs)``
    returns the call's EventOverlap (a real event with async_finish, else None after the caller waited)."""

    def __init__(self, backend: str, device, previous_event, async_finish: bool):
        self.gpu = backend == "gpu"
        self.async_finish = async_finish
        self.on_comm = self.gpu and (async_finish or previous_event is not None)
        self.previous = raw_event(previous_event)
        self._comm = None
        if self.on_comm:
            index = device.index if isinstance(device, torch.device) else int(device)
            self._comm = torch.cuda.ExternalStream(comm_stream(index).ptr, device=index)
            self._caller = torch.cuda.current_stream()

    def post(self):
        return torch.cuda.stream(self._comm) if self.on_comm else contextlib.nullcontext()

    def run_on_comm(self):
        """Context for pure torch work of an async call (get_dispatch_layout): the comm stream, after
        previous_event or the caller's stream."""
        if not self.on_comm:
            return contextlib.nullcontext()
        if self.previous is not None:
            if isinstance(self.previous, torch.cuda.Event):
                self._comm.wait_event(self.previous)
            else:
                self.previous.wait(self._comm)
        else:
            self._comm.wait_stream(self._caller)
        return torch.cuda.stream(self._comm)

    def finish(self, outputs: tuple = ()) -> EventOverlap:
        if not self.on_comm:
            return EventOverlap(EventHandle(None) if self.async_finish else None)
        done = torch.cuda.Event()
        done.record(self._comm)
        for t in outputs:       # made on the comm stream, used and freed on the caller's
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(self._caller)
        if self.async_finish:
            return EventOverlap(EventHandle(done))
        self._caller.wait_event(done)
        return EventOverlap(None)
