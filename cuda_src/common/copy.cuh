// Warp-cooperative row copies with 16-byte accesses, several loads in flight before the stores.
#pragma once
#include "common/config.cuh"
#include "common/ptx.cuh"

namespace ep {

constexpr int kCopyUnroll = 4;   // 16-byte vectors in flight per lane (4 x 32 lanes = 2 KB per warp)

// Lanes 0..popc(mask)-1 receive, in ascending bit order, the value lane `bit` holds (compaction).
__device__ __forceinline__ u64 compact_by_mask(u32 mask, u64 value_of_lane, int lane) {
  const int n = __popc(mask);
  const int from = lane < n ? static_cast<int>(__fns(mask, 0, lane + 1)) : 0;
  return __shfl_sync(0xFFFFFFFFu, value_of_lane, from);
}


// Copy one source row to `n` destination rows (each read once, stored n times); lane j holds destination
// j (n <= 32). The source is read with L2-only loads: it may be a buffer a peer wrote during this kernel.
template <int U = kCopyUnroll>
__device__ __forceinline__ void warp_copy_multi(u64 my_dst, int n, const u8* src, int bytes, int lane) {
  const int nvec = bytes / kVecBytes;
  const uint4* s = reinterpret_cast<const uint4*>(src);
  for (int base = 0; base < nvec; base += kWarpSize * U) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * kWarpSize + lane;
      if (i < nvec) v[u] = ld_cg_v4(s + i);
    }
    for (int j = 0; j < n; ++j) {
      uint4* d = reinterpret_cast<uint4*>(__shfl_sync(0xFFFFFFFFu, my_dst, j));
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * kWarpSize + lane;
        if (i < nvec) st_v4(d + i, v[u]);
      }
    }
  }
}

// Copy `bytes` (multiple of 16) from src to dst; every lane of the warp must call it with the same dst.
template <int U = kCopyUnroll>
__device__ __forceinline__ void warp_copy(u8* dst, const u8* src, int bytes, int lane) {
  warp_copy_multi<U>(reinterpret_cast<u64>(dst), 1, src, bytes, lane);
}

// A warp's TMA staging row in shared memory: lane 0 bulk-loads one row into it (completing on the warp's
// mbarrier) and bulk-stores it to every destination. One row in flight per warp: the next load waits until
// the previous stores have read the row.
// Lane 0 only: start loading `bytes` from src.
__device__ __forceinline__ void staged_row_load(u8* stage, const u8* src, u32 bytes, u64* bar) {
  tma_wait_read<0>();
  mbar_arrive_expect_tx(bar, bytes);
  tma_load(stage, src, bytes, bar);
}

// Lane 0 only: wait until the load has landed; `phase` is the mbarrier parity, flipped per load.
__device__ __forceinline__ void staged_row_wait(u64* bar, u32& phase) {
  while (!mbar_try_wait(bar, phase)) {}
  phase ^= 1u;
}

// Whole warp: lane 0 bulk-stores the staged row to the n destinations that lanes 0..n-1 hold.
__device__ __forceinline__ void staged_row_store(u64 my_dst, int n, const u8* stage, u32 bytes, int lane) {
  for (int j = 0; j < n; ++j) {
    const u64 dst = __shfl_sync(0xFFFFFFFFu, my_dst, j);
    if (lane == 0) tma_store(reinterpret_cast<void*>(dst), stage, bytes);
  }
  if (n && lane == 0) tma_commit();
}

__device__ __forceinline__ void warp_zero(u8* dst, int bytes, int lane) {
  const int nvec = bytes / kVecBytes;
  uint4* d = reinterpret_cast<uint4*>(dst);
  const uint4 z = make_uint4(0u, 0u, 0u, 0u);
  for (int i = lane; i < nvec; i += kWarpSize) st_v4(d + i, z);
}

}  // namespace ep
