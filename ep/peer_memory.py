"""Symmetric device buffers shared over CUDA IPC, mapped pinned host memory, and the error record.

Each :class:`SymmetricBuffer` is its own cudaMalloc allocation (never pool memory: a pool block shares
its IPC handle with its neighbours). Every rank allocates the same size, exports an IPC handle, all-gathers
the handles, opens each peer's once, and keeps a device table ``peers[W]`` of base addresses (its own at
index rank) that kernels index to write or read a peer directly over NVLink.
"""
from __future__ import annotations

import ctypes
import logging
import time

import numpy as np

from .bootstrap import Group
from .constants import PHASE_NAMES
from .errors import EPTimeoutError
from .structs import ERROR_RECORD

log = logging.getLogger("ep.peer_memory")


class SymmetricBuffer:
    """``nbytes`` of device memory on every rank of ``group``, each rank able to address all of them."""

    def __init__(self, group: Group, nbytes: int, name: str):
        import cupy
        from cupy.cuda import runtime
        self.name = name
        self.nbytes = int(max(nbytes, 256))
        self.rank = group.rank
        self._opened: list[int] = []
        self.ptr = runtime.malloc(self.nbytes)
        try:
            runtime.memset(self.ptr, 0, self.nbytes)
            handle = bytes(runtime.ipcGetMemHandle(self.ptr)) if group.size > 1 else b""
            handles = group.allgather(handle, f"ipc handles of {name}")
            ptrs = []
            for r, h in enumerate(handles):
                if r == group.rank:
                    ptrs.append(self.ptr)
                else:
                    p = runtime.ipcOpenMemHandle(h, runtime.cudaIpcMemLazyEnablePeerAccess)
                    self._opened.append(p)
                    ptrs.append(p)
            self.peer_ptrs = ptrs
            self.table = cupy.asarray(np.array(ptrs, dtype=np.uint64))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unmap the peers' buffers and free ours. Callers barrier before (peers done) as needed."""
        from cupy.cuda import runtime
        for p in self._opened:
            try:
                runtime.ipcCloseMemHandle(p)
            except Exception as exc:   # keep freeing the rest
                log.warning("[rank %d] ipcCloseMemHandle(%s) failed: %s", self.rank, self.name, exc)
        self._opened = []
        if getattr(self, "ptr", 0):
            runtime.free(self.ptr)
            self.ptr = 0
        self.table = None


class HostMapped:
    """Pinned host memory mapped into the device address space (UVA: same address on both sides)."""

    def __init__(self, nbytes: int):
        from cupy.cuda import runtime
        self.nbytes = int(nbytes)
        self.ptr = runtime.hostAlloc(self.nbytes, runtime.hostAllocMapped | runtime.hostAllocPortable)
        ctypes.memset(self.ptr, 0, self.nbytes)

    def view(self, dtype, count: int | None = None, offset: int = 0) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = (self.nbytes - offset) // dtype.itemsize if count is None else count
        buf = (ctypes.c_char * (n * dtype.itemsize)).from_address(self.ptr + offset)
        return np.frombuffer(buf, dtype=dtype, count=n)

    def close(self) -> None:
        from cupy.cuda import runtime
        if self.ptr:
            runtime.freeHost(self.ptr)
            self.ptr = 0




class ErrorRecord:
    """The host-visible record that kernels fill on a bounded-wait time-out (cuda_src/common/wait.cuh)."""

    def __init__(self):
        self._mem = HostMapped(ERROR_RECORD.itemsize)
        self.ptr = self._mem.ptr
        self._rec = self._mem.view(ERROR_RECORD, 1)
        # Read on every call: a ctypes word reads the memory on each .value, without NumPy's per-access cost.
        self._flag = ctypes.c_uint32.from_address(self.ptr + ERROR_RECORD.fields["flag"][1])

    def raised(self) -> bool:
        return self._flag.value != 0

    def fields(self) -> dict:
        r = self._rec[0]
        return {"phase": PHASE_NAMES.get(int(r["phase"]), str(int(r["phase"]))), "rank": int(r["rank"]),
                "peer": int(r["peer"]), "observed": int(r["observed"]), "expected": int(r["expected"])}

    def clear(self) -> None:
        self._rec["flag"] = 0
        self._rec["claim"] = 0

    def as_timeout(self) -> EPTimeoutError:
        f = self.fields()
        return EPTimeoutError(
            f"rank {f['rank']} timed out in phase '{f['phase']}' waiting for rank {f['peer']} "
            f"(observed {f['observed']}, expected >= {f['expected']}); the communicator is unusable",
            phase=f["phase"], rank=f["rank"], peer=f["peer"], observed=f["observed"], expected=f["expected"])

    def close(self) -> None:
        self._mem.close()


def host_wait(predicate, timeout_s: float, what: str, error: ErrorRecord | None = None) -> None:
    """Spin (then sleep briefly) until ``predicate()``; raise on time-out or when a kernel reported one."""
    deadline = time.monotonic() + timeout_s
    spins = 0
    while not predicate():
        if error is not None and error.raised():
            raise error.as_timeout()
        if time.monotonic() > deadline:
            raise EPTimeoutError(f"host wait for {what} timed out after {timeout_s:.1f} s", phase=what)
        spins += 1
        if spins > 2000:
            time.sleep(20e-6)
