"""The runtime protocol every backend implements, and what the GPU runtimes share: kernel loading, the error
records, barriers.

A runtime takes the communicator's validated call records (ep/calls.py) and nothing else:

    prepare()                  build lazily created resources (collective; idempotent)
    agree(op, failure)         the op's first rendezvous: share the outcome of this rank's input checks of
                               ``op`` with the peers before anything moves (the op gate), raising on every
                               rank when one failed (ep/validation.py settle)
    take_input_error()         an input error found on the device in an earlier call (LL's invalid expert
                               ids), reported in the next call's agree
    dispatch(call)             -> (DispatchOutput, state kept in the handle, receive hook or None)
    combine(call)              -> ([T, H] output, receive hook or None)
    check_handle(state)        raise InvalidStateError when a handle can no longer be combined
    same_routing(state, ids)   whether topk_ids equal the routing of a handle (EP_DEBUG_CHECKS)
    check_errors()             raise a time-out the device reported (EPTimeoutError: the communicator is
                               broken from then on)
    synchronize()              wait for this rank's queued work
    close()                    free (the communicator runs the barriers around it)
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from . import jit, structs, validation
from .bootstrap import Group
from .calls import CombineCall, DispatchCall
from .gate import OpGate
from .peer_memory import ErrorRecord, SymmetricBuffer
from .tuning import KernelSet

log = logging.getLogger("ep.runtime")


class Runtime:
    """Base of the backends: the protocol above, with the defaults most runtimes share."""

    group: Group
    gate: OpGate | None = None

    def open_gate(self, timeout_s: float) -> None:
        """Collective: the node-shared op gate, or host collectives when shared memory cannot be mapped or the
        ranks span hosts (the gate is one host's shared-memory page)."""
        if len(set(self.group.hosts)) > 1:
            self.gate = None
            return
        try:
            self.gate = OpGate(self.group, timeout_s)
        except OSError as exc:
            log.warning("[rank %d] op gate unavailable (%s); ops agree through host collectives", self.group.rank,
                        exc)
            self.gate = None

    def prepare(self) -> None:
        pass

    def agree(self, op: str, failure: BaseException | None) -> None:
        if self.group.size == 1:
            return   # nobody to tell: a failing rank raises its own error
        code = 0 if failure is None else validation.abort_code(failure)
        if self.gate is not None:
            words = self.gate.pass_(validation.OP_KINDS[op], code)
            if words is None:
                return   # every rank called this op and passed its checks
            outcomes = [(validation.OP_NAMES.get(k, f"op {k}"), c) for k, c in words]
        else:
            outcomes = self.group.allgather((op, code), "agree")
        validation.settle(self.group.rank, op, failure, outcomes)

    def take_input_error(self) -> BaseException | None:
        return None

    def dispatch(self, call: DispatchCall) -> tuple[Any, Any]:
        raise NotImplementedError

    def combine(self, call: CombineCall) -> Any:
        raise NotImplementedError

    def check_handle(self, state) -> None:
        pass

    def check_pending(self, op: str, hook: bool) -> None:
        """Raise InvalidStateError when this ``op`` (with or without a receive hook) may not start now."""

    def same_routing(self, state, topk_ids) -> bool:
        raise NotImplementedError

    def row_sources(self, state, framework: str, stream):
        """LL: (src_token [L, cap] int32, src_counts [L, W] int32) of a handle's dispatch (communicator doc)."""
        raise NotImplementedError

    def signal_ready(self, signals, first: int, count: int, add: int, stream) -> None:
        """OverlapSignals.signal: add ``add`` to counters [first, first + count) after ``stream``'s work."""
        raise NotImplementedError

    def check_ready(self, signals) -> None:
        """Checks of an overlapped combine's signals before the launch (the CPU backend's: every counter
        reached its target, else the GPU combine would wait until timeout_s)."""

    def check_errors(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        if self.gate is not None:
            self.gate.close()
            self.gate = None


class GpuRuntime(Runtime):
    """What the GPU runtimes share: the time-out record."""

    err: ErrorRecord

    def check_errors(self) -> None:
        if self.err.raised():
            raise self.err.as_timeout()

    def synchronize(self) -> None:
        import cupy
        cupy.cuda.runtime.deviceSynchronize()


def load_kernels(group: Group, wanted: Sequence[KernelSet]) -> dict:
    """Load every kernel set; node-local rank 0 compiles into the disk cache first, the others load after a
    barrier so a cold cache is compiled once per node. Returns {entry: Kernel}."""
    def load_all():
        out = {}
        for ks in wanted:
            out.update(jit.load(ks.variant, ks.entries))
        return out

    if group.local_rank == 0:
        kernels = load_all()
        group.barrier("compile")
    else:
        group.barrier("compile")
        kernels = load_all()
    return kernels


class Barrier:
    """ep_barrier with its generation counted on the device (so CUDA graph replays advance it too)."""

    def __init__(self, kernel, sig: SymmetricBuffer, flags_offset: int, err: ErrorRecord, rank: int, world: int,
                 timeout_ns: int):
        import cupy
        import numpy as np
        self.kernel = kernel
        self.generation = cupy.zeros(1, np.uint64)
        cupy.cuda.runtime.deviceSynchronize()   # zero before a launch on any (non-blocking) stream reads it
        self._params = structs.pack(structs.BARRIER_PARAMS, sig_peers=sig.table.data.ptr, err=err.ptr,
                                    generation=self.generation.data.ptr, timeout_ns=timeout_ns,
                                    flags_offset=flags_offset, rank=rank, world=world)

    def __call__(self, stream) -> None:
        self.kernel.launch(1, 32, self._params, stream=stream)


def ptr(arr) -> int:
    """Device pointer of a CuPy array (0 for None)."""
    return 0 if arr is None else int(arr.data.ptr)




