// LL combine: expert-side partials pushed to the sources, then the source-side sum. No host sync.
//
// Buffers: comb[par][d][t][H] bf16 on the SOURCE rank: the partial of its token t from expert rank d;
// sig arrivals u64 [d]. par = combine seq & 1 (device counter, graph safe). The dispatch it pairs with is
// the last received dispatch's seq - age (age 0 or 1, from the host), parity dpar; its MetaRecs and per-source T live in this
// rank's meta[dpar] and ntok[dpar] (the dispatch's send half stored T, ll_bases), its masks in send_mask[dpar].
// 1 send: every (remote source s, token t, chunk c) with a MetaRec of that dispatch here:
//   acc = 0; for k = 0..K-1 with rows[k] >= 0: acc = fl32(acc + fl32(w[k] * y[rows[k]])) (no FMA), and
//   bf16(acc) goes to comb[par][rank][t] on s. With readiness counters (overlap), a row is read only once
//   its expert's counter reaches ready_target (acquire). Then the last block to finish release-adds 1 to the
//   arrivals of this rank in every rank.
// 2 receive: wait for every rank's arrival of this seq; token t sums, in ascending rank order,
//   the partials of the ranks in send_mask[dpar][t] in fp32 and rounds once; this rank's own partial is
//   folded here from the local rows (rounded to bf16 first, as if it had travelled). A token sent nowhere is 0.
//   With readiness counters, the last receive block then waits for every expert's counter (experts without
//   rows too: their signal may still be on its way) and takes ready_target off it, so the same counters and
//   target serve the next combine, eager or replayed.
// 0 combine-time weights (p.weights set: DeepEP-style callers give the weights to combine, not dispatch): every
//   block first writes its tokens' weights w[t, 0..K) into the MetaRec each token sent to each destination
//   (the rows fields untouched); the last block stores the combine seq into this rank's weights slot at
//   every destination (release), and the send half's items start once every source's slot holds the seq.
//   Every rank passes weights to the same combines (the op gate names it), so nobody waits for a push
//   that never comes. A MetaRec is read by its destination's send half only, which, for every earlier
//   combine of the same dispatch, ended before this rank's receive half of it could: no write races a read.
// Rounding matches ep/reference.py exactly. Parity reuse is safe for the reason given in ll_dispatch.cu.
#include "common/ll_common.cuh"
#include "common/reduce.cuh"

namespace ep {

constexpr int kVecsPerLane = kChunkChannels * 2 / kVecBytes / kWarpSize;   // 4: a 2 KB chunk per warp

__device__ __forceinline__ void wait_ready(const LLParams& p, int expert, int lane) {
  if (lane != 0) return;
  const u64 start = global_timer_ns();
  const u32* flag = p.ready + expert;
  for (u32 iter = 0; ld_acquire_gpu_u32(flag) < p.ready_target; ++iter) {
    if ((iter & 255u) == 255u && (error_raised(p.err) || global_timer_ns() - start > p.timeout_ns)) {
      record_error(p.err, kPhaseLLCombineRecv, p.rank, -1 - expert, ld_acquire_gpu_u32(flag), p.ready_target);
      return;
    }
  }
}

// Thread 0 of the last receive block: every counter reached the target; take it off for the next combine.
__device__ __forceinline__ void release_ready(const LLParams& p) {
  for (int e = 0; e < p.local_experts; ++e) {
    wait_ready(p, e, 0);
    atomicSub(p.ready + e, p.ready_target);
  }
  __threadfence();
}

// acc[u][.] += w_j * y[row_j] chunk c, for the rows lanes 0..n-1 hold (ascending slot order).
__device__ __forceinline__ void fold_chunk(const LLParams& p, float (&acc)[kVecsPerLane][8], int my_row, float my_w,
                                           int n, int c, int nvec, int lane) {
  for (int j = 0; j < n; ++j) {
    const int row = __shfl_sync(0xFFFFFFFFu, my_row, j);
    const float w = __shfl_sync(0xFFFFFFFFu, my_w, j);
    if (p.ready) wait_ready(p, row / p.capacity, lane);
    __syncwarp();
    const uint4* src = reinterpret_cast<const uint4*>(p.expert_out + static_cast<u64>(row) * 2 * p.hidden +
                                                      static_cast<u64>(c) * 2 * kChunkChannels);
    uint4 v[kVecsPerLane];
#pragma unroll
    for (int u = 0; u < kVecsPerLane; ++u)
      if (u * kWarpSize + lane < nvec) v[u] = ld_cg_v4(src + u * kWarpSize + lane);
#pragma unroll
    for (int u = 0; u < kVecsPerLane; ++u)
      if (u * kWarpSize + lane < nvec) add8(acc[u], v[u], w);
  }
}

// The rows and weights of a MetaRec's slots owned here, compacted in slot order: returns n.
__device__ __forceinline__ int rec_slots(const LLParams& p, u8* rec, int lane, int* my_row, float* my_w) {
  int row = -1;
  float w = 0.f;
  if (lane < p.topk) {
    row = ld_cg_i32(meta_rows(rec) + lane);
    w = ld_cg_f32(meta_w(rec, p.topk) + lane);
  }
  const u32 mask = __ballot_sync(0xFFFFFFFFu, row >= 0);
  *my_row = static_cast<int>(compact_by_mask(mask, static_cast<u64>(static_cast<u32>(row)), lane));
  *my_w = __shfl_sync(0xFFFFFFFFu, w, lane < __popc(mask) ? static_cast<int>(__fns(mask, 0, lane + 1)) : 0);
  return __popc(mask);
}

__device__ __forceinline__ void zero_acc(float (&acc)[kVecsPerLane][8]) {
#pragma unroll
  for (int u = 0; u < kVecsPerLane; ++u)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[u][e] = 0.f;
}

constexpr int kWeightsDone = 10;   // state word: blocks done with the weight push

// Phase 0: this rank's combine-time weights into the MetaRecs at its tokens' destinations. False when a
// source's weights never arrived (the error record says so).
__device__ bool ll_push_weights(const LLParams& p, u32 seq, int dpar) {
  __shared__ int s_ok;
  const int K = p.topk, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, nwarps = blockDim.x / kWarpSize;
  for (int t = blockIdx.x * nwarps + warp; t < p.num_tokens; t += gridDim.x * nwarps) {
    const u32 mask = p.send_mask[dpar * p.max_tokens + t];
    const float w = lane < K ? p.weights[static_cast<i64>(t) * K + lane] : 0.f;
    for (u32 m = mask; m; m &= m - 1)
      if (lane < K) meta_w(ll_meta(p, __ffs(m) - 1, dpar, p.rank, t), K)[lane] = w;
  }
  if (ll_last_block(p.state + kWeightsDone, nullptr, seq) && threadIdx.x < p.world)
    st_release_sys(ll_arrivals(p, threadIdx.x, p.wgt_cnt_offset, p.rank), static_cast<u64>(seq));
  return ll_wait_arrivals(p, p.wgt_cnt_offset, seq, kPhaseLLCombineWeights, &s_ok);
}

__device__ void ll_combine_send_body(const LLParams& p, u32 seq, u32 dseq) {
  __shared__ int s_start[kMaxWorld + 1];
  const int W = p.world, C = (p.hidden + kChunkChannels - 1) / kChunkChannels;
  const int par = seq & 1u, dpar = dseq & 1u;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, nwarps = blockDim.x / kWarpSize;
  const bool weights_in = p.weights == nullptr || ll_push_weights(p, seq, dpar);
  if (threadIdx.x == 0) {   // items of remote source s: [s_start[s], s_start[s + 1])
    int run = 0;
    for (int s = 0; s < W; ++s) {
      s_start[s] = run;
      if (s != p.rank) run += p.ntok[dpar * W + s] * C;
    }
    s_start[W] = run;
  }
  __syncthreads();
  for (int item = blockIdx.x * nwarps + warp; weights_in && item < s_start[W]; item += gridDim.x * nwarps) {
    int s = 0;
    while (item >= s_start[s + 1]) ++s;
    const int t = (item - s_start[s]) / C, c = (item - s_start[s]) % C;
    u8* rec = ll_meta(p, p.rank, dpar, s, t);
    const u32 tag = lane == 0 ? ld_cg_u32(&reinterpret_cast<MetaRec*>(rec)->seq) : 0u;
    if (__shfl_sync(0xFFFFFFFFu, tag, 0) != dseq) continue;   // token t of s was not sent here
    int my_row;
    float my_w;
    const int n = rec_slots(p, rec, lane, &my_row, &my_w);
    const int nvec = min(kChunkChannels, p.hidden - c * kChunkChannels) / 8;
    float acc[kVecsPerLane][8];
    zero_acc(acc);
    fold_chunk(p, acc, my_row, my_w, n, c, nvec, lane);
    uint4* dst = reinterpret_cast<uint4*>(reinterpret_cast<u8*>(p.comb_peers[s]) +
                                          (static_cast<u64>(par * W + p.rank) * p.max_tokens + t) * 2 * p.hidden +
                                          static_cast<u64>(c) * 2 * kChunkChannels);
#pragma unroll
    for (int u = 0; u < kVecsPerLane; ++u)
      if (u * kWarpSize + lane < nvec) st_v4(dst + u * kWarpSize + lane, pack8(acc[u]));
  }
  ll_finish_send(p, kCombineSend, seq, p.comb_cnt_offset);
}

__device__ void ll_combine_recv_body(const LLParams& p, u32 seq, u32 dseq) {
  __shared__ int s_ok;
  const int W = p.world, C = (p.hidden + kChunkChannels - 1) / kChunkChannels;
  const int par = seq & 1u, dpar = dseq & 1u;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, nwarps = blockDim.x / kWarpSize;
  if (ll_wait_arrivals(p, p.comb_cnt_offset, seq, kPhaseLLCombineRecv, &s_ok)) {
    const u8* comb = reinterpret_cast<const u8*>(p.comb_peers[p.rank]);
    for (int item = blockIdx.x * nwarps + warp; item < p.num_tokens * C; item += gridDim.x * nwarps) {
      const int t = item / C, c = item % C;
      const int nvec = min(kChunkChannels, p.hidden - c * kChunkChannels) / 8;
      const u32 mask = p.send_mask[dpar * p.max_tokens + t];
      float sum[kVecsPerLane][8];
      zero_acc(sum);
      for (u32 m = mask; m; m &= m - 1) {
        const int d = __ffs(m) - 1;
        uint4 v[kVecsPerLane];
        if (d == p.rank) {   // our own partial, folded from the local rows and rounded as if it had travelled
          int my_row;
          float my_w;
          const int n = rec_slots(p, ll_meta(p, p.rank, dpar, p.rank, t), lane, &my_row, &my_w);
          float acc[kVecsPerLane][8];
          zero_acc(acc);
          fold_chunk(p, acc, my_row, my_w, n, c, nvec, lane);
#pragma unroll
          for (int u = 0; u < kVecsPerLane; ++u) v[u] = pack8(acc[u]);
        } else {
          const uint4* src = reinterpret_cast<const uint4*>(
              comb + (static_cast<u64>(par * W + d) * p.max_tokens + t) * 2 * p.hidden + static_cast<u64>(c) * 2 * kChunkChannels);
#pragma unroll
          for (int u = 0; u < kVecsPerLane; ++u)
            if (u * kWarpSize + lane < nvec) v[u] = ld_cg_v4(src + u * kWarpSize + lane);
        }
#pragma unroll
        for (int u = 0; u < kVecsPerLane; ++u)
          if (u * kWarpSize + lane < nvec) add8(sum[u], v[u]);
      }
      uint4* dst = reinterpret_cast<uint4*>(p.out + static_cast<u64>(t) * 2 * p.hidden + static_cast<u64>(c) * 2 * kChunkChannels);
#pragma unroll
      for (int u = 0; u < kVecsPerLane; ++u)
        if (u * kWarpSize + lane < nvec) st_v4(dst + u * kWarpSize + lane, pack8(sum[u]));
    }
  }
  if (ll_finish_block(p, kCombineRecv, seq) && p.ready) release_ready(p);
}

// The dispatch a combine pairs with: `age` receives before the last one that finished when its send half
// starts. The send half records it (state[kCombineDseq + parity]) for its receive half: a dispatch may be
// received in between (two micro-batches interleaved with hooks).
constexpr int kCombineDseq = 8;
__device__ __forceinline__ u32 ll_combine_dseq(const LLParams& p) {
  return *reinterpret_cast<volatile u32*>(p.state + kDispatchRecv) - static_cast<u32>(p.age);
}
__device__ __forceinline__ void ll_record_dseq(const LLParams& p, u32 seq, u32 dseq) {
  if (blockIdx.x == 0 && threadIdx.x == 0) p.state[kCombineDseq + (seq & 1u)] = dseq;
}
__device__ __forceinline__ u32 ll_recorded_dseq(const LLParams& p, u32 seq) {
  return *reinterpret_cast<volatile u32*>(p.state + kCombineDseq + (seq & 1u));
}

}  // namespace ep

extern "C" __global__ void __launch_bounds__(ep::kLLWarps * 32, 1) ll_combine(const ep::LLParams p) {
  const u32 seq = ep::ll_read_seq(p, ep::kCombineSend), dseq = ep::ll_combine_dseq(p);
  ep::ll_combine_send_body(p, seq, dseq);
  ep::ll_combine_recv_body(p, seq, dseq);
}

extern "C" __global__ void __launch_bounds__(ep::kLLWarps * 32, 1) ll_combine_send(const ep::LLParams p) {
  const u32 seq = ep::ll_read_seq(p, ep::kCombineSend), dseq = ep::ll_combine_dseq(p);
  ep::ll_record_dseq(p, seq, dseq);
  ep::ll_combine_send_body(p, seq, dseq);
}

extern "C" __global__ void __launch_bounds__(ep::kLLWarps * 32, 1) ll_combine_recv(const ep::LLParams p) {
  const u32 seq = ep::ll_read_seq(p, ep::kCombineRecv);
  ep::ll_combine_recv_body(p, seq, ep::ll_recorded_dseq(p, seq));
}

// Where the rows of the dispatch a combine would pair with (`age`) came from, for callers that read DeepEP's
// LL handle: src_info[l][r] = the source token of row r of local expert l (-1 past its rows), src_counts[l][s]
// = its rows from source s (they are [sum of the lower sources' counts, + count), the sources in rank order).
// Read from this rank's MetaRecs of that dispatch (every source writes one per token it sends here, rows per
// slot; a repeated expert names one row). One block: a query, not a hot path.
extern "C" __global__ void __launch_bounds__(1024) ll_row_sources(const ep::LLParams p) {
  using namespace ep;
  extern __shared__ int s_cnt[];   // [L][W]
  const int W = p.world, K = p.topk, L = p.local_experts, cap = p.capacity;
  const u32 dseq = ll_combine_dseq(p);
  const int dpar = dseq & 1u;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, nwarps = blockDim.x / kWarpSize;
  for (int i = threadIdx.x; i < L * W; i += blockDim.x) s_cnt[i] = 0;
  for (i64 i = threadIdx.x; i < static_cast<i64>(L) * cap; i += blockDim.x) p.src_info[i] = -1;
  __syncthreads();
  for (int item = warp; item < W * p.max_tokens; item += nwarps) {
    const int s = item / p.max_tokens, t = item % p.max_tokens;
    if (t >= p.ntok[dpar * W + s]) continue;
    int row;
    bool first;
    if (!rec_rows(ll_meta(p, p.rank, dpar, s, t), dseq, K, lane, &row, &first)) continue;   // not sent here
    if (first && row < L * cap) {
      p.src_info[row] = t;
      atomicAdd(&s_cnt[(row / cap) * W + s], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < L * W; i += blockDim.x) p.src_counts[i] = s_cnt[i];
}

// The expert MLP's progress signal (ep.OverlapSignals.signal): counters[first + i] += add, after everything
// the stream ran before (the expert's rows) is visible GPU-wide.
extern "C" __global__ void __launch_bounds__(256) ll_signal_ready(const ep::SignalParams p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < p.count) {
    __threadfence();
    ep::red_add_release_gpu_u32(p.counters + p.first + i, p.add);
  }
}
