// LL combine: expert-side reduction pushed to the sources, then source-side sum. No host sync.
//
// Buffers: comb[par][d][t] row_bytes on the SOURCE rank: the bf16 partial of its token t from expert
// rank d; sig.comb_cnt[d] u64 arrivals from rank d. par = combine seq & 1 (device counter, graph safe).
// The dispatch it pairs with is dispatch seq - age (age 0 or 1, from the host), parity dpar.
// 1. Every (source s, token t) received in that dispatch: acc = 0; for k = 0..K-1 with lexp[k] >= 0:
//    acc = fl32(acc + fl32(w[k] * y[rows_local[k]])); bf16(acc) is written to comb[par][rank][t] on s.
// 2. Each block adds 1 to comb_cnt[rank] on every rank, waits for seq * G from every rank, then token t
//    sums the partials of the ranks in send_mask[dpar][t] in ascending order -> bf16 out[t].
// Rounding matches ep/reference.py exactly. Parity reuse is safe for the reason given in ll_dispatch.cu.
#include "common/ll_common.cuh"
#include "common/reduce.cuh"

extern "C" __global__ void __launch_bounds__(ep::kLLWarps * 32, 1) ll_combine(const ep::LLParams p) {
  using namespace ep;
  __shared__ int s_abort;
  __shared__ int s_start[kMaxWorld + 1];
  const int W = p.world, K = p.topk;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int gw = blockIdx.x * kLLWarps + warp, RW = gridDim.x * kLLWarps;
  const u32 seq = ll_read_seq(p, 1);
  const int par = seq & 1u;
  const int dpar = (*reinterpret_cast<volatile u32*>(p.state) - static_cast<u32>(p.age)) & 1u;

  if (threadIdx.x == 0) {
    int run = 0;
    for (int s = 0; s < W; ++s) {
      s_start[s] = run;
      run += ld_cg_i32(ll_ntok(p, p.rank, dpar, s));
    }
    s_start[W] = run;
  }
  __syncthreads();
  // ---- 1. reduce the slots of every received token, push the partial to its source ---------------
  const u8* my_meta = reinterpret_cast<const u8*>(p.meta_peers[p.rank]);
  for (int j = gw; j < s_start[W]; j += RW) {
    int s = 0;
    while (j >= s_start[s + 1]) ++s;
    const int t = j - s_start[s];
    const u64 slot = ll_slot(p, dpar, s, t);
    const MetaView m{const_cast<u8*>(my_meta + slot * p.meta_stride), K};
    int row = -1;
    float w = 0.f;
    if (lane < K && ld_cg_i32(m.lexp() + lane) >= 0) {
      row = p.rows_local[slot * K + lane];
      w = ld_cg_f32(m.w() + lane);
    }
    if (!__any_sync(0xFFFFFFFFu, row >= 0)) continue;
    uint4* dst = reinterpret_cast<uint4*>(p.comb_peers[s] + ll_slot(p, par, p.rank, t) * p.row_bytes);
    warp_weighted_sum(dst, p.expert_out, p.row_bytes, K, row, w, lane);
  }
  if (!ll_exchange_arrivals(p, p.comb_cnt_offset, seq, kPhaseLLCombineRecv, &s_abort)) {
    ll_finish_block(p, 1, seq);
    return;
  }
  // ---- 2. sum the partials of each own token in ascending rank order ------------------------------
  const u8* my_comb = reinterpret_cast<const u8*>(p.comb_peers[p.rank]);
  for (int t = gw; t < p.num_tokens; t += RW) {
    const u32 mask = p.send_mask[dpar * p.max_tokens + t];
    const u64 src = lane < W && ((mask >> lane) & 1u) ? reinterpret_cast<u64>(my_comb + ll_slot(p, par, lane, t) * p.row_bytes) : 0;
    warp_sum_rows(reinterpret_cast<uint4*>(p.out + static_cast<u64>(t) * p.row_bytes), compact_by_mask(mask, src, lane),
                  __popc(mask), p.row_bytes, lane);
  }
  ll_finish_block(p, 1, seq);
}
