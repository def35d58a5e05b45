"""Process groups: who the ranks are and how they exchange small host objects.

The only module that imports mpi4py or torch.distributed. A :class:`Group` wraps a private duplicate of the
caller's group, never the group itself, so a collective of ours can never pair with one of the caller's
(or with one of another communicator): an mpi4py communicator is duplicated (``Idup``), a torch.distributed
process group gets a gloo group of its own over the same ranks. Every collective is bounded by the group's
``timeout_s`` and raises :class:`EPTimeoutError` naming the ranks it waited for.

``group=None`` means torch.distributed's world group when torch.distributed is initialized, else MPI's
COMM_WORLD; either must agree with the world size the launcher exported (else ConfigError naming group=).
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Any

from . import envs
from .errors import ConfigError, EPTimeoutError, InvalidStateError

log = logging.getLogger("ep.bootstrap")

# Host polls of a bounded collective sleep between tries, growing to this: ranks may outnumber cores (CI
# runs 8 ranks on 2 cores), and a busy poll would steal the time the late rank needs.
_POLL_SLEEP_MAX_S = 2e-3


class Group:
    """Ranks of one communicator. Construct with :func:`make_group`."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    timeout_s: float
    hosts: list

    def allgather(self, obj: Any, what: str = "allgather") -> list:
        """Every rank's ``obj`` (index = rank). ``what`` labels the collective: a rank in another collective
        of this group (a peer that left the program's order) raises InvalidStateError naming both."""
        raise NotImplementedError

    def alltoall(self, objs: list, what: str = "alltoall") -> list:
        raise NotImplementedError

    def barrier(self, what: str = "barrier", timeout_s: float | None = None) -> None:
        """``timeout_s``: this barrier's bound when it is not the group's (close waits for peers that may
        themselves be finishing a bounded wait)."""
        saved = self.timeout_s
        if timeout_s is not None:
            self.timeout_s = timeout_s
        try:
            self.allgather(None, what)
        finally:
            self.timeout_s = saved

    def close(self) -> None:
        """Free the private duplicate (local, not collective)."""

    def duplicate(self, timeout_s: float) -> "Group":
        """Collective: a private duplicate of this group (a communicator built on a Group gets its own)."""
        raise NotImplementedError

    def _set_local(self) -> None:
        hosts = self.allgather(socket.gethostname(), "bootstrap")
        self.hosts = hosts
        mine = hosts[self.rank]
        same = [r for r, h in enumerate(hosts) if h == mine]
        self.local_size = len(same)
        launcher = envs.launcher_local_rank()
        self.local_rank = launcher if launcher is not None and launcher < self.local_size else same.index(self.rank)


def _sleep(spins: int) -> None:
    time.sleep(min(_POLL_SLEEP_MAX_S, 1e-5 * (1 << min(spins, 8))))


def _unwrap(rank: int, src: int, what: str, message) -> Any:
    """The payload of a labelled message from ``src``; a message of another collective raises."""
    label, payload = message
    if label != what:
        raise InvalidStateError(f"rank {src} is in the collective '{label}' while rank {rank} is in '{what}': the "
                                "ranks left the same order of calls (one rank raised where the others did not?)")
    return payload


class MPIGroup(Group):
    """A private duplicate of an mpi4py communicator; collectives are tagged point-to-point messages polled
    until every peer's arrived or ``timeout_s`` passed."""

    def __init__(self, comm, timeout_s: float):
        from mpi4py import MPI
        self._MPI = MPI
        self.timeout_s = float(timeout_s)
        dup, request = comm.Idup()
        self.comm = dup
        self._tag = 0
        self.rank = dup.Get_rank()
        self.size = dup.Get_size()
        deadline = time.monotonic() + self.timeout_s
        spins = 0
        while not request.Test():
            if time.monotonic() > deadline:
                raise EPTimeoutError(f"duplicating the MPI communicator timed out after {self.timeout_s:.1f} s: some "
                                     "rank(s) of the group did not construct the communicator", phase="bootstrap")
            spins += 1
            _sleep(spins)
        self._set_local()

    def _exchange(self, outgoing: dict, what: str) -> dict:
        """Send outgoing[d] to every rank d != rank and receive one object from each; bounded."""
        MPI = self._MPI
        self._tag = self._tag % 30000 + 1
        tag = self._tag
        sends = [self.comm.isend((what, obj), dest=d, tag=tag) for d, obj in outgoing.items()]
        pending = [r for r in range(self.size) if r != self.rank]
        got: dict = {}
        deadline = time.monotonic() + self.timeout_s
        spins = 0
        while True:
            for src in list(pending):
                if self.comm.iprobe(source=src, tag=tag):
                    got[src] = _unwrap(self.rank, src, what, self.comm.recv(source=src, tag=tag))
                    pending.remove(src)
            sent, _ = MPI.Request.testall(sends)
            if not pending and sent:
                return got
            if time.monotonic() > deadline:
                waiting = pending or sorted(outgoing)
                for req in sends:   # best effort: a message a dead peer never takes must not block MPI_Finalize
                    try:
                        req.Cancel()
                    except Exception:
                        pass
                raise EPTimeoutError(f"host {what} timed out after {self.timeout_s:.1f} s waiting for rank(s) "
                                     f"{waiting}", phase=f"host {what}", rank=self.rank,
                                     peer=waiting[0] if waiting else -1)
            spins += 1
            _sleep(spins)

    def allgather(self, obj, what: str = "allgather"):
        got = self._exchange({d: obj for d in range(self.size) if d != self.rank}, what)
        got[self.rank] = obj
        return [got[r] for r in range(self.size)]

    def alltoall(self, objs, what: str = "alltoall"):
        if len(objs) != self.size:
            raise ValueError(f"alltoall needs {self.size} objects, got {len(objs)}")
        got = self._exchange({d: objs[d] for d in range(self.size) if d != self.rank}, what)
        got[self.rank] = objs[self.rank]
        return [got[r] for r in range(self.size)]

    def duplicate(self, timeout_s: float) -> "MPIGroup":
        return MPIGroup(self.comm, timeout_s)

    def close(self) -> None:
        comm, self.comm = getattr(self, "comm", None), None
        if comm is not None:
            try:
                comm.Free()
            except Exception as exc:   # a broken peer may leave requests behind; freeing is best effort
                log.debug("[rank %d] freeing the private MPI communicator: %s", self.rank, exc)


class TorchGroup(Group):
    """A private gloo group over the ranks of a torch.distributed process group; collectives are bounded by
    the group's timeout (gloo raises when it passes)."""

    def __init__(self, pg, timeout_s: float):
        import datetime

        import torch.distributed as dist
        if not dist.is_initialized():
            raise ConfigError("torch.distributed is not initialized; call init_process_group first")
        self._dist = dist
        self.timeout_s = float(timeout_s)
        ranks = dist.get_process_group_ranks(pg) if pg is not None else list(range(dist.get_world_size()))
        self._ranks = ranks
        self.pg = dist.new_group(ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s),
                                 use_local_synchronization=True)
        self.rank = dist.get_rank(self.pg)
        self.size = dist.get_world_size(self.pg)
        self._set_local()

    def _bounded(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            text = str(exc)
            if "imeout" in text or "timed out" in text:
                raise EPTimeoutError(f"host {what} timed out after {self.timeout_s:.1f} s: {text}",
                                     phase=f"host {what}", rank=self.rank) from None
            raise

    def allgather(self, obj, what: str = "allgather"):
        out = [None] * self.size
        self._bounded(what, self._dist.all_gather_object, out, (what, obj), group=self.pg)
        return [_unwrap(self.rank, r, what, m) for r, m in enumerate(out)]

    def alltoall(self, objs, what: str = "alltoall"):
        # Object all-to-all through allgather: the CPU backend's volumes are small.
        everything = self.allgather(objs, what)
        return [everything[src][self.rank] for src in range(self.size)]

    def barrier(self, what: str = "barrier", timeout_s: float | None = None):
        import datetime
        self._bounded(what, self._dist.monitored_barrier, group=self.pg,
                      timeout=datetime.timedelta(seconds=timeout_s or self.timeout_s))

    def duplicate(self, timeout_s: float) -> "TorchGroup":
        return TorchGroup(self.pg, timeout_s)

    def close(self) -> None:
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None:
            try:
                self._dist.destroy_process_group(pg)
            except Exception as exc:
                log.debug("[rank %d] destroying the private gloo group: %s", self.rank, exc)


def _world_group():
    """What group=None means: torch.distributed's world when it is initialized, else MPI.COMM_WORLD."""
    if envs.torch_distributed_ready():
        import torch.distributed as dist
        return dist.group.WORLD, "torch.distributed's world group"
    from mpi4py import MPI
    return MPI.COMM_WORLD, "MPI.COMM_WORLD"


def make_group(group=None, timeout_s: float = 60.0) -> Group:
    """A private, bounded Group over ``group``: None (see the module doc), an mpi4py communicator or a
    torch.distributed ProcessGroup, or a Group (duplicated too)."""
    if isinstance(group, Group):
        return group.duplicate(timeout_s)
    implicit = group is None
    label = None
    if implicit:
        group, label = _world_group()
    module = type(group).__module__
    if module.startswith("mpi4py"):
        out: Group = MPIGroup(group, timeout_s)
    elif module.startswith("torch"):
        out = TorchGroup(group, timeout_s)
    else:
        raise ConfigError(f"group must be an mpi4py communicator, a torch.distributed ProcessGroup or None, "
                          f"got {type(group).__name__}")
    if implicit:
        launched = envs.launcher_world_size()
        if launched is not None and launched[1] != out.size:
            var, size = launched
            out.close()
            raise ConfigError(f"group=None means {label}, which has {out.size} rank(s), but the launcher started "
                              f"{size} ({var}={size}); pass group= explicitly (an mpi4py communicator or a "
                              "torch.distributed process group), e.g. group=torch.distributed.group.WORLD after "
                              "init_process_group under torchrun")
    return out


def bind_device(group: Group, shared_gpu: bool = False) -> int:
    """Make CuPy's current device the one of this node-local rank; returns the device id. More ranks on a
    node than GPUs need ``shared_gpu`` (they then share GPUs round-robin: correctness tests only)."""
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except ImportError:
        raise ConfigError("the GPU backend needs CuPy (pip install 'ep[cuda13]' or 'ep[cuda12]')") from None
    except Exception as exc:
        raise ConfigError(f"the GPU backend found no usable CUDA driver or device ({type(exc).__name__}: {exc}); "
                          "install the NVIDIA driver, or use EP_BACKEND=cpu / backend='cpu'") from None
    if count < 1:
        raise ConfigError("the GPU backend found no CUDA device; use EP_BACKEND=cpu / backend='cpu'")
    if group.local_size > count and not shared_gpu:
        raise ConfigError(f"{group.local_size} ranks on this node but only {count} GPU(s) are visible; for "
                          "correctness tests, let ranks share GPUs with shared_gpu=True (or EP_SHARED_GPU=1)")
    device = group.local_rank % count
    cupy.cuda.Device(device).use()
    return device

