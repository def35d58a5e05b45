"""Run-time compilation of the CUDA kernels: variants, an honest cache key, NVRTC, the disk cache, launch.

A :class:`KernelVariant` is (source file, macro values); with an arch it names one cubin. Compilation goes
through CuPy's NVRTC bindings directly, with the same options whether a GPU is present or not, so CI can
compile every variant for sm_90 and sm_100 on a machine without a GPU (``python -m ep.jit --arch sm_90``).
Cubins are cached on disk under ``EP_CACHE_DIR`` (default ``~/.cache/ep/kernels``, mode 0700); the key
hashes every file under ``cuda_src/`` (so an edited header never serves a stale binary), the options,
the arch and the NVRTC version. In process, loaded modules are kept in a dict.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from . import envs
from .errors import CompileError, EPError

log = logging.getLogger("ep.jit")


def source_dir() -> Path:
    """``cuda_src/`` of a checkout, else the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "cuda_src", here / "cuda_src"):
        if (candidate / "common" / "params.cuh").is_file():
            return candidate
    raise EPError(f"cannot find the CUDA sources (looked in {here.parent / 'cuda_src'} and {here / 'cuda_src'})")


# Source file -> the macro knobs it reads (besides EP_DEBUG_TRAP, which every file reads via wait.cuh).
SOURCES: Mapping[str, tuple[str, ...]] = {
    "barrier.cu": (),
    "ht_layout.cu": (),
    "ht_dispatch.cu": ("EP_NCCLEP_TMA", "EP_DISPATCH_RECV_TMA", "EP_DISPATCH_WARPS"),
    "ht_combine.cu": ("EP_COMBINE_PUSH", "EP_CMB_TMA", "EP_CMB_TMA_STAGES", "EP_CMB_TMA_WARPS_WIDE", "EP_CMB_TMA_WARPS_MAXCH",
                      "EP_CMB_TMA_WARPS_NARROW"),
    "ll_dispatch.cu": ("EP_LL_WARPS",),
    "ll_combine.cu": ("EP_LL_WARPS",),
    "bench_copy.cu": (),
}
COMMON_MACROS = ("EP_DEBUG_TRAP",)
# Short labels of macros in variant names (e.g. ht_combine_push1_tma1_st2_wide16_maxch32_narrow4).
SHORT = {"EP_COMBINE_PUSH": "push", "EP_NCCLEP_TMA": "tma", "EP_DISPATCH_RECV_TMA": "rtma", "EP_DISPATCH_WARPS": "w", "EP_CMB_TMA": "tma", "EP_CMB_TMA_STAGES": "st",
         "EP_CMB_TMA_WARPS_WIDE": "wide", "EP_CMB_TMA_WARPS_MAXCH": "maxch", "EP_CMB_TMA_WARPS_NARROW": "narrow",
         "EP_LL_WARPS": "w", "EP_DEBUG_TRAP": "trap"}


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over every file under cuda_src/ (relative path and bytes)."""
    root = source_dir()
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".cu", ".cuh")):
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class KernelVariant:
    """One compilable unit: a source file and the values of the macros it reads."""

    source: str
    macros: tuple[tuple[str, str], ...]   # sorted (name, value)

    @staticmethod
    def of(source: str, snapshot: envs.Snapshot | None = None, **overrides) -> "KernelVariant":
        if source not in SOURCES:
            raise EPError(f"unknown kernel source {source!r}")
        snap = snapshot if snapshot is not None else envs.defaults()
        values = {}
        for name in SOURCES[source] + COMMON_MACROS:
            knob = envs.KNOB_BY_NAME[name]
            value = overrides.pop(name, snap[name])
            values[name] = knob.macro_value(value)
        if overrides:
            raise EPError(f"{source} does not read macros {sorted(overrides)}")
        return KernelVariant(source, tuple(sorted(values.items())))

    @property
    def name(self) -> str:
        stem = self.source.rsplit(".", 1)[0]
        order = SOURCES[self.source] + COMMON_MACROS
        values = dict(self.macros)
        parts = [f"{SHORT[k]}{values[k]}" for k in order if k != "EP_DEBUG_TRAP" or values[k] != "0"]
        return "_".join([stem] + parts)

    def macro(self, name: str) -> str:
        return dict(self.macros)[name]

    def options(self, arch: str) -> tuple[str, ...]:
        return ("-std=c++17", f"--gpu-architecture={arch}", f"-I{source_dir()}", "-lineinfo",
                *(f"-D{k}={v}" for k, v in self.macros))


def nvrtc_version() -> tuple[int, int]:
    from cupy.cuda import nvrtc
    return tuple(nvrtc.getVersion())


def cache_key(variant: KernelVariant, arch: str) -> str:
    h = hashlib.sha256()
    for part in (source_digest(), variant.source, *variant.options(arch), arch, str(nvrtc_version())):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_dir(snapshot: envs.Snapshot | None = None) -> Path:
    snap = snapshot if snapshot is not None else envs.read()
    path = Path(snap.cache_dir) if snap.cache_dir else Path(envs.home_cache_dir())
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def compile_cubin(variant: KernelVariant, arch: str) -> bytes:
    """NVRTC-compile ``variant`` for ``arch`` (e.g. "sm_90"). Needs no GPU. Raises CompileError."""
    from cupy.cuda import nvrtc
    path = source_dir() / variant.source
    prog = nvrtc.createProgram(path.read_text(), variant.source, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(variant.options(arch)))
        except nvrtc.NVRTCError as exc:
            raise CompileError(f"{variant.name} ({arch}) failed to compile: {exc}\n{nvrtc.getProgramLog(prog)}") from None
        log_text = nvrtc.getProgramLog(prog).strip()
        if log_text:
            log.debug("%s (%s): %s", variant.name, arch, log_text)
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


def cached_cubin(variant: KernelVariant, arch: str, snapshot: envs.Snapshot | None = None) -> tuple[Path, bool]:
    """Path of the cubin in the disk cache, compiling it if absent. Returns (path, compiled_now)."""
    directory = cache_dir(snapshot)
    path = directory / f"{variant.name}-{arch}-{cache_key(variant, arch)[:24]}.cubin"
    if path.is_file():
        return path, False
    cubin = compile_cubin(variant, arch)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)    # atomic: concurrent ranks never see a partial file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log.info("compiled %s for %s -> %s", variant.name, arch, path.name)
    return path, True


def device_arch() -> str:
    import cupy
    major, minor = cupy.cuda.Device().compute_capability[:-1], cupy.cuda.Device().compute_capability[-1]
    return f"sm_{major}{minor}"


_MAX_DYNAMIC_SMEM_ATTR = 8   # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_STATIC_SMEM_ATTR = 1         # CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES


class Kernel:
    """A loaded kernel entry point; ``launch`` checks the launch and names the variant in errors."""

    def __init__(self, variant: KernelVariant, entry: str, module):
        self.variant = variant
        self.entry = entry
        self._module = module
        self._fn = module.get_function(entry)
        self._fn_ptr = self._fn.ptr
        self._smem_limit = 0
        from cupy_backends.cuda.api import driver
        self._driver = driver

    @property
    def static_smem(self) -> int:
        """Bytes of statically declared shared memory per block."""
        return int(self._driver.funcGetAttribute(_STATIC_SMEM_ATTR, self._fn_ptr))

    @property
    def label(self) -> str:
        return f"{self.variant.name}:{self.entry}"

    def launch(self, grid: int, block: int, params: np.ndarray, *, smem: int = 0, stream=None) -> None:
        """Launch with one by-value struct argument ``params`` (a one-element structured array). This runs on
        every op's host path before the GPU has work: keep it lean."""
        if not (isinstance(params, np.ndarray) and params.dtype.names and params.size == 1):
            raise EPError(f"{self.label}: params must be a one-element structured array")
        if grid < 1 or block < 1:
            raise EPError(f"{self.label}: empty launch grid={grid} block={block}")
        driver = self._driver
        if smem > self._smem_limit and smem > 48 * 1024:
            # Opt in once to more than the default 48 KB of dynamic shared memory.
            driver.funcSetAttribute(self._fn_ptr, _MAX_DYNAMIC_SMEM_ATTR, smem)
            self._smem_limit = smem
        argv = ctypes.c_void_p(params.ctypes.data)   # kernelParams: an array of one pointer, to the struct
        stream_ptr = 0 if stream is None else stream.ptr
        try:
            driver.launchKernel(self._fn_ptr, grid, 1, 1, block, 1, 1, smem, stream_ptr, ctypes.addressof(argv), 0)
        except Exception as exc:   # CUDADriverError carries the CUDA error name
            raise EPError(f"launch of {self.label} (grid={grid}, block={block}, smem={smem}) failed: {exc}") from exc


_MODULES: dict[tuple[KernelVariant, str], object] = {}


def load(variant: KernelVariant, entries: Sequence[str], snapshot: envs.Snapshot | None = None) -> dict[str, Kernel]:
    """Compile (or take from the caches) and load ``variant`` for the current device."""
    import cupy
    arch = device_arch()
    key = (variant, arch)
    module = _MODULES.get(key)
    if module is None:
        path, _ = cached_cubin(variant, arch, snapshot)
        module = cupy.cuda.function.Module()
        module.load_file(str(path))
        _MODULES[key] = module
    return {entry: Kernel(variant, entry, module) for entry in entries}


def all_variants() -> list[KernelVariant]:
    """Every variant the runtime can select: each boolean macro both ways, integer macros at default."""
    out = []
    for source, names in SOURCES.items():
        names = names + COMMON_MACROS
        bools = [n for n in names if envs.KNOB_BY_NAME[n].type is bool]
        for values in itertools.product((False, True), repeat=len(bools)):
            out.append(KernelVariant.of(source, **dict(zip(bools, values))))
    return out


def compile_all(archs: Iterable[str], variants: Iterable[KernelVariant] | None = None) -> list[tuple[str, str, int]]:
    """Compile every variant for every arch (no GPU needed). Returns (variant name, arch, cubin bytes)."""
    results = []
    for arch in archs:
        for variant in (all_variants() if variants is None else variants):
            results.append((variant.name, arch, len(compile_cubin(variant, arch))))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m ep.jit", description="Compile every ep kernel variant.")
    parser.add_argument("--arch", action="append", default=None, help="e.g. sm_90 (repeatable)")
    parser.add_argument("--list", action="store_true", help="only list the variants")
    args = parser.parse_args(argv)
    if args.list:
        for v in all_variants():
            print(v.name)
        return 0
    for name, arch, size in compile_all(args.arch or ["sm_90", "sm_100"]):
        print(f"{arch:7s} {name:60s} {size:8d} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
