// HT combine: expert-side reduction, then the source-side sum of the partials. No macros: the push and the
// pull combine are the same three kernels launched in a different order (ep/ht.py).
//
// ht_combine_reduce (expert rank, local): for every token i it received at slot pos from source s, among the
//   items [item_lo, item_hi) of this launch (without our own tokens when skip_own),
//   acc = 0; for k = 0..K-1 with recv_rows[i][k] >= 0: acc = fl32(acc + fl32(w * y[row]))  (no FMA)
//   and stores bf16(acc) into its OWN data buffer at data[s][pos] (the dispatch slot, free again: the
//   dispatch kernel finished expanding it). One partial per (token, rank) is all that crosses NVLink.
// Push (HtTuning.combine = "push"): the host launches the reduce once per peer s and has the copy engines
//   copy data[s][0, n_s) into s's landing buffer at land[rank] while the next peer's tokens are reduced; the
//   own tokens' partials (reduced last) stay in data[rank]. After the host's ep_barrier every partial of our
//   tokens is local, and ht_combine_sum adds them, in ascending rank order, in fp32 (16-byte loads).
// Pull ("pull"): the reduce skips the rank's own tokens; after ep_barrier, ht_combine_gather (source rank):
//   token t sums, in ascending rank order, the partials peers hold at data_peers[d][rank][send_pos[t][d]],
//   in fp32, and writes bf16 out[t]; a token sent nowhere is zero. Its own rank's partial is folded from the
//   local expert rows into out[t] first, with the same rounding, and read back as the own rank's row (each
//   lane reads back only what it wrote): 1/W of the reduction runs while the NVLink loads are in flight.
// Both find peer d's partial of token t at partial_peers[d] + send_pos[t][d] * row_bytes.
// TOKEN_MAJOR: the caller's rows are the partials already (weighted and summed over its local experts): no
// reduce; the host copies each peer's block of rows (and of weights, when given) to its landing buffer, our
// own are read from the caller's array (own_partial), and ht_combine_sum adds them.
// Rounding matches ep/reference.py exactly (fl32 adds in a fixed order, round-to-nearest-even to bf16).
// The narrow fold needs <= 64 registers, so the reduce and the sum run kCombineReduceWarps warps per block;
// the gather, which also folds our own partial, gets 128 registers at kGatherMaxWarps warps at most.
#include "common/params.cuh"
#include "common/reduce.cuh"

namespace ep {

// The source of received item i: recv_prefix[s] <= i < recv_prefix[s + 1].
__device__ __forceinline__ int source_of_item(const HtCombineParams& p, const InfoLayout& lay, int i) {
  int s = 0;
  while (s + 1 < p.world && p.info[lay.recv_prefix + s + 1] <= i) ++s;
  return s;
}

__device__ __forceinline__ u32 dest_mask(const HtCombineParams& p, int t, int lane, int* my_pos) {
  *my_pos = lane < p.world ? p.send_pos[static_cast<i64>(t) * p.world + lane] : -1;
  return __ballot_sync(0xFFFFFFFFu, *my_pos >= 0);
}

}  // namespace ep

extern "C" __global__ void __launch_bounds__(ep::kCombineReduceWarps * 32, 1) ht_combine_reduce(const ep::HtCombineParams p) {
  using namespace ep;
  const int W = p.world, K = p.topk;
  const InfoLayout lay(p.local_experts, W);
  const int nwarps = blockDim.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int gw = blockIdx.x * nwarps + threadIdx.x / kWarpSize;
  const int RW = gridDim.x * nwarps;
  // Items [item_lo, item_hi) of the received list, without the own tokens [own_lo, own_hi) when the pull
  // gather folds them itself (push: that range is empty, the own tokens are reduced here too).
  const int own_lo = p.skip_own ? p.info[lay.recv_prefix + p.rank] : 0;
  const int own_hi = p.skip_own ? p.info[lay.recv_prefix + p.rank + 1] : 0;
  const int lo = p.item_lo, hi = min(p.item_hi, p.info[lay.n_recv_total]);
  const int n_before = max(0, min(hi, own_lo) - lo);                 // items below the own range
  const int skip_to = max(lo, own_hi);                               // first item above it
  const int n_items = n_before + max(0, hi - skip_to);
  u8* my_data = reinterpret_cast<u8*>(p.data_peers[p.rank]);
  for (int j = gw; j < n_items; j += RW) {
    const int i = j < n_before ? lo + j : skip_to + (j - n_before);
    const int s = source_of_item(p, lay, i);
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

// Row 0 of our own block among the caller's TOKEN_MAJOR rows: with own_at_prefix the host passed row 0 of the
// whole array and the block starts at recv_prefix[rank] (a worst-case dispatch: the host never learnt it).
__device__ __forceinline__ i64 own_first_row(const HtCombineParams& p) {
  return p.own_at_prefix ? p.info[InfoLayout(p.local_experts, p.world).recv_prefix + p.rank] : 0;
}

__device__ __forceinline__ const u8* partial_src(const HtCombineParams& p, int t, int d) {
  i64 pos = p.send_pos[static_cast<i64>(t) * p.world + d];
  const u8* base = reinterpret_cast<const u8*>(p.partial_peers[d]);
  if (d == p.rank && p.own_partial) {
    base = p.own_partial;
    pos += own_first_row(p);
  }
  return base + static_cast<u64>(pos) * p.row_bytes;
}

// TOKEN_MAJOR with weights: lane k < K of token t sums, in ascending rank order, slot k's weight of every
// rank's row of t (fp32); our own rows' weights are the caller's, the peers' were copied next to our landing
// buffer.
__device__ __forceinline__ void sum_weights(const HtCombineParams& p, int t, u32 mask, int lane) {
  if (lane >= p.topk) return;
  float acc = 0.f;
  for (u32 m = mask; m; m &= m - 1) {
    const int d = __ffs(m) - 1;
    const i64 pos = p.send_pos[static_cast<i64>(t) * p.world + d] + (d == p.rank ? own_first_row(p) : 0);
    const float* w = d == p.rank ? p.own_w : reinterpret_cast<const float*>(p.w_peers[d]);
    acc = __fadd_rn(acc, ld_cg_f32(w + pos * p.topk + lane));
  }
  p.out_w[static_cast<i64>(t) * p.topk + lane] = acc;
}

// Own token t's slots on this rank, as warp_weighted_sum takes them: lane k < K holds (row, weight) of slot k.
__device__ __forceinline__ void own_slots(const HtCombineParams& p, int t, int lane, int* my_row, float* my_w) {
  const InfoLayout lay(p.local_experts, p.world);
  const i64 i = p.info[lay.recv_prefix + p.rank] + p.send_pos[static_cast<i64>(t) * p.world + p.rank];
  *my_row = lane < p.topk ? p.recv_rows[i * p.topk + lane] : -1;
  *my_w = lane < p.topk ? p.recv_w[i * p.topk + lane] : 0.f;
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
    if (!kFoldOwn && p.out_w) sum_weights(p, t, mask, lane);
  }
}

}  // namespace ep

extern "C" __global__ void __launch_bounds__(ep::kGatherMaxWarps * 32, 1) ht_combine_gather(const ep::HtCombineParams p) {
  const int nwarps = blockDim.x / ep::kWarpSize;
  ep::gather_direct<true>(p, blockIdx.x * nwarps + threadIdx.x / ep::kWarpSize, gridDim.x * nwarps,
                          threadIdx.x % ep::kWarpSize);
}

// Push, after the barrier: the peers' partials of our tokens are in our landing buffer and our own in our data
// buffer (partial_peers), so the sum reads local memory only.
extern "C" __global__ void __launch_bounds__(ep::kCombineReduceWarps * 32, 1) ht_combine_sum(const ep::HtCombineParams p) {
  const int nwarps = blockDim.x / ep::kWarpSize;
  ep::gather_direct<false>(p, blockIdx.x * nwarps + threadIdx.x / ep::kWarpSize, gridDim.x * nwarps,
                           threadIdx.x % ep::kWarpSize);
}

// TOKEN_MAJOR combine of a worst-case dispatch (the host does not know where each source's block of rows
// starts): received item i of source s (recv_prefix[s] <= i < recv_prefix[s + 1]), a row of the caller's y and,
// with weights, a row of own_w, goes to s's landing buffers at region `rank`, row i - recv_prefix[s]; our own
// block stays where it is (the sum reads it with own_at_prefix). One warp per row, 16-byte stores over NVLink.
extern "C" __global__ void __launch_bounds__(ep::kCombineReduceWarps * 32, 1) ht_token_major_push(const ep::HtCombineParams p) {
  using namespace ep;
  const int W = p.world, K = p.topk;
  const InfoLayout lay(p.local_experts, W);
  const int nwarps = blockDim.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int n = p.info[lay.n_recv_total];
  for (int i = blockIdx.x * nwarps + threadIdx.x / kWarpSize; i < n; i += gridDim.x * nwarps) {
    const int s = source_of_item(p, lay, i);
    if (s == p.rank) continue;
    const u64 pos = static_cast<u64>(p.rank) * p.max_tokens + (i - p.info[lay.recv_prefix + s]);
    const uint4* src = reinterpret_cast<const uint4*>(p.expert_out + static_cast<u64>(i) * p.row_bytes);
    uint4* dst = reinterpret_cast<uint4*>(p.land_peers[s] + pos * p.row_bytes);
    for (int v = lane; v < p.row_bytes / 16; v += kWarpSize) dst[v] = ld_nc_v4(src + v);
    if (p.wland_peers && lane < K)
      reinterpret_cast<float*>(p.wland_peers[s])[pos * K + lane] = p.own_w[static_cast<i64>(i) * K + lane];
  }
}
