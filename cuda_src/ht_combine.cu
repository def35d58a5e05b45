// HT combine: expert-side reduction, then source-side gather.
//
// ht_combine_reduce (expert rank, local): for every token i it received from source s at slot pos,
//   acc = 0; for k = 0..K-1 with recv_rows[i][k] >= 0: acc = fl32(acc + fl32(w * y[row]))  (no FMA)
//   and stores bf16(acc) into its OWN data buffer at data[s][pos] (the dispatch slot, free again: the
//   dispatch kernel finished expanding it). One partial per (token, rank) is all that crosses NVLink.
// The host then runs ep_barrier: every rank's partials are written and visible (release/acquire, sys).
// ht_combine_gather (source rank): token t sums, in ascending rank order, the partials peers hold at
//   data_peers[d][rank][send_pos[t][d]], in fp32, and writes bf16 out[t]; a token sent nowhere is zero.
//   EP_CMB_TMA=1: each warp streams its (token, segment, peer) items through a kCombineStages-deep ring of
//   kCombineSegBytes shared-memory stages filled by cp.async.bulk from peer memory; lane 0 produces,
//   the whole warp reduces from shared memory. EP_CMB_TMA=0: 16-byte L2-only loads straight from peers.
// Rounding matches ep/reference.py exactly (fl32 adds in a fixed order, round-to-nearest-even to bf16).
#include "common/params.cuh"
#include "common/reduce.cuh"

namespace ep {

__device__ __forceinline__ u32 dest_mask(const HtCombineParams& p, int t, int lane, int* my_pos) {
  *my_pos = lane < p.world ? p.send_pos[static_cast<i64>(t) * p.world + lane] : -1;
  return __ballot_sync(0xFFFFFFFFu, *my_pos >= 0);
}

}  // namespace ep

// 32 warps of the narrow fold (<= 64 registers): ep/sizes.py COMBINE_REDUCE_WARPS.
extern "C" __global__ void __launch_bounds__(1024, 1) ht_combine_reduce(const ep::HtCombineParams p) {
  using namespace ep;
  const int W = p.world, K = p.topk;
  const InfoLayout lay(p.local_experts, W);
  const int nwarps = blockDim.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int gw = blockIdx.x * nwarps + threadIdx.x / kWarpSize;
  const int RW = gridDim.x * nwarps;
  const int n_recv = p.info[lay.n_recv_total];
  u8* my_data = reinterpret_cast<u8*>(p.data_peers[p.rank]);
  for (int i = gw; i < n_recv; i += RW) {
    int s = 0;
    while (s + 1 < W && p.info[lay.recv_prefix + s + 1] <= i) ++s;
    const int pos = i - p.info[lay.recv_prefix + s];
    int row = -1;
    float w = 0.f;
    if (lane < K) {
      row = p.recv_rows[static_cast<i64>(i) * K + lane];
      w = p.recv_w[static_cast<i64>(i) * K + lane];
    }
    uint4* dst = reinterpret_cast<uint4*>(my_data + (static_cast<u64>(s) * p.max_tokens + pos) * p.row_bytes);
    warp_weighted_sum<kFoldRowsNarrow, kFoldVecsNarrow>(dst, p.expert_out, p.row_bytes, K, row, w, lane);
  }
}

namespace ep {

constexpr int kSegVecPerLane = kCombineSegBytes / kVecBytes / kWarpSize;   // 8

// Walks (token, segment, peer) items of one warp in the order the sums must happen.
struct GatherCursor {
  int t, g, d;
  u32 mask, rem;
  bool first;   // d is the first peer of its (token, segment)
};

__device__ __forceinline__ u32 token_mask(const HtCombineParams& p, int t) {
  u32 m = 0;
  if (t < p.num_tokens)
    for (int d = 0; d < p.world; ++d) m |= (p.send_pos[static_cast<i64>(t) * p.world + d] >= 0 ? 1u : 0u) << d;
  return m;
}

__device__ __forceinline__ bool cursor_next(const HtCombineParams& p, GatherCursor& c, int nseg, int stride) {
  while (c.t < p.num_tokens) {
    if (c.rem) {
      c.d = __ffs(c.rem) - 1;
      c.first = c.rem == c.mask;
      c.rem &= c.rem - 1;
      return true;
    }
    if (c.mask && ++c.g < nseg) {
      c.rem = c.mask;
      continue;
    }
    c.t += stride;
    c.g = 0;
    c.mask = token_mask(p, c.t);
    c.rem = c.mask;
  }
  return false;
}

__device__ __forceinline__ const u8* partial_src(const HtCombineParams& p, int t, int d) {
  const int pos = p.send_pos[static_cast<i64>(t) * p.world + d];
  return reinterpret_cast<const u8*>(p.data_peers[d]) + (static_cast<u64>(p.rank) * p.max_tokens + pos) * p.row_bytes;
}

__device__ __forceinline__ void gather_tma(const HtCombineParams& p, u8* stages, u64* bars, int gw, int RW, int lane) {
  const int nseg = (p.row_bytes + kCombineSegBytes - 1) / kCombineSegBytes;
  if (lane == 0) {
    for (int j = 0; j < kCombineStages; ++j) mbar_init(&bars[j], 1);
    fence_mbar_init();
  }
  __syncwarp();
  GatherCursor prod{gw, 0, 0, 0, 0, false}, cons{gw, 0, 0, 0, 0, false};
  prod.mask = prod.rem = token_mask(p, gw);
  cons.mask = cons.rem = prod.mask;
  auto issue = [&](int stage) {
    const int bytes = min(kCombineSegBytes, p.row_bytes - prod.g * kCombineSegBytes);
    mbar_arrive_expect_tx(&bars[stage], bytes);
    tma_load(stages + stage * kCombineSegBytes, partial_src(p, prod.t, prod.d) + prod.g * kCombineSegBytes, bytes,
             &bars[stage]);
  };
  if (lane == 0)
    for (int j = 0; j < kCombineStages; ++j)
      if (cursor_next(p, prod, nseg, RW)) issue(j);
  float acc[kSegVecPerLane][8];
  for (int j = 0; cursor_next(p, cons, nseg, RW); ++j) {
    const int stage = j % kCombineStages;
    while (!mbar_try_wait(&bars[stage], (j / kCombineStages) & 1)) {}
    const int nv = min(kCombineSegBytes, p.row_bytes - cons.g * kCombineSegBytes) / kVecBytes;
    const uint4* src = reinterpret_cast<const uint4*>(stages + stage * kCombineSegBytes);
#pragma unroll
    for (int u = 0; u < kSegVecPerLane; ++u) {
      if (cons.first)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[u][e] = 0.f;
      const int vi = u * kWarpSize + lane;
      if (vi < nv) add8(acc[u], src[vi]);
    }
    if (cons.rem == 0) {   // last peer of this (token, segment): write it out
      uint4* dst = reinterpret_cast<uint4*>(p.out + static_cast<u64>(cons.t) * p.row_bytes + cons.g * kCombineSegBytes);
#pragma unroll
      for (int u = 0; u < kSegVecPerLane; ++u) {
        const int vi = u * kWarpSize + lane;
        if (vi < nv) st_v4(dst + vi, pack8(acc[u]));
      }
    }
    __syncwarp();
    if (lane == 0) {
      fence_proxy_async_shared();   // our generic reads of the stage happen before the next async write
      if (cursor_next(p, prod, nseg, RW)) issue(stage);
    }
  }
}

__device__ __forceinline__ void gather_direct(const HtCombineParams& p, int gw, int RW, int lane) {
  for (int t = gw; t < p.num_tokens; t += RW) {
    int my_pos;
    const u32 mask = dest_mask(p, t, lane, &my_pos);
    const u64 src = lane < p.world && my_pos >= 0 ? reinterpret_cast<u64>(partial_src(p, t, lane)) : 0;
    uint4* dst = reinterpret_cast<uint4*>(p.out + static_cast<u64>(t) * p.row_bytes);
    warp_sum_rows<kFoldRowsNarrow, kFoldVecsNarrow>(dst, compact_by_mask(mask, src, lane), __popc(mask), p.row_bytes,
                                                    lane);
  }
}

}  // namespace ep

// Launch bounds: the host may launch up to kCombineWarpsMax warps, so the registers must allow them.
extern "C" __global__ void __launch_bounds__(ep::kCombineWarpsMax * 32, 1) ht_combine_gather(const ep::HtCombineParams p) {
  using namespace ep;
  extern __shared__ __align__(128) u8 smem[];   // TMA: [warps][kCombineStages][kCombineSegBytes]
  __shared__ u64 bars[32 * kCombineStages];
  const int nwarps = combine_warps(gridDim.x);   // the host launches exactly this many warps
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int gw = blockIdx.x * nwarps + warp;
  const int RW = gridDim.x * nwarps;
  // Tokens sent nowhere combine to zero rows.
  for (int t = gw; t < p.num_tokens; t += RW) {
    int my_pos;
    if (dest_mask(p, t, lane, &my_pos) == 0) warp_zero(p.out + static_cast<u64>(t) * p.row_bytes, p.row_bytes, lane);
  }
  if (kCombineTma) {
    gather_tma(p, smem + static_cast<u64>(warp) * kCombineStages * kCombineSegBytes, &bars[warp * kCombineStages], gw,
               RW, lane);
  } else {
    gather_direct(p, gw, RW, lane);
  }
}
