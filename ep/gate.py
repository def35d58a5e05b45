"""The op gate: the host rendezvous every eager GPU op passes before it launches anything.

Each rank publishes, per op, one 64-bit word ``seq << 16 | kind << 8 | status`` (op kind; 0 = its input
checks passed, else an abort code of ep.validation) in a page of node-shared memory, and waits (bounded) until
every rank has published the same op. So one rank's bad input makes every rank raise in that same call,
naming it (PeerInputError), before any kernel is launched: nothing moves and the communicator stays usable.
Two ranks calling different ops (a cached dispatch against an uncached one) raise too. The gate costs a
few microseconds when the ranks arrive together and never waits for the GPU; graph replays pass no gate
(their ops were checked when they were captured).

Words alternate between two slots per rank by op parity: a rank can be at most one op ahead of the slowest
(it passed the previous gate only after everyone published it), so the slot the slowest rank still reads is
never overwritten. One aligned 8-byte store per op, so a reader never sees half a word.
"""
from __future__ import annotations

import logging
import mmap
import os
import secrets
import tempfile
import time

from .bootstrap import Group
from .errors import EPTimeoutError

log = logging.getLogger("ep.gate")

_SPIN_S = 200e-6        # busy-poll this long before sleeping between polls
_SLEEP_MAX_S = 1e-3
_LINE_WORDS = 8         # one 64-byte line per rank: no false sharing between ranks' stores


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class OpGate:
    """Collective to build: node-local, so every rank of ``group`` must share one host (ep is intranode).
    Raises OSError on every rank when the shared page cannot be mapped on some rank (the caller falls back
    to host collectives)."""

    def __init__(self, group: Group, timeout_s: float):
        self.rank, self.size, self.timeout_s = group.rank, group.size, float(timeout_s)
        self.seq = 0
        nbytes = self.size * _LINE_WORDS * 8
        path = None
        if group.rank == 0:
            path = os.path.join(_shm_dir(), f"ep-gate-{os.getpid()}-{secrets.token_hex(8)}")
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, nbytes)
            os.close(fd)
        path = group.allgather(path, "gate")[0]
        error = None
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                self._map = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        errors = group.allgather(error, "gate")
        if group.rank == 0:
            os.unlink(path)   # every rank has it mapped (or failed): the name is no longer needed
        if any(errors):
            bad = [r for r, e in enumerate(errors) if e]
            raise OSError(f"the op gate's shared page could not be mapped on rank(s) {bad}: {errors[bad[0]]}")
        # 8-byte words as Python ints: one aligned load or store per word, without NumPy's per-call cost.
        self._words = memoryview(self._map).cast("Q")
        self._columns = tuple(tuple(r * _LINE_WORDS + slot for r in range(self.size)) for slot in (0, 1))

    def pass_(self, kind: int, status: int) -> list[tuple[int, int]] | None:
        """Publish (kind, status) for the next op and wait for every rank's. Returns None when every rank
        published this op's kind with status 0 (the common case), else [(kind, status)] by rank."""
        self.seq += 1
        seq, slot = self.seq, self.seq & 1
        word = (seq << 16) | ((kind & 0xFF) << 8) | (status & 0xFF)
        words, column = self._words, self._columns[slot]
        words[column[self.rank]] = word
        start = time.monotonic()
        deadline = start + self.timeout_s
        sleep = 1e-5
        while True:
            values = [words[i] for i in column]
            if values.count(word) == self.size and not status:
                return None
            if min(values) >> 16 >= seq:
                return [((v >> 8) & 0xFF, v & 0xFF) for v in values]
            now = time.monotonic()
            if now > deadline:
                late = [r for r in range(self.size) if values[r] >> 16 < seq]
                raise EPTimeoutError(f"rank(s) {late} did not reach op {seq} within {self.timeout_s:.1f} s (a rank "
                                     "died, or stopped calling dispatch/combine in the same order)",
                                     phase="op gate", rank=self.rank, peer=late[0])
            if now - start > _SPIN_S:
                time.sleep(sleep)
                sleep = min(2 * sleep, _SLEEP_MAX_S)

    def close(self) -> None:
        words, self._words = getattr(self, "_words", None), None
        if words is not None:
            words.release()
        m, self._map = getattr(self, "_map", None), None
        if m is not None:
            try:
                m.close()
            except BufferError:   # a view is still alive somewhere; the mapping goes with the process
                pass
