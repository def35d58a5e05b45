// Warp-cooperative bf16 reductions with the exact rounding of ep/reference.py (fp32 mul, then fp32 add,
// never fused; round to nearest even at the end), shared by the HT and LL combines.
#pragma once
#include "common/copy.cuh"

namespace ep {

// Default loads in flight per lane of a fold: kRowBatch source rows x kReduceUnroll 16-byte vectors.
constexpr int kReduceUnroll = 4;

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

constexpr int kRowBatch = 4;

// Fold shapes (rows x vectors in flight per lane). A warp of the narrow shape needs <= 64 registers, so a
// block can run 32 of them: the bandwidth-bound HT combine reduction wants more warps in flight more than
// more vectors per warp. The latency-bound LL combine keeps the wide one.
constexpr int kFoldRowsNarrow = 4, kFoldVecsNarrow = 2;

// dst = bf16( fold over j = 0..n-1 of acc = fl32(acc + fl32(w_j * row_j)) ), starting from 0, where lane j
// holds (address of row_j, w_j). Loads of kRows rows x kVecs vectors per lane are in flight at once;
// the adds still happen strictly in j order. `weighted` false: plain sum (w ignored).
// Rows may live in peer memory or have been written by peers during this kernel: L2-only loads.
template <bool kWeighted, int kRows = kRowBatch, int kVecs = kReduceUnroll>
__device__ __forceinline__ void warp_fold_rows(uint4* dst, u64 my_src, float my_w, int n, int row_bytes, int lane) {
  const int nvec = row_bytes / kVecBytes;
  for (int base = 0; base < nvec; base += kWarpSize * kVecs) {
    float acc[kVecs][8];
#pragma unroll
    for (int u = 0; u < kVecs; ++u)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[u][e] = 0.f;
    for (int j0 = 0; j0 < n; j0 += kRows) {
      uint4 v[kRows][kVecs];
      float w[kRows];
#pragma unroll
      for (int b = 0; b < kRows; ++b) {
        const uint4* src = reinterpret_cast<const uint4*>(__shfl_sync(0xFFFFFFFFu, my_src, j0 + b < n ? j0 + b : 0));
        w[b] = __shfl_sync(0xFFFFFFFFu, my_w, j0 + b < n ? j0 + b : 0);
#pragma unroll
        for (int u = 0; u < kVecs; ++u) {
          const int vi = base + u * kWarpSize + lane;
          if (j0 + b < n && vi < nvec) v[b][u] = ld_cg_v4(src + vi);
        }
      }
#pragma unroll
      for (int b = 0; b < kRows; ++b) {
        if (j0 + b >= n) break;
#pragma unroll
        for (int u = 0; u < kVecs; ++u) {
          if (base + u * kWarpSize + lane >= nvec) continue;
          if (kWeighted) add8(acc[u], v[b][u], w[b]);
          else add8(acc[u], v[b][u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kVecs; ++u) {
      const int vi = base + u * kWarpSize + lane;
      if (vi < nvec) st_v4(dst + vi, pack8(acc[u]));
    }
  }
}

// A token's slots, compacted: lane k holds (my_row, my_w) of slot k (my_row < 0: not a row here). Returns n;
// lanes 0..n-1 get (*src, *w) = (address of y[row], weight) of the used slots, k ascending.
__device__ __forceinline__ int compact_slots(const u8* y, int row_bytes, int K, int my_row, float my_w, int lane,
                                             u64* src, float* w) {
  const u32 mask = __ballot_sync(0xFFFFFFFFu, lane < K && my_row >= 0);
  const u64 addr = my_row >= 0 ? reinterpret_cast<u64>(y) + static_cast<u64>(my_row) * row_bytes : 0;
  const int n = __popc(mask);
  *src = compact_by_mask(mask, addr, lane);
  *w = __shfl_sync(0xFFFFFFFFu, my_w, lane < n ? static_cast<int>(__fns(mask, 0, lane + 1)) : 0);
  return n;
}

// dst = bf16( sum over k = 0..K-1 with row_k >= 0 of w_k * y[row_k] ), k ascending; lane k holds
// (my_row, my_w) of slot k.
template <int kRows = kRowBatch, int kVecs = kReduceUnroll>
__device__ __forceinline__ void warp_weighted_sum(uint4* dst, const u8* y, int row_bytes, int K, int my_row,
                                                  float my_w, int lane) {
  u64 src;
  float w;
  const int n = compact_slots(y, row_bytes, K, my_row, my_w, lane, &src, &w);
  warp_fold_rows<true, kRows, kVecs>(dst, src, w, n, row_bytes, lane);
}

// dst = bf16( sum of the n rows whose addresses lanes 0..n-1 hold, in lane order ); n == 0 writes zeros.
template <int kRows = kRowBatch, int kVecs = kReduceUnroll>
__device__ __forceinline__ void warp_sum_rows(uint4* dst, u64 my_src, int n, int row_bytes, int lane) {
  warp_fold_rows<false, kRows, kVecs>(dst, my_src, 0.f, n, row_bytes, lane);
}

}  // namespace ep
