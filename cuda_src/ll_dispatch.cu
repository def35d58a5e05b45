// LL dispatch: one kernel, no host synchronization, fixed-capacity EXPERT_MAJOR output.
//
// Buffers (symmetric, per rank, double-buffered by parity = seq & 1 of the device dispatch sequence):
//   recv[par][s][t]  row_bytes     token t of source s (written only if t goes to this rank)
//   meta[par][s][t]  meta_stride   {t, lexp[K] (local expert | kDupBit, or -1), -, w[K]}, written for EVERY
//                                   t < T_s, so stale entries of an earlier call are never read as valid
//   sig.ntok[par][s] i32           T of source s;  sig.disp_cnt[s] u64  arrivals from source s
// Send: warps take (token, destination) items; each token crosses once per destination rank. Each
// block then adds 1 (red.release.sys) to disp_cnt[rank] on every rank. Receive: each block waits until
// every source's counter reaches seq * G, then expands local experts e = b, b+G, ...: rows are assigned
// by scanning (source, token) in order, so the row order is fixed: row = e*cap + rank among (s, t).
// The slot rows go to rows_local[par] for combine. Reuse of a parity is safe: a rank starts dispatch
// seq+2 only after dispatch seq+1 finished, which needed every peer's seq+1 sends, issued after that
// peer finished dispatch seq.
#include "common/ll_common.cuh"

namespace ep {

__device__ __forceinline__ int ll_load_id(const void* ids, int ids_64, i64 i) {
  if (ids_64) {
    const long long v = static_cast<const long long*>(ids)[i];
    return v < -2 ? -2 : (v > 0x7FFFFFFF ? 0x7FFFFFFF : static_cast<int>(v));
  }
  return static_cast<const int*>(ids)[i];
}

}  // namespace ep

extern "C" __global__ void __launch_bounds__(ep::kLLWarps * 32, 1) ll_dispatch(const ep::LLParams p) {
  using namespace ep;
  __shared__ int s_abort;
  __shared__ int s_start[kMaxWorld + 1];
  __shared__ int s_warp_cnt[kLLWarps];
  __shared__ int s_warp_base[kLLWarps];
  const int W = p.world, K = p.topk, L = p.local_experts;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int gw = blockIdx.x * kLLWarps + warp, RW = gridDim.x * kLLWarps;
  const u32 seq = ll_read_seq(p, 0);
  const int par = seq & 1u;

  // ---- send -------------------------------------------------------------------------------------
  for (int item = gw; item < p.num_tokens * W; item += RW) {
    const int t = item / W, d = item % W;
    int id = lane < K ? ll_load_id(p.topk_ids, p.ids_64, static_cast<i64>(t) * K + lane) : -1;
    if (id < -1 || id >= p.num_experts) {
      if (d == 0) record_error(p.input_err, kPhaseBadExpertId, p.rank, t * K + lane, static_cast<u64>(static_cast<i64>(id)), p.num_experts);
      id = -1;
    }
    bool dup = false;
    for (int j = 0; j < K; ++j) {
      const int other = __shfl_sync(0xFFFFFFFFu, id, j);
      dup |= (j < lane) && other == id;
    }
    const int owner = id >= 0 ? id / L : -1;
    const u32 mask = __reduce_or_sync(0xFFFFFFFFu, (id >= 0 && !dup) ? (1u << owner) : 0u);
    const u64 slot = ll_slot(p, par, p.rank, t);
    MetaView meta{reinterpret_cast<u8*>(p.meta_peers[d] + slot * p.meta_stride), K};
    if (lane == 0) *meta.token() = t;
    if (lane < K) {
      meta.lexp()[lane] = owner == d ? ((id % L) | (dup ? kDupBit : 0)) : -1;
      meta.w()[lane] = p.weights ? p.weights[static_cast<i64>(t) * K + lane] : 1.f;
    }
    if ((mask >> d) & 1u)
      warp_copy(reinterpret_cast<u8*>(p.recv_peers[d] + slot * p.row_bytes), p.x + static_cast<i64>(t) * p.row_bytes,
                p.row_bytes, lane);
    if (d == 0 && lane == 0) p.send_mask[par * p.max_tokens + t] = mask;
  }
  if (blockIdx.x == 0 && threadIdx.x < W) *ll_ntok(p, threadIdx.x, par, p.rank) = p.num_tokens;
  if (!ll_exchange_arrivals(p, p.disp_cnt_offset, seq, kPhaseLLDispatchRecv, &s_abort)) {
    ll_finish_block(p, 0, seq);
    return;
  }

  // ---- receive: expand local experts --------------------------------------------------------------
  if (threadIdx.x == 0) {
    int run = 0;
    for (int s = 0; s < W; ++s) {
      s_start[s] = run;
      run += ld_cg_i32(ll_ntok(p, p.rank, par, s));
    }
    s_start[W] = run;
  }
  __syncthreads();
  const int total = s_start[W];
  const u8* my_meta = reinterpret_cast<const u8*>(p.meta_peers[p.rank]);
  const u8* my_recv = reinterpret_cast<const u8*>(p.recv_peers[p.rank]);
  for (int e = blockIdx.x; e < L; e += gridDim.x) {
    // A (source, token) hits e when its first slot naming e is local (the kDupBit copies are skipped).
    auto hit_of = [&](int j, int* s_out, int* t_out) -> bool {
      if (j >= total) return false;
      int s = 0;
      while (j >= s_start[s + 1]) ++s;
      const int t = j - s_start[s];
      *s_out = s;
      *t_out = t;
      const MetaView m{const_cast<u8*>(my_meta + ll_slot(p, par, s, t) * p.meta_stride), K};
      for (int k = 0; k < K; ++k)
        if (ld_cg_i32(m.lexp() + k) == e) return true;
      return false;
    };
    // Warp w scans the contiguous slot range [w*span, (w+1)*span), so warp order is slot order and the
    // per-warp prefix below gives rows in (source, token) order.
    const int span = (total + kLLWarps * kWarpSize - 1) / (kLLWarps * kWarpSize) * kWarpSize;
    const int seg_end = min(total, (warp + 1) * span);
    int cnt = 0;
    for (int seg = warp * span; seg < seg_end; seg += kWarpSize) {
      int s, t;
      cnt += __popc(__ballot_sync(0xFFFFFFFFu, seg + lane < seg_end && hit_of(seg + lane, &s, &t)));
    }
    if (lane == 0) s_warp_cnt[warp] = cnt;
    __syncthreads();
    if (threadIdx.x == 0) {
      int run = 0;
      for (int w = 0; w < kLLWarps; ++w) {
        s_warp_base[w] = run;
        run += s_warp_cnt[w];
      }
      p.counts_out[e] = run;
    }
    __syncthreads();
    int base = s_warp_base[warp];
    for (int seg = warp * span; seg < seg_end; seg += kWarpSize) {
      int s = 0, t = 0;
      const bool hit = seg + lane < seg_end && hit_of(seg + lane, &s, &t);
      const u32 ballot = __ballot_sync(0xFFFFFFFFu, hit);
      const int row = e * p.capacity + base + __popc(ballot & ((1u << lane) - 1u));
      if (hit) {
        const MetaView m{const_cast<u8*>(my_meta + ll_slot(p, par, s, t) * p.meta_stride), K};
        i32* rows = p.rows_local + ll_slot(p, par, s, t) * K;
        for (int k = 0; k < K; ++k)
          if ((ld_cg_i32(m.lexp() + k) & ~kDupBit) == e) rows[k] = row;
      }
      for (u32 b = ballot; b; b &= b - 1) {
        const int src_lane = __ffs(b) - 1;
        const int r = __shfl_sync(0xFFFFFFFFu, row, src_lane);
        const int ss = __shfl_sync(0xFFFFFFFFu, s, src_lane);
        const int tt = __shfl_sync(0xFFFFFFFFu, t, src_lane);
        warp_copy(p.out + static_cast<u64>(r) * p.row_bytes, my_recv + ll_slot(p, par, ss, tt) * p.row_bytes, p.row_bytes,
                  lane);
      }
      base += __popc(ballot);
    }
    __syncthreads();
  }
  ll_finish_block(p, 0, seq);
}
