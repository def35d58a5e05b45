"""GPU-only helpers of the benchmark: device checks, the device barrier, inputs on the device, facts about
the machine. Imported only when the backend is gpu (the CPU path never imports CuPy through here)."""
from __future__ import annotations

import logging
import re

import numpy as np

from .. import jit, runtime_base
from ..peer_memory import ErrorRecord, SymmetricBuffer
from ..tuning import KernelSet

log = logging.getLogger("ep.bench")

DEVICE_BARRIER_TIMEOUT_S = 60.0   # a peer that never arrives is a hang, not a slow rank


def visible_gpus() -> int:
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


class DeviceBarrier:
    """ep_barrier (cuda_src/barrier.cu) over the bench's own signal buffer: every rank leaves it within
    a few microseconds of the last one arriving. Collective to build and to close."""

    def __init__(self, group):
        self.group = group
        self.sig = SymmetricBuffer(group, 4096, "bench.sig")
        self.err = ErrorRecord()
        kernels = runtime_base.load_kernels(group, [KernelSet(jit.KernelVariant.of("barrier.cu"), ("ep_barrier",))])
        self._barrier = runtime_base.Barrier(kernels["ep_barrier"], self.sig, 0, self.err, group.rank, group.size,
                                             int(DEVICE_BARRIER_TIMEOUT_S * 1e9))

    def __call__(self, stream) -> None:
        self._barrier(stream)

    def check(self) -> None:
        if self.err.raised():
            raise self.err.as_timeout()

    def close(self) -> None:
        import cupy
        cupy.cuda.runtime.deviceSynchronize()
        self.group.barrier("bench close")
        self.sig.close()
        self.err.close()


def to_device(inputs, stream):
    """(x, topk_ids, weights, scales or None) as CuPy arrays on ``stream`` (scales keep their strides)."""
    import cupy
    with stream:
        x = cupy.asarray(inputs.x)
        ids = cupy.asarray(inputs.topk_ids)
        w = cupy.asarray(inputs.weights)
        sc = None if inputs.scales is None else cupy.asfortranarray(cupy.asarray(inputs.scales))
    stream.synchronize()
    return x, ids, w, sc


def sm_count() -> int:
    return jit.sm_count()


def _driver_release() -> str | None:
    """The NVIDIA driver's release (e.g. 580.159.04), from the kernel module or NVML."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", f.read())
            if m:
                return m.group(1)
    except OSError:
        pass
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def environment(device: int) -> dict:
    import cupy
    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(device)
    name = props["name"]
    info = {
        "gpu_name": name.decode() if isinstance(name, bytes) else str(name),
        "gpu_sms": int(props["multiProcessorCount"]),
        "gpu_l2_bytes": int(props["l2CacheSize"]),
        "gpu_memory_bytes": int(props["totalGlobalMem"]),
        "compute_capability": f"{props['major']}.{props['minor']}",
        "driver_version": _driver_release(),
        "driver_cuda_version": int(rt.driverGetVersion()),
        "runtime_cuda_version": int(rt.runtimeGetVersion()),
        "nvrtc_version": ".".join(str(v) for v in jit.nvrtc_version()),
        "cupy_version": cupy.__version__,
    }
    try:
        import torch
        info["torch_version"] = torch.__version__
    except ImportError:
        info["torch_version"] = None
    return info


def peer_access_matrix(group, device: int) -> list:
    """deviceCanAccessPeer from this rank's device to every rank's device (as seen from this process)."""
    import cupy
    devices = group.allgather(device)
    count = cupy.cuda.runtime.getDeviceCount()
    return [bool(cupy.cuda.runtime.deviceCanAccessPeer(device, d)) if d != device and d < count else d == device
            for d in devices]


def fill_random_bytes(arr, seed: int) -> None:
    """Fill a CuPy uint8 array with non-zero-ish data (compressible zeros could flatter a copy)."""
    import cupy
    n32 = arr.nbytes // 4
    words = arr[: n32 * 4].view(np.uint32)
    words[...] = (cupy.arange(n32, dtype=np.uint32) * np.uint32(2654435761)) ^ np.uint32(seed * 40503 + 1)
