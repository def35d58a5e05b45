"""Arrays in, arrays out: validation of user arrays and conversion between torch, CuPy and NumPy.

bf16 is ``torch.bfloat16`` for torch, and ``uint16`` bit patterns for CuPy and NumPy (or an
``ml_dtypes.bfloat16`` NumPy array). Outputs come back in the caller's framework, zero-copy (DLPack).
"""
from __future__ import annotations

import contextlib

from typing import Any

import numpy as np

TORCH, CUPY, NUMPY = "torch", "cupy", "numpy"


def argument_error(cls: type, name: str, message: str) -> Exception:
    """An exception about argument ``name``, tagged with it (``ep_argument``) so that the peers of a rank that
    fails its input checks can be told which argument failed (ep.validation)."""
    exc = cls(message)
    exc.ep_argument = name
    return exc


def framework_of(arr: Any, name: str = "array") -> str:
    module = type(arr).__module__
    if module.startswith("torch"):
        return TORCH
    if module.startswith("cupy"):
        return CUPY
    if isinstance(arr, np.ndarray):
        return NUMPY
    raise argument_error(TypeError, name, f"{name}: expected a torch tensor, CuPy array or NumPy array, got "
                                          f"{type(arr).__name__}")


_DTYPE_NAMES: dict = {}   # dtype object -> name; str(dtype) costs microseconds on every call's hot path


def _dtype_name(arr: Any) -> str:
    dtype = arr.dtype
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).replace("torch.", "")
    return name


def is_bf16(arr: Any) -> bool:
    return _dtype_name(arr) in ("bfloat16", "uint16")


# One-byte payloads a block-scaled dispatch carries as they are (FP8 e4m3/e5m2, packed FP4 as uint8), and the
# dtypes its scales may have (float32, packed UE8M0 int32, E8M0 / E4M3 bytes).
BYTE_PAYLOADS = ("uint8", "int8", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
SCALE_DTYPES = ("float32", "int32", "uint32") + BYTE_PAYLOADS


class ArrayInfo:
    """One validated argument: its framework, shape, dtype name, device pointer (0 for NumPy), CUDA device
    (-1 on the CPU), the array itself and its element size. Read-only by convention (a plain slotted class:
    a frozen dataclass costs microseconds per argument on every op's host path)."""

    __slots__ = ("framework", "shape", "dtype", "ptr", "device", "obj", "itemsize")

    def __init__(self, framework: str, shape: tuple, dtype: str, ptr: int, device: int, obj: Any = None,
                 itemsize: int = 0):
        self.framework, self.shape, self.dtype, self.ptr = framework, shape, dtype, ptr
        self.device, self.obj, self.itemsize = device, obj, itemsize

    def __repr__(self) -> str:
        return (f"ArrayInfo({self.framework}, shape={self.shape}, dtype={self.dtype}, ptr={self.ptr:#x}, "
                f"device={self.device})")

    def strides(self) -> tuple:
        """Strides in bytes (computed when asked: hot paths never need them)."""
        arr = self.obj
        if self.framework == TORCH:
            return tuple(int(st) * self.itemsize for st in arr.stride())
        return tuple(int(st) for st in arr.strides)


def describe(arr: Any, name: str, fw: str | None = None) -> ArrayInfo:
    fw = fw or framework_of(arr, name)
    if fw == CUPY:
        data = arr.data   # a MemoryPointer: its device id is cheaper than arr.device (a new Device object)
        return ArrayInfo(fw, arr.shape, _dtype_name(arr), data.ptr, data.device_id, arr, arr.itemsize)
    shape = tuple(arr.shape)   # ints already (torch.Size, NumPy tuples)
    if fw == TORCH:
        dev = arr.get_device() if arr.is_cuda else -1   # (arr.device.type builds a string: ~0.25 us)
        return ArrayInfo(fw, shape, _dtype_name(arr), arr.data_ptr() if dev >= 0 else 0, dev, arr, arr.element_size())
    return ArrayInfo(fw, shape, _dtype_name(arr), 0, -1, arr, arr.itemsize)


def check_array(arr: Any, name: str, *, shape: tuple, dtypes: tuple[str, ...], device: int,
                fw: str | None = None, contiguous: bool = True) -> ArrayInfo:
    """Validate one argument; ``shape`` entries of None accept any size; ``fw``: its framework when the caller
    knows it already; ``contiguous=False`` accepts any strides. Raises ValueError/TypeError."""
    info = describe(arr, name, fw)
    got = info.shape
    if len(got) != len(shape) or (got != shape and not all(w is None or g == w for g, w in zip(got, shape))):
        pretty = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise argument_error(ValueError, name, f"{name}: expected shape {pretty}, got {info.shape}")
    if info.dtype not in dtypes:
        raise argument_error(TypeError, name, f"{name}: expected dtype {' or '.join(dtypes)}, got {info.dtype}")
    if info.device != device:
        where = "the CPU" if device < 0 else f"cuda:{device}"
        got = "the CPU" if info.device < 0 else f"cuda:{info.device}"
        raise argument_error(ValueError, name, f"{name}: expected an array on {where}, got one on {got}")
    if contiguous and not (arr.is_contiguous() if info.framework == TORCH else arr.flags.c_contiguous):
        raise argument_error(ValueError, name, f"{name}: must be C-contiguous")
    return info


def bf16_dtypes(framework: str) -> tuple[str, ...]:
    """dtype names that carry bf16 in ``framework``: torch.bfloat16, or uint16 bit patterns / ml_dtypes bfloat16."""
    return ("bfloat16",) if framework == TORCH else ("uint16", "bfloat16")


# ---------------------------------------------------------------------------------------- NumPy / CPU
def to_numpy(arr: Any) -> np.ndarray:
    """A NumPy view/copy of a CPU array; bf16 becomes uint16 bit patterns, torch FP8 uint8 bit patterns."""
    if framework_of(arr) == TORCH:
        import torch
        if arr.dtype == torch.bfloat16:
            return arr.view(torch.int16).numpy().view(np.uint16)
        if arr.element_size() == 1 and arr.dtype not in (torch.uint8, torch.int8, torch.bool):
            return arr.view(torch.uint8).numpy()
        return arr.numpy()
    a = np.asarray(arr)
    if a.dtype.name == "bfloat16":
        return a.view(np.uint16)
    return a


def from_numpy(arr: np.ndarray, like_framework: str, bf16: bool = False, like: Any = None, fp8: bool = False) -> Any:
    """Return ``arr`` in the caller's CPU framework (torch bf16 when bf16, torch float8_e4m3fn when fp8 and the
    caller used torch; NumPy keeps the bit patterns)."""
    if like_framework == TORCH:
        import torch
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if bf16:
            t = t.view(torch.bfloat16) if arr.dtype == np.uint16 else t
        elif fp8:
            t = t.view(torch.float8_e4m3fn)
        elif like is not None and getattr(like, "dtype", None) is not None and like.dtype != t.dtype \
                and like.element_size() == t.element_size():
            t = t.view(like.dtype)   # a byte payload (FP8) comes back in the caller's dtype
        return t
    if bf16 and like is not None and np.asarray(like).dtype.name == "bfloat16":
        return arr.view(np.asarray(like).dtype)
    return arr


# ----------------------------------------------------------------------------------------- GPU side
def to_framework(cupy_array: Any, framework: str, bf16: bool = False, fp8: bool = False) -> Any:
    """A CuPy array as the caller's framework, zero-copy; uint16 becomes torch.bfloat16 when bf16, uint8
    torch.float8_e4m3fn when fp8 (CuPy keeps the bit patterns)."""
    if framework != TORCH:
        return cupy_array
    import torch
    t = torch.from_dlpack(cupy_array)
    if bf16:
        t = t.view(torch.bfloat16)
    elif fp8:
        t = t.view(torch.float8_e4m3fn)
    return t


def _external(handle: int):
    import cupy
    return cupy.cuda.Stream.from_external(_RawStream(handle)) if hasattr(cupy.cuda.Stream, "from_external") \
        else cupy.cuda.ExternalStream(handle)


class _RawStream:
    """A raw cudaStream_t exposed through the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, handle: int):
        self.handle = int(handle)

    def __cuda_stream__(self):
        return (0, self.handle)


_EXTERNAL: dict = {}   # raw handle -> CuPy stream object wrapping it (a wrapper costs microseconds to build)


def _cached(table: dict, handle: int, make):
    """``table[handle]``, made by ``make(handle)`` on first use (a wrapper costs microseconds to build; the
    table is emptied past 1024 streams)."""
    s = table.get(handle)
    if s is None:
        if len(table) > 1024:
            table.clear()
        s = table[handle] = make(handle)
    return s


def _external_cached(handle: int):
    return _cached(_EXTERNAL, handle, _external)


def allocating_on(stream, framework: str):
    """Context in which torch allocates from ``stream``'s pool: an op launched on a stream the caller named,
    not torch's current one, so a block it still uses is never handed to the current stream's work once the
    caller drops it (the caching allocator tracks blocks by the stream they were allocated on). None: no
    stream was named (or the CPU backend): nothing changes."""
    if framework != TORCH or stream is None or stream.ptr == _torch_current_stream():
        return contextlib.nullcontext()
    import torch
    return torch.cuda.stream(_cached(_TORCH_EXTERNAL, stream.ptr, lambda handle: torch.cuda.ExternalStream(
        handle, device=torch.device("cuda", torch.cuda.current_device()))))


_TORCH_EXTERNAL: dict = {}   # raw stream -> torch.cuda.ExternalStream


def _torch_current_stream() -> int:
    """torch's current stream on the current device, as a raw handle. torch.cuda.current_stream() builds a
    Python Stream object on every call; the raw query is what it calls underneath."""
    import torch
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(torch.cuda.current_device()))
    return int(torch.cuda.current_stream().cuda_stream)


def resolve_stream(stream: Any, framework: str):
    """The CuPy stream to launch on: ``stream`` if given (torch or CuPy stream, or a raw pointer), else the
    caller's current stream (torch's for torch inputs, CuPy's otherwise)."""
    if stream is not None:
        if hasattr(stream, "cuda_stream"):          # torch.cuda.Stream
            return _external_cached(int(stream.cuda_stream))
        if isinstance(stream, int):
            return _external_cached(stream)
        import cupy
        if isinstance(stream, (cupy.cuda.Stream, cupy.cuda.ExternalStream)):
            return stream
        return _external_cached(int(stream.ptr))    # another object naming a stream by its pointer
    if framework == TORCH:
        return _external_cached(_torch_current_stream())
    import cupy
    return cupy.cuda.get_current_stream()


_NUMPY_KINDS = {"bf16": np.uint16, "int32": np.int32, "int64": np.int64, "float32": np.float32, "uint8": np.uint8}
_TORCH_KINDS: dict = {}   # filled on first torch use (torch is optional)


def empty(framework: str, shape: tuple, kind: str, stream) -> tuple[Any, int]:
    """Allocate an output in the caller's framework. kind: "bf16", "int32", "int64", "float32".
    Returns (array, device pointer). Torch allocations use torch's caching allocator on its current stream."""
    return empty_many(framework, [(shape, kind)], stream)[0]


def dtype_of(framework: str, kind) -> Any:
    """The dtype of ``kind`` in ``framework``: a name ("bf16" = uint16 bit patterns outside torch, "int32",
    "int64", "float32", "uint8"), or a dtype of the framework, returned as it is (a payload's own)."""
    if not isinstance(kind, str):
        return kind
    if framework == TORCH:
        if not _TORCH_KINDS:
            import torch
            _TORCH_KINDS.update(bf16=torch.bfloat16, int32=torch.int32, int64=torch.int64, float32=torch.float32,
                                uint8=torch.uint8)
        return _TORCH_KINDS[kind]
    return _NUMPY_KINDS[kind]


def empty_many(framework: str, specs: list, stream) -> list[tuple[Any, int]]:
    """:func:`empty` for several ``(shape, kind)`` at once (CuPy: one stream context for all)."""
    if framework == TORCH:
        import torch
        device = torch.device("cuda", torch.cuda.current_device())
        out = []
        for shape, kind in specs:
            t = torch.empty(shape, dtype=dtype_of(framework, kind), device=device)
            out.append((t, t.data_ptr()))
        return out
    import cupy
    with stream:
        arrays = [cupy.empty(shape, dtype=dtype_of(framework, kind)) for shape, kind in specs]
    return [(a, a.data.ptr) for a in arrays]
