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

// std::conditional without the C++ library (NVRTC gets none from us): a compile-time policy choice.
template <bool kCond, class A, class B>
struct Select { using type = A; };
template <class A, class B>
struct Select<false, A, B> { using type = B; };

// bf16 travels as its 16-bit pattern. Conversions match ep/reference.py bit for bit.
__device__ __forceinline__ float bf16_to_f32(u32 bits16) { return __uint_as_float(bits16 << 16); }

// Two floats -> one bf16x2 word (lo in bits 0..15), round to nearest even in one instruction
// (cvt.rn.bf16x2.f32, sm_80+); a NaN becomes the canonical NaN 0x7FFF. The pack is hot: a hand-written
// rounding cost ~7 integer instructions per element and made the combine reductions issue-bound.
__device__ __forceinline__ u32 f32x2_to_bf16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
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
  return make_uint4(f32x2_to_bf16x2(f[0], f[1]), f32x2_to_bf16x2(f[2], f[3]), f32x2_to_bf16x2(f[4], f[5]),
                    f32x2_to_bf16x2(f[6], f[7]));
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
