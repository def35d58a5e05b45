"""Process groups: who the ranks are and how they exchange small host objects.

The only module that imports mpi4py or torch.distributed. A :class:`Group` wraps either an mpi4py
communicator (default ``MPI.COMM_WORLD``) or a torch.distributed process group, and offers rank, size,
node-local rank, allgather of picklable objects, alltoall (CPU backend) and a barrier.
"""
from __future__ import annotations

import logging
import socket
from typing import Any

from . import envs
from .errors import ConfigError

log = logging.getLogger("ep.bootstrap")


class Group:
    """Ranks of one communicator. Construct with :func:`make_group`."""

    rank: int
    size: int
    local_rank: int
    local_size: int

    def allgather(self, obj: Any) -> list:
        raise NotImplementedError

    def alltoall(self, objs: list) -> list:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def allreduce_max(self, value: int) -> int:
        return max(self.allgather(value))

    def _set_local(self) -> None:
        hosts = self.allgather(socket.gethostname())
        mine = hosts[self.rank]
        same = [r for r, h in enumerate(hosts) if h == mine]
        self.local_size = len(same)
        launcher = envs.launcher_local_rank()
        self.local_rank = launcher if launcher is not None else same.index(self.rank)
        if len(set(hosts)) != 1:
            raise ConfigError(f"ep is intranode: all ranks must share one node, got hosts {sorted(set(hosts))}")


class MPIGroup(Group):
    def __init__(self, comm=None):
        from mpi4py import MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._set_local()

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def alltoall(self, objs):
        return self.comm.alltoall(objs)

    def barrier(self):
        self.comm.Barrier()


class TorchGroup(Group):
    def __init__(self, pg=None):
        import torch.distributed as dist
        if not dist.is_initialized():
            raise ConfigError("torch.distributed is not initialized; call init_process_group first")
        self._dist = dist
        self.pg = pg
        self.rank = dist.get_rank(pg)
        self.size = dist.get_world_size(pg)
        self._set_local()

    def allgather(self, obj):
        out = [None] * self.size
        self._dist.all_gather_object(out, obj, group=self.pg)
        return out

    def alltoall(self, objs):
        # Object all-to-all through allgather: CPU backend only, where volumes are small.
        everything = self.allgather(objs)
        return [everything[src][self.rank] for src in range(self.size)]

    def barrier(self):
        self._dist.barrier(group=self.pg)


def make_group(group=None) -> Group:
    """Wrap ``group``: None (MPI.COMM_WORLD), an mpi4py communicator, a torch ProcessGroup or a Group."""
    if isinstance(group, Group):
        return group
    if group is None:
        return MPIGroup()
    module = type(group).__module__
    if module.startswith("mpi4py"):
        return MPIGroup(group)
    if module.startswith("torch"):
        return TorchGroup(group)
    raise ConfigError(f"group must be an mpi4py communicator, a torch.distributed ProcessGroup or None, got {type(group)}")


def bind_device(group: Group) -> int:
    """Make CuPy's current device the one of this node-local rank; returns the device id."""
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    if count < 1:
        raise ConfigError("no CUDA device visible")
    if group.local_size > count:
        raise ConfigError(f"{group.local_size} ranks on this node but only {count} GPUs are visible")
    device = group.local_rank % count
    cupy.cuda.Device(device).use()
    return device
