"""EventHandle and EventOverlap, where DeepEP V1 callers import them from (``deep_ep.utils``)."""
from __future__ import annotations

from typing import Any

import torch


def _cuda() -> bool:
    return torch.cuda.is_available()


class EventHandle:
    """A point on a stream: by default now, on torch's current stream. Without CUDA (ep's CPU backend, where
    every op has completed when it returns) it is a completed event."""

    def __init__(self, event: Any = None):
        if event is None and _cuda():
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
        self._event = event       # a torch.cuda.Event, an ep.CommEvent, or None (complete)

    @property
    def raw(self):
        """What ep takes as previous_event (None: nothing to wait for)."""
        return self._event

    def current_stream_wait(self) -> None:
        ev = self._event
        if ev is None:
            return
        if isinstance(ev, torch.cuda.Event):
            torch.cuda.current_stream().wait_event(ev)
        else:
            ev.current_stream_wait()


class EventOverlap:
    """An optional EventHandle and tensors kept alive with it. ``current_stream_wait()`` needs an event; as a
    context manager, leaving the block waits for it (if any)."""

    def __init__(self, event: EventHandle | None = None, extra_tensors: tuple | None = None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        assert self.event is not None, "EventOverlap.current_stream_wait: this overlap holds no event"
        self.event.current_stream_wait()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.event is not None:
            self.event.current_stream_wait()
        return False


__all__ = ["EventHandle", "EventOverlap"]
