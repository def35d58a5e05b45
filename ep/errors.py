"""Typed errors of ep. Every error the library raises derives from EPError."""
from __future__ import annotations


class EPError(RuntimeError):
    """Base class of every ep error."""


class ConfigError(EPError, ValueError):
    """A configuration value or an environment knob is invalid."""


class CompileError(EPError):
    """NVRTC rejected a kernel variant; the message carries the variant name and the compiler log."""


class InvalidStateError(EPError):
    """The communicator is closed, broken by an earlier failure, or a handle does not fit this call."""


class CapacityError(EPError, ValueError):
    """More tokens than the communicator's buffers were sized for (T > max_tokens_per_rank).

    Receive buffers hold W * max_tokens_per_rank tokens per rank, the worst case, and every rank checks
    its own T before anything is sent, so a receiver can never be overrun."""


class PeerInputError(EPError, ValueError):
    """Another rank's input failed its checks in the same collective call: every rank raises together (the
    failing rank its own ValueError/TypeError), nothing was sent, and the communicator stays usable. A
    ValueError, so ``except ValueError`` recovers on every rank."""


class EPTimeoutError(EPError, TimeoutError):
    """A bounded wait expired. Fields say who waited for whom and in which phase.

    After a device-side time-out the communicator refuses further calls: peer buffers may hold
    half-written data of the failed call.
    """

    def __init__(self, message: str, *, phase: str = "", rank: int = -1, peer: int = -1,
                 observed: int = 0, expected: int = 0):
        super().__init__(message)
        self.phase = phase
        self.rank = rank
        self.peer = peer
        self.observed = observed
        self.expected = expected
