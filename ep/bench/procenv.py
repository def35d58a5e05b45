"""The benchmark's process environment: the one place in ep.bench that reads or sets ``os.environ``.

NOTE: this is a stated exception to the rule that only ``ep/envs.py`` reads the environment. ep's own
knobs are still read only through :func:`ep.envs.read`; what this module touches is the launcher's and
NCCL's environment, which a command-line benchmark (not the library) has to read to join the job and has
to set before NCCL starts:
- ``NCCL_NVLS_ENABLE=0`` (NVLink multicast stays off: it can take a shared host's GPUs out of service);
- ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE`` for torch.distributed's ``env://`` rendezvous
  when the job was started by mpirun (set only where unset);
- torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` to tell a torchrun job from an mpirun one.
"""
from __future__ import annotations

import os

TORCHRUN_MARKER = "TORCHELASTIC_RUN_ID"   # torchrun (torch.distributed.run) exports it to every worker


def get(name: str) -> str | None:
    return os.environ.get(name)


def setdefault(name: str, value: str) -> str:
    """Set ``name`` unless it is already set; return the value in effect."""
    return os.environ.setdefault(name, value)


def launched_by_torchrun() -> bool:
    return TORCHRUN_MARKER in os.environ and "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) exported by torchrun."""
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def nccl_setup() -> None:
    """Before any NCCL communicator exists: NVLink multicast (NVLS) off unless the caller chose."""
    setdefault("NCCL_NVLS_ENABLE", "0")
