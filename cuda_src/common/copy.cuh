// Warp-cooperative row copies with 16-byte accesses, several loads in flight before the stores.
#pragma once
#include "common/config.cuh"
#include "common/ptx.cuh"

namespace ep {

constexpr int kCopyUnroll = 4;   // 16-byte vectors in flight per lane (4 x 32 lanes = 2 KB per warp)

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

__device__ __forceinline__ void warp_zero(u8* dst, int bytes, int lane) {
  const int nvec = bytes / kVecBytes;
  uint4* d = reinterpret_cast<uint4*>(dst);
  const uint4 z = make_uint4(0u, 0u, 0u, 0u);
  for (int i = lane; i < nvec; i += kWarpSize) st_v4(d + i, z);
}

}  // namespace ep
