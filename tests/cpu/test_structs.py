"""Host/device structs have one source of truth: the NumPy dtypes of ep.structs pin sizeof/offsetof of the C
structs in cuda_src/common/params.cuh and wait.cuh (checked by NVRTC, no GPU), and the buffer arithmetic of
ep.sizes has the shape the kernels assume."""
from __future__ import annotations

import re

import numpy as np
import pytest

from ep import HtTuning, MoECommunicatorConfig, constants, jit, sizes, structs, tuning

PRELUDE = """\
#include "common/params.cuh"
#include "common/wait.cuh"
#ifndef offsetof
#define offsetof(s, m) __builtin_offsetof(s, m)
#endif
"""


def nvrtc_compile(source: str, arch: str = "sm_90") -> tuple[bool, str]:
    """(compiled, log) of ``source`` against the checkout's cuda_src/."""
    from cupy.cuda import nvrtc
    prog = nvrtc.createProgram(source, "struct_layout.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, ["-std=c++17", f"--gpu-architecture={arch}", f"-I{jit.source_dir()}"])
            return True, nvrtc.getProgramLog(prog)
        except nvrtc.NVRTCError:
            return False, nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


# ------------------------------------------------------------------------------------ C <-> NumPy
@pytest.mark.parametrize("name, dtype", sorted(structs.C_STRUCTS.items()), ids=sorted(structs.C_STRUCTS))
def test_numpy_dtype_matches_the_c_struct(name, dtype):
    ok, log = nvrtc_compile(PRELUDE + structs.static_asserts(name, dtype) + "\n")
    assert ok, f"{name}: the NumPy mirror in ep/structs.py disagrees with the C struct:\n{log}"


def test_static_asserts_pin_size_and_every_field():
    text = structs.static_asserts("HtCombineParams", structs.HT_COMBINE_PARAMS)
    assert f"sizeof(ep::HtCombineParams) == {structs.HT_COMBINE_PARAMS.itemsize}" in text
    for field in structs.HT_COMBINE_PARAMS.names:
        assert f"offsetof(ep::HtCombineParams, {field}) ==" in text


def test_a_drifted_mirror_fails_to_compile():
    """The check has teeth: swapped fields, a missing field or a field of the wrong width is caught by NVRTC."""
    base = structs.BARRIER_PARAMS
    fields = [(n, base.fields[n][0]) for n in base.names]
    assert nvrtc_compile(PRELUDE + structs.static_asserts("BarrierParams", base))[0]
    drifted = {
        "swapped": fields[:2] + [fields[3], fields[2]] + fields[4:],     # generation <-> timeout_ns, both 8 bytes
        "missing": fields[:2] + fields[3:],                               # no `generation`
        "wider": fields[:-1] + [("world", np.int64)],
    }
    for what, dtype_fields in drifted.items():
        ok, _ = nvrtc_compile(PRELUDE + structs.static_asserts("BarrierParams", np.dtype(dtype_fields, align=True)))
        assert not ok, f"a {what} field must not match the C struct"


def c_field_names(struct_name: str) -> list[str]:
    """Data members of ``struct_name`` in declaration order, read from the headers' text."""
    for header in ("common/params.cuh", "common/wait.cuh"):
        text = (jit.source_dir() / header).read_text()
        match = re.search(rf"^struct {struct_name} \{{(.*?)^\}};", text, re.S | re.M)
        if match:
            body = re.sub(r"//[^\n]*", "", match.group(1))
            return [re.search(r"(\w+)\s*$", decl).group(1) for decl in body.split(";") if decl.strip()]
    raise AssertionError(f"struct {struct_name} not found in params.cuh or wait.cuh")


@pytest.mark.parametrize("name, dtype", sorted(structs.C_STRUCTS.items()), ids=sorted(structs.C_STRUCTS))
def test_numpy_dtype_has_every_c_field_in_order(name, dtype):
    # NOTE: sizeof/offsetof cannot see a C member that the mirror lacks when it sits in tail padding
    # (e.g. a trailing i32 after an odd number of i32s); the names close that gap.
    assert list(dtype.names) == c_field_names(name)


@pytest.mark.parametrize("name, dtype", sorted(structs.C_STRUCTS.items()), ids=sorted(structs.C_STRUCTS))
def test_struct_dtypes_are_c_aligned(name, dtype):
    assert dtype.isalignedstruct
    assert dtype.itemsize % 8 == 0
    offsets = [dtype.fields[n][1] for n in dtype.names]
    assert offsets == sorted(offsets)


def test_error_record_is_40_bytes():
    assert structs.ERROR_RECORD.itemsize == 40


# -------------------------------------------------------------------------------------------- pack
def test_pack_fills_every_field():
    rec = structs.pack(structs.BARRIER_PARAMS, sig_peers=0x1000, err=0x2000, generation=0x3000, timeout_ns=10**9,
                       flags_offset=64, rank=3, world=8)
    assert rec.record.shape == (1,) and rec.dtype == structs.BARRIER_PARAMS
    assert int(rec["sig_peers"][0]) == 0x1000 and int(rec["world"][0]) == 8 and int(rec["timeout_ns"][0]) == 10**9


def test_pack_lets_reserved_default_to_zero():
    values = {name: 1 for name in structs.SIGNAL_PARAMS.names if name != "reserved"}
    rec = structs.pack(structs.SIGNAL_PARAMS, **values)
    assert int(rec["reserved"][0]) == 0


def test_pack_rejects_a_missing_field():
    values = {name: 1 for name in structs.BARRIER_PARAMS.names if name != "timeout_ns"}
    with pytest.raises(KeyError, match=r"missing \['timeout_ns'\]"):
        structs.pack(structs.BARRIER_PARAMS, **values)


def test_pack_rejects_an_unknown_field():
    values = {name: 1 for name in structs.BARRIER_PARAMS.names}
    with pytest.raises(KeyError, match=r"unknown \['timeout_s'\]"):
        structs.pack(structs.BARRIER_PARAMS, timeout_s=1, **values)


# --------------------------------------------------------------------------------- shared constants
def test_every_shared_constant_and_phase_code_matches_the_c_side():
    ok, log = nvrtc_compile('#include "common/constants.cuh"\n' + constants.static_asserts() + "\n")
    assert ok, f"ep/constants.py disagrees with cuda_src/common/constants.cuh:\n{log}"


def test_a_drifted_constant_fails_to_compile():
    text = constants.static_asserts().replace("kRouteChunk == 128", "kRouteChunk == 64")
    assert not nvrtc_compile('#include "common/constants.cuh"\n' + text + "\n")[0]


def test_every_phase_the_kernels_know_is_named_for_python():
    text = (jit.source_dir() / "common" / "constants.cuh").read_text()
    c_phases = dict((name, int(code)) for name, code in re.findall(r"(kPhase\w+) = (\d+)", text))
    assert c_phases == {c_name: code for code, (c_name, _) in constants.PHASES.items()}


def test_every_constant_of_the_header_is_in_the_table():
    text = (jit.source_dir() / "common" / "constants.cuh").read_text()
    declared = set(re.findall(r"constexpr int (k\w+) =", text)) - {"kWarpSize", "kVecBytes"}
    assert declared == set(constants.TABLE)


@pytest.mark.parametrize("L, W", [(1, 1), (2, 4), (64, 4), (256, 1), (8, 32)])
def test_info_layout_offsets_match_the_c_struct(L, W):
    lay = sizes.info_layout(L, W)
    lines = [f"static_assert(ep::InfoLayout({L}, {W}).{name} == {lay[name]}, \"{name}\");"
             for name in ("invalid_mask", "total_rows", "capacity", "n_recv_total", "counts", "base", "src_base",
                          "recv_n", "recv_prefix", "src_T", "peer_row", "rank_prefix", "size")]
    ok, log = nvrtc_compile(PRELUDE + "\n".join(lines) + "\n")
    assert ok, log


# ------------------------------------------------------------------------------------ info layout
@pytest.mark.parametrize("L", [1, 2, 8, 64, 256])
@pytest.mark.parametrize("W", [1, 2, 4, 8, 32])
def test_info_layout_is_contiguous_with_the_documented_size(L, W):
    lay = sizes.info_layout(L, W)
    lengths = {"invalid_mask": 1, "total_rows": 1, "capacity": 1, "n_recv_total": 1, "counts": L, "base": L + 1,
               "src_base": W * L, "recv_n": W, "recv_prefix": W + 1, "src_T": W, "peer_row": W * L, "rank_prefix": W * W}
    order = sorted(lengths, key=lambda name: lay[name])
    assert order == list(lengths), "fields in the order of InfoLayout in params.cuh"
    position = 0
    for name in order:
        assert lay[name] == position, name
        position += lengths[name]
    assert lay["size"] == position == 4 + 2 * L + 1 + 2 * W * L + 3 * W + 1 + W * W


# ---------------------------------------------------------------------------------- buffer arithmetic
@pytest.mark.parametrize("topk", [1, 2, 3, 8, 9, 32])
def test_meta_stride_holds_token_lexp_idx_and_weights_in_16_byte_rows(topk):
    stride = sizes.meta_stride(topk)
    assert stride % 16 == 0
    assert 8 + 12 * topk <= stride < 8 + 12 * topk + 16


@pytest.mark.parametrize("mode", ["ht", "ll"])
@pytest.mark.parametrize("world", [1, 2, 8])
def test_signal_regions_are_aligned_and_disjoint(mode, world):
    cfg = MoECommunicatorConfig(mode=mode, num_experts=8 * world, hidden_size=7168, topk=8, max_tokens_per_rank=1000)
    if mode == "ht":
        lay = sizes.ht_layout(cfg, world, combine_push=True)
        regions = [(lay.barrier_offset, constants.BARRIER_SLOTS * 8), (lay.cnt_offset, 2 * world * lay.cnt_stride),
                   (lay.dflag_offset, world * lay.max_chunks * 8), (lay.drange_offset, world * lay.max_chunks * 8)]
        assert lay.max_chunks == -(-1000 // constants.HT_CHUNK_TOKENS)
        assert lay.cnt_stride >= structs.COUNT_SLOT.itemsize + 4 * (cfg.num_experts + world)
        assert lay.cnt_stride % 16 == 0
        assert lay.data_bytes == world * 1000 * 7168 * 2
        assert lay.meta_bytes == world * 1000 * sizes.meta_stride(8)
        assert lay.land_bytes == lay.data_bytes   # one landing region per source, T_max rows each
    else:
        lay = sizes.ll_layout(cfg, world)
        B = constants.BARRIER_SLOTS
        regions = [(lay.cnt_offset, 2 * world * lay.cnt_stride), (lay.disp_cnt_offset, B * 8),
                   (lay.comb_cnt_offset, B * 8)]
        assert lay.cnt_stride % 16 == 0 and lay.cnt_stride >= structs.LL_COUNT_SLOT.itemsize + 4 * cfg.num_experts
        assert lay.out_bytes == 2 * 8 * world * 1000 * 7168 * 2     # double-buffered by dispatch parity
        assert lay.scale_bytes == 2 * 8 * (7168 // 128) * world * 1000 * 4
        assert lay.meta_stride % 16 == 0 and lay.meta_stride >= structs.LL_META_REC.itemsize + 8 * 8
    for (start, length), (next_start, _) in zip(regions, regions[1:]):
        assert start + length <= next_start
        assert next_start % 8 == 0
    assert regions[-1][0] + regions[-1][1] <= lay.sig_bytes
    assert lay.sig_bytes % 4096 == 0
    assert tuning.resolve(cfg, world).buffer_bytes == lay.total


@pytest.mark.parametrize("topk, experts, alignment", [(8, 256, 1), (8, 8, 1), (3, 16, 128), (1, 4, 1)])
def test_owned_output_holds_the_worst_case_flat_output(topk, experts, alignment):
    world, t_max, hidden = 4, 100, 64
    plain = MoECommunicatorConfig(num_experts=experts, hidden_size=hidden, topk=topk, max_tokens_per_rank=t_max,
                                  expert_alignment=alignment)
    owned = MoECommunicatorConfig(num_experts=experts, hidden_size=hidden, topk=topk, max_tokens_per_rank=t_max,
                                  expert_alignment=alignment, owned_output=True)
    L = experts // world
    # Every token of every rank names min(K, L) of our experts, and every expert ends in alignment - 1 pad rows.
    rows = world * t_max * min(topk, L) + L * (alignment - 1)
    assert sizes.owned_output_rows(owned, world) == rows
    assert sizes.ht_layout(plain, world, False).out_bytes == 0
    assert sizes.ht_layout(owned, world, False).out_bytes == rows * hidden * 2
    assert tuning.resolve(owned, world).buffer_bytes - tuning.resolve(plain, world).buffer_bytes == rows * hidden * 2


def test_push_combine_adds_one_landing_buffer_of_the_data_buffers_size():
    world = 4
    cfg = MoECommunicatorConfig(num_experts=16, hidden_size=64, topk=2, max_tokens_per_rank=100)
    pull = MoECommunicatorConfig(num_experts=16, hidden_size=64, topk=2, max_tokens_per_rank=100,
                                 ht_tuning=HtTuning(combine="pull"))
    landing = world * 100 * 64 * 2
    assert tuning.resolve(cfg, world).buffer_bytes - tuning.resolve(pull, world).buffer_bytes == landing
    assert sizes.ht_layout(cfg, world, False).land_bytes == 0


@pytest.mark.parametrize("name", sorted(structs.C_STRUCTS))
def test_pack_writes_each_field_at_its_offset_like_numpy_does(name):
    """The struct.Struct fast path against NumPy's own field assignment, with distinct values per field."""
    dtype = structs.C_STRUCTS[name]
    rng = np.random.default_rng(len(name))
    values = {}
    for field in dtype.names:
        fdt = dtype.fields[field][0]
        hi = min(np.iinfo(fdt).max, 2**62)
        lo = max(np.iinfo(fdt).min, -2**62)
        values[field] = int(rng.integers(lo, hi))
    fast = structs.pack(dtype, **values)
    slow = np.zeros(1, dtype=dtype)
    for field, value in values.items():
        slow[field] = value
    assert fast.tobytes() == slow.tobytes()
    assert fast.record.tobytes() == slow.tobytes()


def test_params_argv_is_the_address_of_a_pointer_to_the_record():
    """cuLaunchKernel's kernelParams: an array of one pointer, to the struct's bytes; it survives update."""
    import ctypes
    values = {name: i + 1 for i, name in enumerate(structs.BARRIER_PARAMS.names)}
    for params in (structs.pack(structs.BARRIER_PARAMS, **values),
                   structs.pack(structs.BARRIER_PARAMS, **values).update(rank=5)):
        target = ctypes.c_uint64.from_address(params.argv).value
        raw = ctypes.string_at(target, structs.BARRIER_PARAMS.itemsize)
        assert raw == params.tobytes() == params.record.tobytes()


def _random_values(dtype, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    values = {}
    for field in dtype.names:
        fdt = dtype.fields[field][0]
        values[field] = int(rng.integers(max(np.iinfo(fdt).min, -2**62), min(np.iinfo(fdt).max, 2**62)))
    return values


@pytest.mark.parametrize("name", sorted(structs.C_STRUCTS))
def test_update_equals_packing_the_merged_fields_and_leaves_the_template_alone(name):
    dtype = structs.C_STRUCTS[name]
    base, new = _random_values(dtype, 1), _random_values(dtype, 2)
    changed = {f: new[f] for f in dtype.names[::3]}
    template = structs.pack(dtype, **base)
    before = template.tobytes()
    updated = template.update(**changed)
    assert updated.tobytes() == structs.pack(dtype, **{**base, **changed}).tobytes()
    assert template.tobytes() == before
    assert updated.dtype == dtype and updated.argv != template.argv


def test_update_refuses_unknown_fields_and_values_out_of_range():
    template = structs.pack(structs.BARRIER_PARAMS, **{n: 1 for n in structs.BARRIER_PARAMS.names})
    with pytest.raises(KeyError, match="unknown"):
        template.update(valeu=3)
    with pytest.raises(OverflowError, match="rank"):
        template.update(rank=2**40)


def test_pack_refuses_a_value_its_field_cannot_hold():
    values = {name: 1 for name in structs.BARRIER_PARAMS.names}
    values["rank"] = 2**40
    with pytest.raises(OverflowError):
        structs.pack(structs.BARRIER_PARAMS, **values)
