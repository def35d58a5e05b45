// HT combine: expert-side reduction, then the source-side sum of the partials.
//
// ht_combine_reduce (expert rank, local): for every token i it received at slot pos from source s, among the
//   items [item_lo, item_hi) of this launch,
//   acc = 0; for k = 0..K-1 with recv_rows[i][k] >= 0: acc = fl32(acc + fl32(w * y[row]))  (no FMA)
//   and stores bf16(acc) into its OWN data buffer at data[s][pos] (the dispatch slot, free again: the
//   dispatch kernel finished expanding it). One partial per (token, rank) is all that crosses NVLink.
// EP_COMBINE_PUSH=1 (default): the host launches the reduce once per peer s and has the copy engines copy
//   data[s][0, n_s) into s's landing buffer at land[rank] while the next peer's tokens are reduced; the own
//   tokens' partials (reduced last) stay in data[rank]. After the host's ep_barrier every partial of our
//   tokens is local, and ht_combine_sum adds them, in ascending rank order, in fp32 (16-byte loads).
// EP_COMBINE_PUSH=0: the reduce skips the rank's own tokens; after ep_barrier,
// ht_combine_gather (source rank): token t sums, in ascending rank order, the partials peers hold at
//   data_peers[d][rank][send_pos[t][d]], in fp32, and writes bf16 out[t]; a token sent nowhere is zero.
//   Its own rank's partial is folded from the local expert rows where the gather needs it, with the same
//   rounding, instead of going through the data buffer: 1/W of the reduction runs while the NVLink pulls
//   are in flight and its partials are neither written nor read back (docs/perf.md row 24).
//   EP_CMB_TMA=1: each warp streams its (token, segment, peer) items through a kCombineStages-deep ring of
//   kCombineSegBytes shared-memory stages filled by cp.async.bulk from peer memory; lane 0 produces,
//   the whole warp reduces from shared memory. The own partial of a segment is folded into one more stage
//   of the warp (plain loads) when its (token, segment) starts. EP_CMB_TMA=0: 16-byte L2-only loads straight
//   from peers; the own partial goes to out[t] first and is read back as the own rank's row.
// Both find peer d's partial of token t at partial_peers[d] + send_pos[t][d] * row_bytes.
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
  // Items [item_lo, item_hi) of the received list, without the own tokens [own_lo, own_hi), which the pull
  // gather folds itself (push: that range is empty, the own tokens are reduced here too).
  const int own_lo = kCombinePush ? 0 : p.info[lay.recv_prefix + p.rank];
  const int own_hi = kCombinePush ? 0 : p.info[lay.recv_prefix + p.rank + 1];
  const int lo = p.item_lo, hi = min(p.item_hi, p.info[lay.n_recv_total]);
  const int n_before = max(0, min(hi, own_lo) - lo);                 // items below the own range
  const int skip_to = max(lo, own_hi);                               // first item above it
  const int n_items = n_before + max(0, hi - skip_to);
  u8* my_data = reinterpret_cast<u8*>(p.data_peers[p.rank]);
  for (int j = gw; j < n_items; j += RW) {
    const int i = j < n_before ? lo + j : skip_to + (j - n_before);
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

// Walks (token, segment, peer) items of one warp in the order the sums must happen. Peers in `skip` are
// left out (the TMA producer skips the own rank, whose partial is not loaded from a buffer).
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

__device__ __forceinline__ void cursor_start(const HtCombineParams& p, GatherCursor& c, int t, u32 skip) {
  c = GatherCursor{t, 0, 0, 0, 0, false};
  c.mask = c.rem = token_mask(p, t) & ~skip;
}

__device__ __forceinline__ bool cursor_next(const HtCombineParams& p, GatherCursor& c, int nseg, int stride, u32 skip) {
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
    cursor_start(p, c, c.t + stride, skip);
  }
  return false;
}

__device__ __forceinline__ const u8* partial_src(const HtCombineParams& p, int t, int d) {
  const int pos = p.send_pos[static_cast<i64>(t) * p.world + d];
  return reinterpret_cast<const u8*>(p.partial_peers[d]) + static_cast<u64>(pos) * p.row_bytes;
}

// Own token t's slots on this rank, as warp_weighted_sum takes them: lane k < K holds (row, weight) of slot k.
__device__ __forceinline__ void own_slots(const HtCombineParams& p, int t, int lane, int* my_row, float* my_w) {
  const InfoLayout lay(p.local_experts, p.world);
  const i64 i = p.info[lay.recv_prefix + p.rank] + p.send_pos[static_cast<i64>(t) * p.world + p.rank];
  *my_row = lane < p.topk ? p.recv_rows[i * p.topk + lane] : -1;
  *my_w = lane < p.topk ? p.recv_w[i * p.topk + lane] : 0.f;
}

// The own rank's partial of one segment: stage[v] = bf16( fold of w_j * y[row_j] ) over the n slots whose
// (row address, weight) lanes 0..n-1 hold, for the vectors v = u * 32 + lane of this lane (so only this lane
// reads them back). Every row's vectors are loaded at once: the loads of one row are in flight together.
__device__ __forceinline__ void own_partial_segment(uint4* stage, u64 my_src, float my_w, int n, int seg_off,
                                                    int nv, int lane) {
  float acc[kSegVecPerLane][8];
#pragma unroll
  for (int u = 0; u < kSegVecPerLane; ++u)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[u][e] = 0.f;
  for (int j = 0; j < n; ++j) {
    const uint4* row = reinterpret_cast<const uint4*>(__shfl_sync(0xFFFFFFFFu, my_src, j) + seg_off);
    const float w = __shfl_sync(0xFFFFFFFFu, my_w, j);
    uint4 v[kSegVecPerLane];
#pragma unroll
    for (int u = 0; u < kSegVecPerLane; ++u)
      if (u * kWarpSize + lane < nv) v[u] = ld_nc_v4(row + u * kWarpSize + lane);
#pragma unroll
    for (int u = 0; u < kSegVecPerLane; ++u)
      if (u * kWarpSize + lane < nv) add8(acc[u], v[u], w);
  }
#pragma unroll
  for (int u = 0; u < kSegVecPerLane; ++u)
    if (u * kWarpSize + lane < nv) stage[u * kWarpSize + lane] = pack8(acc[u]);
}

// stages: [kCombineStages] ring stages, then the warp's own-partial stage.
__device__ __forceinline__ void gather_tma(const HtCombineParams& p, u8* stages, u64* bars, int gw, int RW, int lane) {
  const int nseg = (p.row_bytes + kCombineSegBytes - 1) / kCombineSegBytes;
  const u32 own = 1u << p.rank;
  uint4* own_stage = reinterpret_cast<uint4*>(stages + kCombineStages * kCombineSegBytes);
  if (lane == 0) {
    for (int j = 0; j < kCombineStages; ++j) mbar_init(&bars[j], 1);
    fence_mbar_init();
  }
  __syncwarp();
  GatherCursor prod, cons;   // prod: lane 0 only, peers' items; cons: every item, the own rank's included
  cursor_start(p, prod, gw, own);
  cursor_start(p, cons, gw, 0);
  auto issue = [&](int stage) {
    const int bytes = min(kCombineSegBytes, p.row_bytes - prod.g * kCombineSegBytes);
    mbar_arrive_expect_tx(&bars[stage], bytes);
    tma_load(stages + stage * kCombineSegBytes, partial_src(p, prod.t, prod.d) + prod.g * kCombineSegBytes, bytes,
             &bars[stage]);
  };
  if (lane == 0)
    for (int j = 0; j < kCombineStages; ++j)
      if (cursor_next(p, prod, nseg, RW, own)) issue(j);
  u64 own_src = 0;   // own token's slots on this rank, compacted: lanes 0..n_own-1 hold (row address, weight)
  float own_w = 0.f;
  int n_own = 0;
  float acc[kSegVecPerLane][8];
  for (int j = 0; cursor_next(p, cons, nseg, RW, 0);) {
    const int nv = min(kCombineSegBytes, p.row_bytes - cons.g * kCombineSegBytes) / kVecBytes;
    if (cons.first) {   // a new (token, segment): acc is free, fold the own partial now if there is one
      if (cons.mask & own) {
        if (cons.g == 0) {   // once per token: its slots stay in the lanes for the other segments
          int my_row;
          float my_w;
          own_slots(p, cons.t, lane, &my_row, &my_w);
          n_own = compact_slots(p.expert_out, p.row_bytes, p.topk, my_row, my_w, lane, &own_src, &own_w);
        }
        own_partial_segment(own_stage, own_src, own_w, n_own, cons.g * kCombineSegBytes, nv, lane);
      }
#pragma unroll
      for (int u = 0; u < kSegVecPerLane; ++u)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[u][e] = 0.f;
    }
    const bool is_own = cons.d == p.rank;
    const int stage = j % kCombineStages;
    if (!is_own)
      while (!mbar_try_wait(&bars[stage], (j / kCombineStages) & 1)) {}
    const uint4* src = is_own ? own_stage : reinterpret_cast<const uint4*>(stages + stage * kCombineSegBytes);
#pragma unroll
    for (int u = 0; u < kSegVecPerLane; ++u) {
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
    if (!is_own) {   // the ring stage is consumed: refill it
      __syncwarp();
      if (lane == 0) {
        fence_proxy_async_shared();   // our generic reads of the stage happen before the next async write
        if (cursor_next(p, prod, nseg, RW, own)) issue(stage);
      }
      ++j;
    }
  }
}

// out[t] = the sum, in rank order, of the partials of the ranks t was sent to (none: zeros), for the tokens
// t = gw, gw + RW, ... of this warp, with 16-byte loads. kFoldOwn: the own rank's partial is folded from the
// expert rows into out[t] first and read back from there; otherwise it is read at partial_src like the others.
template <bool kFoldOwn>
__device__ __forceinline__ void gather_direct(const HtCombineParams& p, int gw, int RW, int lane) {
  for (int t = gw; t < p.num_tokens; t += RW) {
    int my_pos;
    const u32 mask = dest_mask(p, t, lane, &my_pos);
    uint4* dst = reinterpret_cast<uint4*>(p.out + static_cast<u64>(t) * p.row_bytes);
    if (kFoldOwn && (mask >> p.rank & 1)) {   // own partial into out[t]; each lane reads back only what it wrote
      int my_row;
      float my_w;
      own_slots(p, t, lane, &my_row, &my_w);
      warp_weighted_sum<kFoldRowsNarrow, kFoldVecsNarrow>(dst, p.expert_out, p.row_bytes, p.topk, my_row, my_w, lane);
    }
    const u64 src = lane >= p.world || my_pos < 0 ? 0
                    : kFoldOwn && lane == p.rank   ? reinterpret_cast<u64>(dst)
                                                   : reinterpret_cast<u64>(partial_src(p, t, lane));
    warp_sum_rows<kFoldRowsNarrow, kFoldVecsNarrow>(dst, compact_by_mask(mask, src, lane), __popc(mask), p.row_bytes,
                                                    lane);
  }
}

}  // namespace ep

// Launch bounds: the host may launch up to kCombineWarpsMax warps, so the registers must allow them.
extern "C" __global__ void __launch_bounds__(ep::kCombineWarpsMax * 32, 1) ht_combine_gather(const ep::HtCombineParams p) {
  using namespace ep;
  extern __shared__ __align__(128) u8 smem[];   // TMA: [warps][kCombineStages + 1][kCombineSegBytes]
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
    gather_tma(p, smem + static_cast<u64>(warp) * (kCombineStages + 1) * kCombineSegBytes, &bars[warp * kCombineStages],
               gw, RW, lane);
  } else {
    gather_direct<true>(p, gw, RW, lane);
  }
}

// EP_COMBINE_PUSH, after the barrier: the peers' partials of our tokens are in our landing buffer and our own
// in our data buffer (partial_peers), so the sum reads local memory only: 16-byte loads, 32 warps of the
// narrow fold (a TMA ring measured ~20% slower here, docs/perf.md row 29).
extern "C" __global__ void __launch_bounds__(1024, 1) ht_combine_sum(const ep::HtCombineParams p) {
  const int nwarps = blockDim.x / ep::kWarpSize;
  ep::gather_direct<false>(p, blockIdx.x * nwarps + threadIdx.x / ep::kWarpSize, gridDim.x * nwarps,
                           threadIdx.x % ep::kWarpSize);
}
