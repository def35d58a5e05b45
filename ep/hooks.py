"""Receive hooks of split LL ops (``return_recv_hook=True``) and the rules every backend applies to them and
to LL handles."""
from __future__ import annotations

from .errors import InvalidStateError


class RecvHook:
    """Launches the receive half of an LL op once, on the stream of its send half (``hook()``). ``waiting``:
    the op's hooks not called yet, oldest first (shared by them): the receive halves find their op by a device
    sequence number, so they must run in the order of their sends."""

    __slots__ = ("_launch", "_done", "what", "_waiting")

    def __init__(self, launch, done: list, what: str, waiting: list):
        self._launch, self._done, self.what, self._waiting = launch, done, what, waiting
        waiting.append(done)

    def __call__(self) -> None:
        if self._done[0]:
            raise InvalidStateError(f"the receive hook of this {self.what} was already called")
        if self._waiting[0] is not self._done:
            raise InvalidStateError(f"an older LL {self.what} still waits for its receive hook; call the hooks in the "
                                    f"order of their {self.what}es")
        self._waiting.pop(0)
        self._done[0] = True
        self._launch()


def check_pending(pending: dict, op: str, hook: bool) -> None:
    """The hook rules of an LL op, shared by the GPU and CPU backends."""
    if hook and pending[op] >= 2:
        raise InvalidStateError(f"two LL {op}es already wait for their receive hook; call one before the next {op}")
    if not hook and pending[op]:
        raise InvalidStateError(f"an LL {op} waits for its receive hook; call it before a {op} without one (the "
                                "receive halves run in the order of their sends)")


def check_combinable(received: bool, age: int | None) -> None:
    """A handle may be combined once its dispatch's receive half ran and, in LL (``age``: dispatches sent
    since, None in HT), while that dispatch is one of the last two sent (two buffers)."""
    if not received:
        raise InvalidStateError("this dispatch's receive hook has not been called yet; call hook() before "
                                "combining its outputs")
    if age is not None and age not in (0, 1):
        raise InvalidStateError(f"LL handle is {age} dispatches old; LL keeps the last two dispatches only")
