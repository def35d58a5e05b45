// FP8 (e4m3) block scaling of bf16 rows, with the rounding ep/reference.py specifies (fp8_cast):
// per group of 128 channels amax = max |x| (NaN ignored) floored at 1e-4; scale = amax / 448 and
// values x * (448 / amax) (IEEE float32 division and multiply), or with power-of-two scales (round_scale)
// scale = 2^e, e = ceil(log2(amax / 448)) from the float bits (exponent clamped to [1, 254] biased) and
// values x * 2^-e; then e4m3 round-to-nearest-even with saturation to +-448 (cvt.rn.satfinite).
#pragma once
#include "common/types.cuh"

namespace ep {

enum Fp8Mode : int { kBf16 = 0, kFp8 = 1, kFp8Pow2 = 2, kFp8Ue8m0 = 3 };

constexpr float kE4m3Max = 448.f;
constexpr float kAmaxFloor = 1e-4f;

// Two floats -> two e4m3 bytes (lo in bits 0..7).
__device__ __forceinline__ u16 f32x2_to_e4m3x2(float lo, float hi) {
  u16 r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

// A group's scale (what is stored: the dequantization factor) and the multiplier applied to its values.
template <int kMode>
__device__ __forceinline__ void fp8_scale(float amax, float* scale, float* mult) {
  amax = fmaxf(amax, kAmaxFloor);
  const float s = __fdiv_rn(amax, kE4m3Max);
  if (kMode == kFp8) {
    *scale = s;
    *mult = __fdiv_rn(kE4m3Max, amax);
  } else {
    const u32 bits = __float_as_uint(s);
    int e = static_cast<int>((bits >> 23) & 0xFFu) + ((bits & 0x7FFFFFu) != 0u ? 1 : 0);
    e = min(max(e, 1), 254);
    *scale = __uint_as_float(static_cast<u32>(e) << 23);
    *mult = __uint_as_float(static_cast<u32>(254 - e) << 23);
  }
}

// The UE8M0 byte of a power-of-two scale: its biased exponent.
__device__ __forceinline__ u32 ue8m0_of(float scale) { return (__float_as_uint(scale) >> 23) & 0xFFu; }

// 8 bf16 channels (one 16-byte vector) -> 8 e4m3 bytes (one 8-byte word), times `mult`.
__device__ __forceinline__ uint2 e4m3x8(const uint4& v, float mult) {
  float f[8];
  unpack8(v, f);
  u32 w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = f32x2_to_e4m3x2(__fmul_rn(f[2 * i], mult), __fmul_rn(f[2 * i + 1], mult));
  return make_uint2(w[0] | (w[1] << 16), w[2] | (w[3] << 16));
}

__device__ __forceinline__ float absmax8(const uint4& v) {
  float f[8];
  unpack8(v, f);
  float m = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(f[i]));
  return m;
}

}  // namespace ep
