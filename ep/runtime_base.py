"""What the GPU mode runtimes share: kernel loading, the error record, barriers, knob-derived sizes."""
from __future__ import annotations

import logging
from typing import Sequence


from . import jit, structs
from .bootstrap import Group
from .config import MoECommunicatorConfig
from .envs import Snapshot
from .errors import ConfigError
from .peer_memory import ErrorRecord, SymmetricBuffer

log = logging.getLogger("ep.runtime")


def load_kernels(group: Group, knobs: Snapshot, wanted: Sequence[tuple[jit.KernelVariant, Sequence[str]]]) -> dict:
    """Load every (variant, entries); node-local rank 0 compiles into the disk cache first, the others
    load after a barrier so a cold cache is compiled once per node. Returns {entry: Kernel}."""
    def load_all():
        out = {}
        for variant, entries in wanted:
            out.update(jit.load(variant, entries, knobs))
        return out

    if group.local_rank == 0:
        kernels = load_all()
        group.barrier()
    else:
        group.barrier()
        kernels = load_all()
    return kernels


def sm_count() -> int:
    import cupy
    return int(cupy.cuda.Device().attributes["MultiProcessorCount"])


def block_count(cfg: MoECommunicatorConfig, knob_value: int, overlap_value: int | None, what: str) -> int:
    """Blocks of a data kernel: env knob, else the overlap config, else num_sms. The grid must be
    co-resident (receivers spin on senders of other blocks), so it may not exceed the SM count."""
    blocks = knob_value or overlap_value or cfg.num_sms
    sms = sm_count()
    if blocks > sms:
        raise ConfigError(f"{what}: {blocks} blocks requested but the GPU has {sms} SMs (the grid must be co-resident)")
    return blocks


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


def timeout_ns(cfg: MoECommunicatorConfig, knobs: Snapshot) -> int:
    seconds = knobs.timeout_s or cfg.timeout_s
    return int(seconds * 1e9)

