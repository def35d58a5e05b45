"""Run-time compilation of the CUDA kernels: variants, an honest cache key, NVRTC, the disk cache, launch.

A :class:`KernelVariant` is (source file, macro values); with an arch it names one cubin. The macro values
come from the resolved tuning (ep/tuning.py), and a variant carries exactly the macros its source reads, so
a tunable that changes nothing a kernel reads never builds another binary. Compilation goes through CuPy's
NVRTC bindings directly, with the same options whether a GPU is present or not, so CI can compile every
variant for sm_90 and sm_100 on a machine without a GPU (``python -m ep.jit --arch sm_90``). Cubins are
cached on disk under ``EP_CACHE_DIR`` (default ``~/.cache/ep/kernels``, mode 0700); the key hashes every
file under the variant's source roots (so an edited header never serves a stale binary), the options, the
arch and the NVRTC version. The benchmark's kernels (ep/bench/cuda) have a root of their own, outside the
product's digest: editing them never rebuilds a product kernel. In process, loaded modules are kept in a dict.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from . import envs
from .errors import CompileError, EPError
from .structs import Params

log = logging.getLogger("ep.jit")


def source_dir() -> Path:
    """``cuda_src/`` of a checkout, else the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "cuda_src", here / "cuda_src"):
        if (candidate / "common" / "params.cuh").is_file():
            return candidate
    raise EPError(f"cannot find the CUDA sources (looked in {here.parent / 'cuda_src'} and {here / 'cuda_src'})")


def bench_source_dir() -> Path:
    return Path(__file__).resolve().parent / "bench" / "cuda"


# Macros a kernel may read: name -> (type, short label in variant names). Their values come from the
# resolved tuning (ep/tuning.py); the seed's names are kept as the macro names.
MACROS: Mapping[str, tuple[type, str]] = {
    "EP_NCCLEP_TMA": (bool, "tma"),
    "EP_DISPATCH_WARPS": (int, "w"),
    "EP_LL_WARPS": (int, "w"),
    "EP_DEBUG_TRAP": (bool, "trap"),
}
# Source file -> the macros it reads (besides EP_DEBUG_TRAP, which every file reads via wait.cuh).
SOURCES: Mapping[str, tuple[str, ...]] = {
    "barrier.cu": (),
    "ht_layout.cu": (),
    "ht_dispatch.cu": ("EP_NCCLEP_TMA", "EP_DISPATCH_WARPS"),
    "ht_combine.cu": (),
    "ll_dispatch.cu": ("EP_LL_WARPS",),
    "ll_combine.cu": ("EP_LL_WARPS",),
}
BENCH_SOURCES: Mapping[str, tuple[str, ...]] = {"bench_copy.cu": ()}
COMMON_MACROS = ("EP_DEBUG_TRAP",)


def _macros_of(source: str) -> tuple[str, ...]:
    if source in SOURCES:
        return SOURCES[source] + COMMON_MACROS
    if source in BENCH_SOURCES:
        return BENCH_SOURCES[source] + COMMON_MACROS
    raise EPError(f"unknown kernel source {source!r}")


def _digest(roots: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".cu", ".cuh")):
            h.update(str(path.relative_to(root)).encode())
            h.update(b"\0")
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over every file under cuda_src/ (relative path and bytes)."""
    return _digest([source_dir()])


@functools.lru_cache(maxsize=1)
def bench_digest() -> str:
    """sha256 over the product sources (the bench kernels include their headers) and ep/bench/cuda/."""
    return _digest([source_dir(), bench_source_dir()])


def _macro_text(name: str, value) -> str:
    kind = MACROS[name][0]
    if kind is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise EPError(f"macro {name} takes a bool, got {value!r}")
        return "1" if value else "0"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise EPError(f"macro {name} takes an int, got {value!r}")
    return str(int(value))


@dataclass(frozen=True)
class KernelVariant:
    """One compilable unit: a source file and the values of exactly the macros it reads."""

    source: str
    macros: tuple[tuple[str, str], ...]   # sorted (name, value)

    @staticmethod
    def of(source: str, **values) -> "KernelVariant":
        """``values``: every macro the source reads (EP_DEBUG_TRAP may be left out: off)."""
        names = _macros_of(source)
        values.setdefault("EP_DEBUG_TRAP", False)
        missing = [n for n in names if n not in values]
        extra = sorted(set(values) - set(names))
        if missing or extra:
            raise EPError(f"{source} reads macros {list(names)}: missing {missing}, not read {extra}")
        return KernelVariant(source, tuple(sorted((n, _macro_text(n, values[n])) for n in names)))

    @property
    def bench(self) -> bool:
        return self.source in BENCH_SOURCES

    @property
    def name(self) -> str:
        stem = self.source.rsplit(".", 1)[0]
        values = dict(self.macros)
        parts = [f"{MACROS[k][1]}{values[k]}" for k in _macros_of(self.source)
                 if k != "EP_DEBUG_TRAP" or values[k] != "0"]
        return "_".join([stem] + parts)

    def macro(self, name: str) -> str:
        return dict(self.macros)[name]

    def path(self) -> Path:
        return (bench_source_dir() if self.bench else source_dir()) / self.source

    def digest(self) -> str:
        return bench_digest() if self.bench else source_digest()

    def options(self, arch: str) -> tuple[str, ...]:
        return ("-std=c++17", f"--gpu-architecture={arch}", f"-I{source_dir()}", "-lineinfo",
                *(f"-D{k}={v}" for k, v in self.macros))


def nvrtc_version() -> tuple[int, int]:
    from cupy.cuda import nvrtc
    return tuple(nvrtc.getVersion())


def cache_key(variant: KernelVariant, arch: str) -> str:
    h = hashlib.sha256()
    for part in (variant.digest(), variant.source, *variant.options(arch), arch, str(nvrtc_version())):
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
    prog = nvrtc.createProgram(variant.path().read_text(), variant.source, [], [])
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


def sm_count() -> int:
    """SMs of the current CUDA device."""
    import cupy
    return int(cupy.cuda.Device().attributes["MultiProcessorCount"])


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

    def launch(self, grid: int, block: int, params, *, smem: int = 0, stream=None) -> None:
        """Launch with one by-value struct argument ``params`` (an ep.structs.Params). This runs on every op's
        host path before the GPU has work: keep it lean."""
        if type(params) is not Params:
            raise EPError(f"{self.label}: params must be an ep.structs.Params, got {type(params).__name__}")
        if grid < 1 or block < 1:
            raise EPError(f"{self.label}: empty launch grid={grid} block={block}")
        driver = self._driver
        if smem > self._smem_limit and smem > 48 * 1024:
            # Opt in once to more than the default 48 KB of dynamic shared memory.
            driver.funcSetAttribute(self._fn_ptr, _MAX_DYNAMIC_SMEM_ATTR, smem)
            self._smem_limit = smem
        try:
            driver.launchKernel(self._fn_ptr, grid, 1, 1, block, 1, 1, smem, 0 if stream is None else stream.ptr,
                                params.argv, 0)
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


def bench_variants() -> list[KernelVariant]:
    return [KernelVariant.of(source) for source in BENCH_SOURCES]


def compile_all(archs: Iterable[str], variants: Iterable[KernelVariant]) -> list[tuple[str, str, int]]:
    """Compile ``variants`` for every arch (no GPU needed). Returns (variant name, arch, cubin bytes)."""
    results = []
    variants = list(variants)
    for arch in archs:
        for variant in variants:
            results.append((variant.name, arch, len(compile_cubin(variant, arch))))
    return results
