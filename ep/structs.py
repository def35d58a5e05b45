"""NumPy mirrors of the C structs in ``cuda_src/common/params.cuh`` and ``wait.cuh``.

Field order and types must match the C side; ``tests/cpu/test_structs.py`` compiles static_asserts
generated from these dtypes against the C headers (NVRTC, no GPU needed).
"""
from __future__ import annotations

import ctypes
import struct

import numpy as np

_P = np.uint64     # device pointer
_I = np.int32
_U64 = np.uint64


def _struct(*fields) -> np.dtype:
    return np.dtype(list(fields), align=True)


ERROR_RECORD = _struct(("claim", np.uint32), ("flag", np.uint32), ("phase", _I), ("rank", _I), ("peer", _I),
                       ("reserved", _I), ("observed", _U64), ("expected", _U64))

COUNT_SLOT = _struct(("epoch", _U64), ("tokens_to_you", _I), ("num_tokens", _I), ("invalid", _I),
                     ("reserved", _I))

BARRIER_PARAMS = _struct(("sig_peers", _P), ("err", _P), ("generation", _P), ("timeout_ns", _U64),
                         ("flags_offset", _U64), ("rank", _I), ("world", _I))

HT_ROUTE_PARAMS = _struct(
    ("topk_ids", _P), ("route", _P), ("slot_idx", _P), ("send_pos", _P), ("chunk_cnt", _P), ("bad", _P),
    ("info", _P), ("host_epoch", _P), ("host_info", _P), ("sig_peers", _P), ("err", _P), ("epoch_ctr", _P),
    ("input_err", _P), ("epoch", _U64), ("timeout_ns", _U64), ("cnt_offset", _U64),
    ("cnt_stride", _I), ("ids_64", _I), ("rank", _I), ("world", _I), ("num_tokens", _I), ("topk", _I),
    ("num_experts", _I), ("local_experts", _I), ("nchunks", _I), ("alignment", _I), ("expert_major", _I),
    ("record_invalid", _I))

HT_DISPATCH_PARAMS = _struct(
    ("x", _P), ("weights", _P), ("route", _P), ("slot_idx", _P), ("send_pos", _P), ("info", _P),
    ("data_peers", _P), ("meta_peers", _P), ("sig_peers", _P), ("out", _P), ("out_peers", _P), ("recv_rows", _P),
    ("recv_w", _P), ("item_ctr", _P), ("counts_out", _P), ("expert_offsets", _P), ("scales", _P), ("out_scales", _P),
    ("err", _P), ("timeout_ns", _U64), ("dflag_offset", _U64), ("drange_offset", _U64), ("scale_stride_t", _U64),
    ("scale_stride_c", _U64), ("out_scale_block_stride", _U64), ("out_scale_row_stride", _U64),
    ("out_scale_col_stride", _U64), ("rank", _I), ("world", _I), ("num_tokens", _I), ("topk", _I),
    ("local_experts", _I), ("row_bytes", _I), ("slot_bytes", _I), ("max_tokens", _I), ("chunk_tokens", _I),
    ("max_chunks", _I), ("meta_stride", _I), ("send_blocks", _I), ("send_warps", _I), ("scale_count", _I),
    ("scale_elem", _I), ("scale_slot_off", _I), ("out_scale_block", _I), ("token_major", _I), ("pad_rows", _I))

HT_COMBINE_PARAMS = _struct(
    ("expert_out", _P), ("recv_rows", _P), ("recv_w", _P), ("send_pos", _P), ("info", _P), ("data_peers", _P),
    ("partial_peers", _P), ("own_partial", _P), ("out", _P), ("w_peers", _P), ("own_w", _P), ("out_w", _P),
    ("land_peers", _P), ("wland_peers", _P), ("err", _P), ("timeout_ns", _U64), ("rank", _I), ("world", _I),
    ("num_tokens", _I), ("topk", _I),
    ("local_experts", _I), ("row_bytes", _I), ("max_tokens", _I), ("item_lo", _I), ("item_hi", _I), ("skip_own", _I),
    ("own_at_prefix", _I))

LL_PARAMS = _struct(
    ("x", _P), ("topk_ids", _P), ("weights", _P), ("expert_out", _P), ("out", _P), ("copy_out", _P),
    ("counts_out", _P), ("cum_counts", _P), ("ready", _P), ("out_peers", _P), ("scale_peers", _P),
    ("meta_peers", _P), ("comb_peers", _P), ("sig_peers", _P), ("state", _P), ("send_mask", _P), ("ntok", _P), ("src_info", _P), ("src_counts", _P),
    ("err", _P), ("input_err", _P), ("timeout_ns", _U64), ("cnt_offset", _U64), ("disp_cnt_offset", _U64),
    ("comb_cnt_offset", _U64), ("wgt_cnt_offset", _U64), ("rank", _I), ("world", _I), ("num_tokens", _I),
    ("topk", _I), ("num_experts", _I),
    ("local_experts", _I), ("hidden", _I), ("max_tokens", _I), ("capacity", _I), ("cnt_stride", _I),
    ("meta_stride", _I), ("ids_64", _I), ("age", _I), ("fp8", _I), ("cols_per_tile", _I),
    ("ready_target", np.uint32), ("cum_64", _I), ("out_par", _I))

SIGNAL_PARAMS = _struct(("counters", _P), ("first", _I), ("count", _I), ("add", np.uint32), ("reserved", _I))

LL_COUNT_SLOT = _struct(("seq", _U64), ("num_tokens", _I), ("reserved", _I))
LL_META_REC = _struct(("seq", np.uint32), ("reserved", _I))

# C struct name -> dtype, for the layout test.
C_STRUCTS = {
    "ErrorRecord": ERROR_RECORD,
    "CountSlot": COUNT_SLOT,
    "BarrierParams": BARRIER_PARAMS,
    "HtRouteParams": HT_ROUTE_PARAMS,
    "HtDispatchParams": HT_DISPATCH_PARAMS,
    "HtCombineParams": HT_COMBINE_PARAMS,
    "LLParams": LL_PARAMS,
    "LLCountSlot": LL_COUNT_SLOT,
    "SignalParams": SIGNAL_PARAMS,
    "MetaRec": LL_META_REC,
}


_STRUCT_CODES = {np.dtype(np.uint64): "Q", np.dtype(np.int64): "q", np.dtype(np.uint32): "I", np.dtype(np.int32): "i"}
_ARGV = struct.Struct("<Q")


class _Layout:
    """How to pack one dtype: a precompiled struct.Struct for the whole record (None for a dtype with
    sub-array fields, packed by NumPy) and one per field, at its offset in a Params buffer."""

    def __init__(self, dtype: np.dtype):
        self.dtype, self.size = dtype, dtype.itemsize
        self.allowed = frozenset(dtype.names)
        self.required = self.allowed - {"reserved"}
        self.fields: dict[str, tuple[struct.Struct, int]] = {}
        fmt, pos, names = "<", 0, []
        for name, (fdt, off) in sorted(dtype.fields.items(), key=lambda kv: kv[1][1]):
            code = _STRUCT_CODES.get(fdt)
            if code is None:
                fmt = None
                continue
            self.fields[name] = (struct.Struct("<" + code), Params.OFFSET + off)
            if fmt is not None:
                fmt += "x" * (off - pos) + code
                pos = off + fdt.itemsize
                names.append(name)
        self.whole = None if fmt is None else struct.Struct(fmt + "x" * (dtype.itemsize - pos))
        self.names = tuple(names)


_LAYOUTS: dict = {}


def _layout(dtype: np.dtype) -> _Layout:
    lay = _LAYOUTS.get(dtype)
    if lay is None:
        lay = _LAYOUTS[dtype] = _Layout(dtype)
    return lay


class Params:
    """A kernel's by-value params struct, ready to launch: the record's bytes after one 8-byte slot holding
    their address, so the slot's own address is the ``kernelParams`` array cuLaunchKernel takes (``argv``).
    Nothing is converted per launch: the driver copies the bytes when the kernel is launched (or captured),
    so a Params may be reused or changed right after. ``update`` returns a changed copy."""

    OFFSET = 8
    __slots__ = ("layout", "buf", "argv")

    def __init__(self, layout: _Layout, raw: bytes):
        self.layout = layout
        self.buf = ctypes.create_string_buffer(self.OFFSET + layout.size)
        self.argv = ctypes.addressof(self.buf)
        _ARGV.pack_into(self.buf, 0, self.argv + self.OFFSET)
        self.buf[self.OFFSET:] = raw

    @property
    def dtype(self) -> np.dtype:
        return self.layout.dtype

    @property
    def record(self) -> np.ndarray:
        """A one-element NumPy view of the record (reading fields, tests)."""
        return np.frombuffer(self.buf, dtype=self.layout.dtype, count=1, offset=self.OFFSET)

    def tobytes(self) -> bytes:
        return self.buf.raw[self.OFFSET:]

    def __getitem__(self, name: str):
        return self.record[name]

    def update(self, **values) -> "Params":
        """A copy with some fields replaced: a launch whose params differ from a previous one in a few fields
        skips packing the others (a cached dispatch, a combine)."""
        lay = self.layout
        new = Params.__new__(Params)
        new.layout = lay
        new.buf = buf = ctypes.create_string_buffer(self.OFFSET + lay.size)
        new.argv = addr = ctypes.addressof(buf)
        ctypes.memmove(addr, self.argv, self.OFFSET + lay.size)
        _ARGV.pack_into(buf, 0, addr + self.OFFSET)
        fields = lay.fields
        for name, value in values.items():
            packer = fields.get(name)
            if packer is None:
                raise KeyError(f"struct fields: unknown {name!r}" if name not in lay.allowed else
                               f"struct field {name!r} is an array: pack the record again")
            try:
                packer[0].pack_into(buf, packer[1], value)
            except struct.error as exc:
                raise OverflowError(f"struct field {name} out of range: {exc}") from exc
        return new


def pack(dtype: np.dtype, **values) -> Params:
    """The params record of ``dtype``; every field must be given (a forgotten field is a bug)."""
    lay = _layout(dtype)
    if not lay.required <= values.keys() <= lay.allowed:
        missing = lay.required - values.keys()
        extra = values.keys() - lay.allowed
        raise KeyError(f"struct fields: missing {sorted(missing)}, unknown {sorted(extra)}")
    if lay.whole is not None:
        try:
            raw = lay.whole.pack(*[values.get(n, 0) for n in lay.names])
        except struct.error as exc:
            raise OverflowError(f"struct field out of range: {exc}") from exc
    else:   # sub-array fields: NumPy's assignment
        rec = np.zeros(1, dtype=dtype)
        for name, value in values.items():
            rec[name] = value
        raw = rec.tobytes()
    return Params(lay, raw)


def static_asserts(struct_name: str, dtype: np.dtype) -> str:
    """C++ static_asserts pinning sizeof/offsetof of ``struct_name`` to ``dtype``."""
    lines = [f"static_assert(sizeof(ep::{struct_name}) == {dtype.itemsize}, \"sizeof {struct_name}\");"]
    for name in dtype.names:
        off = dtype.fields[name][1]
        lines.append(f"static_assert(offsetof(ep::{struct_name}, {name}) == {off}, \"{struct_name}.{name}\");")
    return "\n".join(lines)
