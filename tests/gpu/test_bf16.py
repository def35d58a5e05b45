"""The kernels' float32 -> bf16 pack (cuda_src/common/types.cuh) against ep.reference.f32_to_bf16, bit for bit."""
from __future__ import annotations

import numpy as np

from ep import jit
from ep.reference import f32_to_bf16

_SOURCE = r'''
#include "common/types.cuh"
extern "C" __global__ void pack_pairs(const float* f, unsigned int* out, long long n_pairs) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_pairs; i += (long long)gridDim.x * blockDim.x)
    out[i] = ep::f32x2_to_bf16x2(f[2 * i], f[2 * i + 1]);
}
'''


def test_the_gpu_pack_rounds_like_the_reference_for_random_and_special_values(session_seed):
    import cupy
    rng = np.random.default_rng(session_seed)
    special = np.array([0x00000000, 0x80000000, 0x00008000, 0x00018000, 0x3F808000, 0x3F818000, 0x3F807FFF,
                        0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001,
                        0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x00000001, 0x807FFFFF], np.uint32)
    every_bf16 = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    bits = np.concatenate([special, every_bf16, every_bf16 | np.uint32(0x8000), every_bf16 | np.uint32(0x7FFF),
                           rng.integers(0, 1 << 32, size=1 << 22, dtype=np.uint64).astype(np.uint32)])
    bits = np.concatenate([bits, bits[: len(bits) % 2]])   # an even count: the kernel packs pairs
    values = bits.view(np.float32)
    mod = cupy.RawModule(code=_SOURCE, options=("-std=c++17", f"-I{jit.source_dir()}"))
    out = cupy.empty(len(values) // 2, np.uint32)
    mod.get_function("pack_pairs")((256,), (256,), (cupy.asarray(values), out, np.int64(len(values) // 2)))
    got = out.get().view(np.uint16)   # little endian: element 2i in the low half, 2i + 1 in the high half
    expected = f32_to_bf16(values)
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, [(hex(int(bits[i])), hex(int(got[i])), hex(int(expected[i]))) for i in bad[:5]]


_E4M3 = r'''
#include "common/fp8.cuh"
extern "C" __global__ void cast_pairs(const float* f, unsigned short* out, long long n_pairs) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_pairs; i += (long long)gridDim.x * blockDim.x)
    out[i] = ep::f32x2_to_e4m3x2(f[2 * i], f[2 * i + 1]);
}
'''


def test_the_gpu_e4m3_cast_rounds_like_the_reference_for_random_and_special_values(session_seed):
    import cupy
    from ep.reference import f32_to_e4m3
    rng = np.random.default_rng(session_seed)
    special = np.array([0.0, -0.0, 448.0, -448.0, 464.0, 1e30, np.inf, -np.inf, np.nan, -np.nan, 2.0 ** -9, 2.0 ** -10,
                        3 * 2.0 ** -10, 2.0 ** -6, 1.0625, 1.1875, 447.99, 1e-40], np.float32)
    grid = np.concatenate([np.linspace(-500, 500, 200_001, dtype=np.float32), (2.0 ** np.arange(-12, 10, 0.01)).astype(np.float32)])
    bits = rng.integers(0, 1 << 32, size=1 << 21, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([special, grid, -grid, bits])
    values = np.concatenate([values, values[: len(values) % 2]])
    mod = cupy.RawModule(code=_E4M3, options=("-std=c++17", f"-I{jit.source_dir()}"))
    out = cupy.empty(len(values) // 2, np.uint16)
    mod.get_function("cast_pairs")((256,), (256,), (cupy.asarray(values), out, np.int64(len(values) // 2)))
    got = out.get().view(np.uint8)   # little endian: element 2i in the low byte
    expected = f32_to_e4m3(values)
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, [(float(values[i]), hex(int(got[i])), hex(int(expected[i]))) for i in bad[:8]]
