// Fixed-width types and bf16 bit helpers. NVRTC gets no C library headers from us, so define our own.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

namespace ep {

constexpr i32 kI32Max = 0x7FFFFFFF;

// bf16 travels as its 16-bit pattern. Conversions are spelled out so they match ep/reference.py exactly.
__device__ __forceinline__ float bf16_to_f32(u32 bits16) { return __uint_as_float(bits16 << 16); }

__device__ __forceinline__ u32 f32_to_bf16(float f) {
  u32 u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u >> 16) | 0x40u;   // NaN stays a quiet NaN
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;                       // round to nearest even
}

// 8 bf16 in one 16-byte vector: unpack to fp32 and pack back.
__device__ __forceinline__ void unpack8(const uint4& v, float* f) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = bf16_to_f32(w[i] & 0xFFFFu);
    f[2 * i + 1] = bf16_to_f32(w[i] >> 16);
  }
}

__device__ __forceinline__ uint4 pack8(const float* f) {
  uint4 v;
  v.x = f32_to_bf16(f[0]) | (f32_to_bf16(f[1]) << 16);
  v.y = f32_to_bf16(f[2]) | (f32_to_bf16(f[3]) << 16);
  v.z = f32_to_bf16(f[4]) | (f32_to_bf16(f[5]) << 16);
  v.w = f32_to_bf16(f[6]) | (f32_to_bf16(f[7]) << 16);
  return v;
}

template <typename T>
__device__ __forceinline__ T* byte_offset(T* p, u64 bytes) {
  return reinterpret_cast<T*>(reinterpret_cast<u8*>(p) + bytes);
}
template <typename T>
__device__ __forceinline__ const T* byte_offset(const T* p, u64 bytes) {
  return reinterpret_cast<const T*>(reinterpret_cast<const u8*>(p) + bytes);
}

}  // namespace ep
