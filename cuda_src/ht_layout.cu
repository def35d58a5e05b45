// HT routing layout and count exchange (phase 1 of an uncached HT dispatch).
//
// ht_route_count     grid = ceil(T/128) blocks of 128 threads (one token each): validates ids, marks
//                    repeated experts, counts (token, expert) pairs and (token, rank) pairs per chunk.
// ht_route_exchange  one block: scans the chunk counts into chunk bases, resets `bad` (the runtime's, kept
//                    across calls like chunk_cnt) once read, writes this rank's totals into
//                    every peer's count slot [rank] (plain stores, then st.release.sys of the slot's
//                    epoch), acquire-waits for every peer's slot, derives the receive layout (expert
//                    bases with alignment padding, per-source row bases, receive counts) into the per-call
//                    `info` array and the mapped pinned host mirror, then sets host_epoch = epoch. The
//                    slots hold all E counts, so it also derives where our tokens go in every peer's
//                    output (peer_row: owned outputs, which senders write into directly).
//                    The host waits on host_epoch (bounded) to size the outputs.
// ht_route_positions grid = ceil(T/128): per-slot index within its expert and per-destination slot, in
//                    token order, so row order never depends on timing.
// The count slots are double-buffered by the epoch's parity: a rank writes exchange i+2's slots only after
// its exchange i+1 saw every peer's slot of i+1, which each peer wrote after finishing exchange i (its reads
// of the slots of i included). One buffer would not do once nothing waits between two exchanges (worst-case
// dispatches: a dispatch that moves nothing, or a source that sends nothing, waits for no peer).
#include "common/params.cuh"

namespace ep {

__device__ __forceinline__ int load_id(const void* ids, int ids_64, long long i) {
  if (ids_64) {
    const long long v = static_cast<const long long*>(ids)[i];
    // Values outside int32 are invalid anyway; clamp so they stay invalid after narrowing.
    return v < -2 ? -2 : (v > 0x7FFFFFFF ? 0x7FFFFFFF : static_cast<int>(v));
  }
  return static_cast<const int*>(ids)[i];
}

}  // namespace ep

extern "C" __global__ void __launch_bounds__(ep::kRouteChunk) ht_route_count(const ep::HtRouteParams p) {
  using namespace ep;
  extern __shared__ int s_cnt[];   // [E + W]
  const int ncols = p.num_experts + p.world;
  for (int i = threadIdx.x; i < ncols; i += blockDim.x) s_cnt[i] = 0;
  __syncthreads();
  const int t = blockIdx.x * kRouteChunk + threadIdx.x;
  if (t < p.num_tokens) {
    int ids[kMaxTopk];
    u32 mask = 0;
    for (int k = 0; k < p.topk; ++k) {
      const long long flat = static_cast<long long>(t) * p.topk + k;
      const int id = load_id(p.topk_ids, p.ids_64, flat);
      ids[k] = id;
      int code = -1;
      if (id < -1 || id >= p.num_experts) {
        atomicMin(p.bad, static_cast<int>(flat));
      } else if (id >= 0) {
        bool dup = false;
        for (int j = 0; j < k; ++j) dup |= (ids[j] == id);
        code = dup ? (id | kDupBit) : id;
        if (!dup) {
          atomicAdd(&s_cnt[id], 1);
          mask |= 1u << (id / p.local_experts);
        }
      }
      p.route[flat] = code;
    }
    for (int d = 0; d < p.world; ++d)
      if (mask >> d & 1u) atomicAdd(&s_cnt[p.num_experts + d], 1);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < ncols; i += blockDim.x)
    p.chunk_cnt[static_cast<long long>(blockIdx.x) * ncols + i] = s_cnt[i];
}

extern "C" __global__ void __launch_bounds__(1024) ht_route_exchange(const ep::HtRouteParams p) {
  using namespace ep;
  extern __shared__ int s_total[];   // [E + W]
  __shared__ int s_abort;
  const int ncols = p.num_experts + p.world;
  const int L = p.local_experts, W = p.world;
  const int tid = threadIdx.x;
  const u64 epoch = *reinterpret_cast<volatile const u64*>(p.epoch_ctr) + 1;   // the same on every rank
  if (tid == 0) s_abort = 0;
  // 1. scan per-chunk counts into chunk bases, column by column (token order within a column).
  for (int col = tid; col < ncols; col += blockDim.x) {
    int running = 0;
    for (int c = 0; c < p.nchunks; ++c) {
      int* cell = p.chunk_cnt + static_cast<long long>(c) * ncols + col;
      const int v = *cell;
      *cell = running;
      running += v;
    }
    s_total[col] = running;
  }
  __syncthreads();
  const int bad_index = *p.bad;
  const int invalid = bad_index != 0x7FFFFFFF;
  // 2. publish totals: every peer's slot [rank] gets our rows per expert, all E of them (so every rank can
  //    derive every rank's layout: peer_row below), and our tokens per rank (every rank's rank_prefix), and
  //    the token count for that peer.
  const int E = p.num_experts;
  auto slot_at = [&](int d, int s) {
    return reinterpret_cast<CountSlot*>(p.sig_peers[d] + p.cnt_offset +
                                        static_cast<u64>((epoch & 1) * W + s) * p.cnt_stride);
  };
  for (int i = tid; i < W * ncols; i += blockDim.x) {
    const int d = i / ncols, g = i % ncols;
    slot_counts(slot_at(d, p.rank))[g] = s_total[g];
  }
  if (tid < W) {
    CountSlot* slot = slot_at(tid, p.rank);
    slot->tokens_to_you = s_total[p.num_experts + tid];
    slot->num_tokens = p.num_tokens;
    slot->invalid = invalid;
  }
  __threadfence_system();
  __syncthreads();
  if (tid == 0) {
    *p.bad = 0x7FFFFFFF;   // every thread has read it: ready for the next routing's ht_route_count
    if (invalid && p.record_invalid) {   // the id as given (load_id narrows int64 ids)
      const long long value = p.ids_64 ? static_cast<const long long*>(p.topk_ids)[bad_index]
                                       : static_cast<const int*>(p.topk_ids)[bad_index];
      record_first(p.input_err, kPhaseBadExpertId, p.rank, bad_index, static_cast<u64>(value), 0);
    }
  }
  if (tid < W) st_release_sys(&slot_at(tid, p.rank)->epoch, epoch);
  // 3. wait for every source's slot in our own buffer.
  if (tid < W && !wait_geq(&slot_at(p.rank, tid)->epoch, epoch, p.err, p.timeout_ns, kPhaseHtCounts, p.rank, tid))
    s_abort = 1;
  __syncthreads();
  if (s_abort) return;
  if (tid == 0) *p.epoch_ctr = epoch;   // every thread read it before the barrier above
  // 4. derive the layouts, one rule for every rank d: each expert's rows padded to the alignment, experts
  //    stacked (FLAT) or each given d's largest padded count (EXPERT_MAJOR capacity); inside an expert the
  //    sources in rank order. Our own output's fields come from d = rank; peer_row[g] = the row in the output
  //    of g's owner where our tokens of g start (senders write there when outputs are owned). s_total is free
  //    again: padded sizes.
  const InfoLayout lay(L, W);
  i32* info = p.info;
  auto counts_of = [&](int s) { return reinterpret_cast<const volatile i32*>(slot_counts(slot_at(p.rank, s))); };
  const int mine = p.rank * L;   // our experts' columns in the count slots
  for (int g = tid; g < E; g += blockDim.x) {
    int total = 0, before = 0;
    for (int s = 0; s < W; ++s) {
      const int c = counts_of(s)[g];
      total += c;
      if (s < p.rank) before += c;
    }
    s_total[g] = (total + p.alignment - 1) / p.alignment * p.alignment;
    info[lay.peer_row + g] = before;
    if (g / L == p.rank) info[lay.counts + g - mine] = total;
  }
  __syncthreads();
  for (int d = tid; d < W; d += blockDim.x) {
    int cap = 0;
    for (int e = 0; e < L; ++e) cap = max(cap, s_total[d * L + e]);
    int running = 0;
    for (int e = 0; e < L; ++e) {
      info[lay.peer_row + d * L + e] += running;
      if (d == p.rank) info[lay.base + e] = running;
      running += p.expert_major ? cap : s_total[d * L + e];
    }
    if (d == p.rank) {
      info[lay.base + L] = running;
      info[lay.total_rows] = running;
      info[lay.capacity] = p.expert_major ? cap : 0;
    }
  }
  if (tid == 0) {
    int mask = 0, prefix = 0;
    for (int s = 0; s < W; ++s) {
      const volatile CountSlot* sl = slot_at(p.rank, s);
      if (sl->invalid) mask |= 1 << s;
      info[lay.recv_n + s] = sl->tokens_to_you;
      info[lay.src_T + s] = sl->num_tokens;
      info[lay.recv_prefix + s] = prefix;
      prefix += sl->tokens_to_you;
    }
    if (mask) {   // nothing moves in this call: nothing is received (a worst-case combine then pushes nothing)
      for (int s = 0; s <= W; ++s) info[lay.recv_prefix + s] = 0;
      for (int s = 0; s < W; ++s) info[lay.recv_n + s] = 0;
      prefix = 0;
    }
    info[lay.recv_prefix + W] = prefix;
    info[lay.n_recv_total] = prefix;
    info[lay.invalid_mask] = mask;
  }
  bool any_invalid = false;
  for (int s = 0; s < W; ++s) any_invalid |= slot_at(p.rank, s)->invalid != 0;
  for (int d = tid; d < W; d += blockDim.x) {   // rank_prefix[s][d]: tokens sources 0..s send to rank d
    int running = 0;
    for (int s = 0; s < W; ++s) {
      running += any_invalid ? 0 : counts_of(s)[E + d];
      info[lay.rank_prefix + s * W + d] = running;
    }
  }
  __syncthreads();
  for (int e = tid; e < L; e += blockDim.x) {
    int row = info[lay.base + e];
    for (int s = 0; s < W; ++s) {
      info[lay.src_base + s * L + e] = row;
      row += counts_of(s)[mine + e];
    }
  }
  __syncthreads();
  for (int i = tid; i < lay.peer_row; i += blockDim.x) p.host_info[i] = info[i];
  if (tid == 0) {
    p.host_info[lay.peer_row] = bad_index;
    p.host_info[lay.peer_row + 1] = invalid ? load_id(p.topk_ids, p.ids_64, bad_index) : 0;
  }
  __threadfence_system();
  __syncthreads();
  if (tid == 0) {
    *reinterpret_cast<volatile u64*>(p.host_epoch) = p.epoch;
    __threadfence_system();
  }
}

extern "C" __global__ void __launch_bounds__(ep::kRouteChunk) ht_route_positions(const ep::HtRouteParams p) {
  using namespace ep;
  // Per warp of 32 consecutive tokens, one bit per lane for every column (expert e, then E + rank d): bit j
  // of s_bits[w][col] is set when token 32w+j names that column (first occurrences only). A token's index
  // among this chunk's tokens of a column is the population count of the earlier warps' words plus the
  // bits of the earlier lanes in its own warp's word: O(K * warps) per token. Columns go in tiles of
  // kRoutePosTile so shared memory stays small for any E.
  extern __shared__ u32 s_bits[];   // [kRouteWarps][tile]
  constexpr int kRouteWarps = kRouteChunk / kWarpSize;
  const bool invalid = p.info[InfoLayout(p.local_experts, p.world).invalid_mask] != 0;   // the exchange's verdict
  const int ncols = p.num_experts + p.world;
  const int tile = min(ncols, kRoutePosTile);
  const int K = p.topk;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int t = blockIdx.x * kRouteChunk + threadIdx.x;
  const bool live = t < p.num_tokens;
  const u32 bit = 1u << lane;
  const int* base = p.chunk_cnt + static_cast<long long>(blockIdx.x) * ncols;
  int codes[kMaxTopk];
  u32 mask = 0;
  for (int k = 0; k < K; ++k) {
    codes[k] = live ? p.route[static_cast<long long>(t) * K + k] : -1;
    if (codes[k] >= 0 && !(codes[k] & kDupBit)) mask |= 1u << (codes[k] / p.local_experts);
  }
  auto before = [&](int c) {   // c: column within the tile
    int n = __popc(s_bits[warp * tile + c] & (bit - 1u));
    for (int w = 0; w < warp; ++w) n += __popc(s_bits[w * tile + c]);
    return n;
  };
  for (int lo = 0; lo < ncols; lo += tile) {
    const int hi = min(ncols, lo + tile);
    for (int i = threadIdx.x; i < kRouteWarps * tile; i += blockDim.x) s_bits[i] = 0;
    __syncthreads();
    for (int k = 0; k < K; ++k)
      if (codes[k] >= lo && codes[k] < hi && !(codes[k] & kDupBit)) atomicOr(&s_bits[warp * tile + codes[k] - lo], bit);
    for (int d = 0; d < p.world; ++d) {
      const int col = p.num_experts + d;
      if ((mask >> d & 1u) && col >= lo && col < hi) atomicOr(&s_bits[warp * tile + col - lo], bit);
    }
    __syncthreads();
    if (live) {
      for (int k = 0; k < K; ++k) {
        // A repeated expert (kDupBit) gets the index of its first occurrence in this token.
        const int e = codes[k] & ~kDupBit;
        if (codes[k] >= 0 && e >= lo && e < hi) p.slot_idx[static_cast<long long>(t) * K + k] = base[e] + before(e - lo);
        if (codes[k] < 0 && lo == 0) p.slot_idx[static_cast<long long>(t) * K + k] = -1;
      }
      for (int d = 0; d < p.world; ++d) {
        const int col = p.num_experts + d;
        if (col >= lo && col < hi)   // a call with invalid ids moves nothing: its combine sums nothing either
          p.send_pos[static_cast<long long>(t) * p.world + d] =
              (mask >> d & 1u) && !invalid ? base[col] + before(col - lo) : -1;
      }
    }
    __syncthreads();   // the next tile reuses s_bits
  }
}
