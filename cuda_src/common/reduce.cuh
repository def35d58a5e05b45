// Warp-cooperative bf16 reductions with the exact rounding of ep/reference.py (fp32 mul, then fp32 add,
// never fused; round to nearest even at the end), shared by the HT and LL combines.
#pragma once
#include "common/copy.cuh"

namespace ep {

constexpr int kReduceUnroll = 4;   // 16-byte vectors in flight per lane and source row

__device__ __forceinline__ void add8(float* acc, const uint4& v, float w) {
  float f[8];
  unpack8(v, f);
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(w, f[j]));
}

__device__ __forceinline__ void add8(float* acc, const uint4& v) {
  float f[8];
  unpack8(v, f);
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = __fadd_rn(acc[j], f[j]);
}

// dst = bf16( sum over k = 0..K-1 with row_k >= 0 of w_k * y[row_k] ), k ascending. Lane k holds
// (my_row, my_w) of slot k. y rows are local (read through the non-coherent path).
__device__ __forceinline__ void warp_weighted_sum(uint4* dst, const u8* y, int row_bytes, int K, int my_row,
                                                  float my_w, int lane) {
  const int nvec = row_bytes / kVecBytes;
  for (int base = 0; base < nvec; base += kWarpSize * kReduceUnroll) {
    float acc[kReduceUnroll][8];
#pragma unroll
    for (int u = 0; u < kReduceUnroll; ++u)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[u][j] = 0.f;
    for (int k = 0; k < K; ++k) {
      const int rk = __shfl_sync(0xFFFFFFFFu, my_row, k);
      const float wk = __shfl_sync(0xFFFFFFFFu, my_w, k);
      if (rk < 0) continue;
      const uint4* src = reinterpret_cast<const uint4*>(y + static_cast<u64>(rk) * row_bytes);
      uint4 v[kReduceUnroll];
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) {
        const int vi = base + u * kWarpSize + lane;
        if (vi < nvec) v[u] = ld_nc_v4(src + vi);
      }
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u)
        if (base + u * kWarpSize + lane < nvec) add8(acc[u], v[u], wk);
    }
#pragma unroll
    for (int u = 0; u < kReduceUnroll; ++u) {
      const int vi = base + u * kWarpSize + lane;
      if (vi < nvec) st_v4(dst + vi, pack8(acc[u]));
    }
  }
}

// dst = bf16( sum of the n rows whose addresses lanes 0..n-1 hold, in lane order ). The rows may be in
// peer memory or written by peers during this kernel: L2-only loads. n == 0 writes zeros.
__device__ __forceinline__ void warp_sum_rows(uint4* dst, u64 my_src, int n, int row_bytes, int lane) {
  const int nvec = row_bytes / kVecBytes;
  for (int base = 0; base < nvec; base += kWarpSize * kReduceUnroll) {
    float acc[kReduceUnroll][8];
#pragma unroll
    for (int u = 0; u < kReduceUnroll; ++u)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[u][j] = 0.f;
    for (int j = 0; j < n; ++j) {
      const uint4* src = reinterpret_cast<const uint4*>(__shfl_sync(0xFFFFFFFFu, my_src, j));
      uint4 v[kReduceUnroll];
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) {
        const int vi = base + u * kWarpSize + lane;
        if (vi < nvec) v[u] = ld_cg_v4(src + vi);
      }
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u)
        if (base + u * kWarpSize + lane < nvec) add8(acc[u], v[u]);
    }
#pragma unroll
    for (int u = 0; u < kReduceUnroll; ++u) {
      const int vi = base + u * kWarpSize + lane;
      if (vi < nvec) st_v4(dst + vi, pack8(acc[u]));
    }
  }
}

// Lanes 0..popc(mask)-1 receive, in ascending bit order, the value lane `bit` holds (compaction).
__device__ __forceinline__ u64 compact_by_mask(u32 mask, u64 value_of_lane, int lane) {
  const int n = __popc(mask);
  const int from = lane < n ? static_cast<int>(__fns(mask, 0, lane + 1)) : 0;
  return __shfl_sync(0xFFFFFFFFu, value_of_lane, from);
}

}  // namespace ep
