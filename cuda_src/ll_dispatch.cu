// LL dispatch: no host synchronization, fixed-capacity EXPERT_MAJOR output, rows in a fixed order.
//
// Buffers (symmetric, per rank; par = seq & 1 of the device dispatch sequence):
//   out[h][L][cap][row]        the dispatch output (h = out_par, the host's alternation), written by the
//                              sources straight into their rows
//   scales[h][L][groups][cap]  FP8 modes: one scale per (row, 128 channels), token-contiguous (MN-major)
//   meta[par][s][t]          MetaRec of source s's token t: its rows here per slot, weights, seq tag
//   sig: count slots [par][s] {seq, T_s, rows of s per global expert [E]}, arrivals u64 [s]
// Row order: expert e's rows are grouped by source rank ascending, then token index ascending:
//   row(t, e) on e's owner = e_local * cap + base_s(e) + idx(t, e)
// where idx(t, e) is the number of this source's tokens before t naming e, and base_s(e) the rows of e that
// lower ranks send. Every source counts its tokens per expert and broadcasts the counts (one count slot per
// source in every rank), so every sender knows every base before it sends a row: no atomics place a row.
// Phases of one dispatch (ll_dispatch = send then receive in one kernel; the hook splits them):
//   1 route (every block, in shared memory): a bitmap of tokens per expert column, its prefix counts ->
//     idx(t, e) and the per-expert totals; block 0 publishes the totals and T in every rank's slot [rank]
//     (plain stores, then st.release.sys of the slot's seq) and the tokens' destination masks (send_mask)
//   2 every block waits for every source's slot of this seq, and sums the bases of this rank from it
//   3 send: items (token, destination rank, column chunk), one per warp: a local destination gets the row in
//     every row of its experts, a remote one only in its first expert's row, with the MetaRec (chunk 0)
//   4 the last block to finish sending release-adds 1 to the arrivals of this rank in every destination
//   5 receive: wait for every source's arrival of this seq; then items (remote source, token, chunk) copy
//     the first row to the token's other rows here (with a caller's output_buffer, every row of every source
//     goes there instead)
// The grid is sized by the host from this rank's work (a few tokens need few blocks); nothing counts blocks
// across ranks.
// Parity reuse is safe: a rank starts dispatch seq + 2 only after dispatch seq + 1 finished, which waited for
// every peer's seq + 1 count slot, written after that peer's dispatch seq finished reading slots of seq.
#include "common/fp8.cuh"
#include "common/ll_common.cuh"

namespace ep {

// Bytes of one output row and of one column chunk in mode kMode.
template <int kMode>
__device__ __forceinline__ int out_row_bytes(const LLParams& p) { return kMode == kBf16 ? 2 * p.hidden : p.hidden; }
template <int kMode>
__host__ __device__ constexpr int out_chunk_bytes() { return kMode == kBf16 ? 2 * kChunkChannels : kChunkChannels; }

__device__ __forceinline__ int num_chunks(const LLParams& p) { return (p.hidden + kChunkChannels - 1) / kChunkChannels; }

struct RouteSmem {
  int* base;      // [E] rows of each global expert that lower ranks send (this rank's base)
  u16* idx;       // [T_max][K] idx(t, e) of each slot
  u32* words;     // [ceil(T_max/32)][cols] token bitmap of one column tile
  u16* pre;       // [ceil(T_max/32)][cols] tokens of the column before each word
};

__device__ __forceinline__ RouteSmem route_smem(const LLParams& p, u8* smem) {
  RouteSmem r;
  const int nw = (p.max_tokens + 31) / 32;
  r.base = reinterpret_cast<int*>(smem);
  r.words = reinterpret_cast<u32*>(smem + 4 * p.num_experts);
  r.pre = reinterpret_cast<u16*>(r.words + nw * p.cols_per_tile);
  r.idx = r.pre + nw * p.cols_per_tile;
  return r;
}

// Phase 1 in every block; block 0 also publishes this rank's counts and destination masks.
__device__ void ll_route(const LLParams& p, u32 seq, const RouteSmem& s) {
  const int T = p.num_tokens, K = p.topk, E = p.num_experts, L = p.local_experts, W = p.world;
  const int par = seq & 1u, cols = p.cols_per_tile, nw = (T + 31) / 32;
  const bool lead = blockIdx.x == 0;
  for (int lo = 0; lo < E; lo += cols) {
    const int ncol = min(E, lo + cols) - lo;
    for (int i = threadIdx.x; i < nw * cols; i += blockDim.x) s.words[i] = 0u;
    __syncthreads();
    for (int i = threadIdx.x; i < T * K; i += blockDim.x) {
      const int t = i / K, e = ll_expert(p, t, i % K, lead && lo == 0);
      if (e >= lo && e < lo + ncol) atomicOr(&s.words[(t >> 5) * cols + e - lo], 1u << (t & 31));
    }
    __syncthreads();
    for (int col = threadIdx.x; col < ncol; col += blockDim.x) {
      int run = 0;
      for (int w = 0; w < nw; ++w) {
        s.pre[w * cols + col] = static_cast<u16>(run);
        run += __popc(s.words[w * cols + col]);
      }
      if (lead)
        for (int d = 0; d < W; ++d) ll_slot_counts(ll_count_slot(p, d, par, p.rank))[lo + col] = run;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < T * K; i += blockDim.x) {
      const int t = i / K, e = ll_expert(p, t, i % K, false);
      if (e >= lo && e < lo + ncol) {
        const int w = (t >> 5) * cols + e - lo;
        s.idx[i] = static_cast<u16>(s.pre[w] + __popc(s.words[w] & ((1u << (t & 31)) - 1u)));
      }
    }
    __syncthreads();
  }
  if (lead) {
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
      u32 mask = 0;
      for (int k = 0; k < K; ++k) {
        const int e = ll_expert(p, t, k, false);
        if (e >= 0) mask |= 1u << (e / L);
      }
      p.send_mask[par * p.max_tokens + t] = mask;
    }
    __syncthreads();
    if (threadIdx.x < W) {
      LLCountSlot* slot = ll_count_slot(p, threadIdx.x, par, p.rank);
      slot->num_tokens = T;
      fence_sys();
      st_release_sys(&slot->seq, seq);
    }
  }
}

// Phase 2: wait for every source's count slot; bases of this rank (and, block 0, the call's counts).
__device__ bool ll_bases(const LLParams& p, u32 seq, const RouteSmem& s, int* s_ok) {
  const int W = p.world, E = p.num_experts, L = p.local_experts, par = seq & 1u;
  if (threadIdx.x == 0) *s_ok = 1;
  __syncthreads();
  if (threadIdx.x < W && !wait_geq<kSpinSleepMaxNs>(&ll_count_slot(p, p.rank, par, threadIdx.x)->seq, seq, p.err,
                                                    p.timeout_ns, kPhaseLLDispatchRecv, p.rank, threadIdx.x))
    *s_ok = 0;
  __syncthreads();
  if (!*s_ok) return false;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int base = 0;
    for (int src = 0; src < p.rank; ++src) base += ld_cg_i32(ll_slot_counts(ll_count_slot(p, p.rank, par, src)) + e);
    s.base[e] = base;
  }
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e < L; e += blockDim.x) {
      int total = 0;
      for (int src = 0; src < W; ++src)
        total += ld_cg_i32(ll_slot_counts(ll_count_slot(p, p.rank, par, src)) + p.rank * L + e);
      p.counts_out[e] = total;
      if (p.cum_counts) {
        if (p.cum_64) atomicAdd(static_cast<unsigned long long*>(p.cum_counts) + e, static_cast<unsigned long long>(total));
        else atomicAdd(static_cast<int*>(p.cum_counts) + e, total);
      }
    }
    if (threadIdx.x < W) p.ntok[par * W + threadIdx.x] = ld_cg_i32(&ll_count_slot(p, p.rank, par, threadIdx.x)->num_tokens);
  }
  __syncthreads();
  return true;
}

// The FP8 image of chunk c of a bf16 row in each of the n destination rows lanes 0..n-1 hold (row ids), with
// their scales. Lanes 0..15 / 16..31 of vector step u hold the 128-channel groups 2u / 2u + 1.
template <int kMode>
__device__ __forceinline__ void cast_chunk(const LLParams& p, int d, int my_row, int n, const u8* src_row,
                                           int c, int lane) {
  const int nvec = min(kChunkChannels, p.hidden - c * kChunkChannels) / 8;
  const uint4* src = reinterpret_cast<const uint4*>(src_row + static_cast<u64>(c) * 2 * kChunkChannels);
  const int groups = p.hidden / kFp8Group;
  u8* out = ll_out(p, d);
  u8* scales = ll_scales(p, d);
#pragma unroll
  for (int u = 0; u < kChunkChannels / 8 / kWarpSize; ++u) {
    const int v = u * kWarpSize + lane;
    uint4 x = make_uint4(0u, 0u, 0u, 0u);
    if (v < nvec) x = ld_nc_v4(src + v);
    float amax = v < nvec ? absmax8(x) : 0.f;
#pragma unroll
    for (int off = 8; off >= 1; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, off));
    float scale, mult;
    fp8_scale<kMode>(amax, &scale, &mult);
    const uint2 q = e4m3x8(x, mult);
    const int g = c * kMaxLLGroupsPerChunk + 2 * u + (lane >> 4);
    for (int j = 0; j < n; ++j) {
      const int row = __shfl_sync(0xFFFFFFFFu, my_row, j);
      if (v < nvec)
        *reinterpret_cast<uint2*>(out + static_cast<u64>(row) * p.hidden + static_cast<u64>(c) * kChunkChannels + 8 * v) = q;
      if ((lane & 15) == 0 && v < nvec) {
        const int e = row / p.capacity, r = row % p.capacity;
        if (kMode == kFp8Ue8m0) {
          scales[(static_cast<u64>(e) * (groups / 4) + g / 4) * p.capacity * 4 + 4ull * r + (g & 3)] =
              static_cast<u8>(ue8m0_of(scale));
        } else {
          reinterpret_cast<float*>(scales)[(static_cast<u64>(e) * groups + g) * p.capacity + r] = scale;
        }
      }
    }
  }
}

// Phase 3: this warp's items (token, destination, chunk).
template <int kMode>
__device__ void ll_send(const LLParams& p, u32 seq, const RouteSmem& s, int gw, int RW, int lane) {
  const int T = p.num_tokens, K = p.topk, L = p.local_experts, W = p.world, C = num_chunks(p);
  const int par = seq & 1u, row_bytes = out_row_bytes<kMode>(p);
  const bool expand_here = p.copy_out == nullptr;   // with a caller's buffer the receiver writes every row
  for (int item = gw; item < T * W * C; item += RW) {
    const int t = item / (W * C), d = (item / C) % W, c = item % C;
    const int e = lane < K ? ll_expert(p, t, lane, false) : -1;
    const bool own = e >= 0 && e / L == d;
    const u32 owned = __ballot_sync(0xFFFFFFFFu, own);
    if (!owned) continue;
    const int row = own ? (e % L) * p.capacity + s.base[e] + s.idx[t * K + lane] : -1;
    bool first_of_expert = own;
    for (int j = 0; j < K; ++j) {
      const int other = __shfl_sync(0xFFFFFFFFu, e, j);
      first_of_expert &= !(j < lane && other == e);
    }
    const u32 distinct = __ballot_sync(0xFFFFFFFFu, first_of_expert);
    const u32 targets = (d == p.rank && expand_here) ? distinct : (distinct & (0u - distinct));   // all, or the first
    const int n = __popc(targets);
    const u8* src_row = p.x + static_cast<u64>(t) * 2 * p.hidden;
    if (kMode == kBf16) {
      const u64 dst = reinterpret_cast<u64>(ll_out(p, d) + static_cast<u64>(row < 0 ? 0 : row) * row_bytes +
                                            static_cast<u64>(c) * out_chunk_bytes<kMode>());
      warp_copy_chunk(compact_by_mask(targets, dst, lane), n, src_row + static_cast<u64>(c) * 2 * kChunkChannels,
                      chunk_bytes(c, out_chunk_bytes<kMode>(), row_bytes), lane);
    } else {
      cast_chunk<kMode>(p, d, static_cast<int>(compact_by_mask(targets, static_cast<u64>(row), lane)), n, src_row, c,
                        lane);
    }
    if (c == 0) {
      u8* rec = ll_meta(p, d, par, p.rank, t);
      if (lane < K) {
        meta_rows(rec)[lane] = row;
        meta_w(rec, K)[lane] = p.weights ? p.weights[static_cast<i64>(t) * K + lane] : 1.f;
      }
      if (lane == 0) reinterpret_cast<MetaRec*>(rec)->seq = seq;
    }
  }
}

// Phase 5: copy each remote token's first row to its other rows here (or every row to the caller's buffer).
template <int kMode>
__device__ void ll_expand(const LLParams& p, u32 seq, int gw, int RW, int lane, int* s_start) {
  const int W = p.world, K = p.topk, C = num_chunks(p), par = seq & 1u, row_bytes = out_row_bytes<kMode>(p);
  const bool to_caller = p.copy_out != nullptr;
  if (threadIdx.x == 0) {   // items of source s: [s_start[s], s_start[s + 1]), T_s * C of them (none for us)
    // NOTE: T_s from this rank's own copy (the send half stored it): with hooks, a peer's next-but-one send
    // may already rewrite its count slot of this parity.
    int run = 0;
    for (int src = 0; src < W; ++src) {
      s_start[src] = run;
      if (src != p.rank || to_caller) run += ld_cg_i32(p.ntok + par * W + src) * C;
    }
    s_start[W] = run;
  }
  __syncthreads();
  u8* mine = ll_out(p, p.rank);
  u8* dst_base = to_caller ? p.copy_out : mine;
  const int groups = p.hidden / kFp8Group;
  for (int item = gw; item < s_start[W]; item += RW) {
    int src = 0;
    while (item >= s_start[src + 1]) ++src;
    const int t = (item - s_start[src]) / C, c = (item - s_start[src]) % C;
    int row;
    bool first_of_row;
    if (!rec_rows(ll_meta(p, p.rank, par, src, t), seq, K, lane, &row, &first_of_row)) continue;   // not sent here
    const u32 distinct = __ballot_sync(0xFFFFFFFFu, first_of_row);
    const int first_row = __shfl_sync(0xFFFFFFFFu, row, __ffs(distinct) - 1);
    const u32 targets = to_caller ? distinct : (distinct & (distinct - 1u));
    const int n = __popc(targets);
    if (n == 0) continue;
    const int cb = out_chunk_bytes<kMode>();
    const u8* src_chunk = mine + static_cast<u64>(first_row) * row_bytes + static_cast<u64>(c) * cb;
    const u64 dst = reinterpret_cast<u64>(dst_base + static_cast<u64>(row < 0 ? 0 : row) * row_bytes + static_cast<u64>(c) * cb);
    warp_copy_chunk(compact_by_mask(targets, dst, lane), n, src_chunk, chunk_bytes(c, cb, row_bytes), lane);
    if (kMode != kBf16) {   // the chunk's scales follow the rows
      const int my_row = static_cast<int>(compact_by_mask(targets, static_cast<u64>(row < 0 ? 0 : row), lane));
      u8* scales = ll_scales(p, p.rank);
      const int g = c * kMaxLLGroupsPerChunk + (lane & 7);
      const int fe = first_row / p.capacity, fr = first_row % p.capacity;
      for (int j0 = 0; j0 < n; j0 += kWarpSize / 8) {   // 4 rows per step, lanes 8j..8j+7 take row j's 8 scales
        const int j = j0 + (lane >> 3);
        const int r = __shfl_sync(0xFFFFFFFFu, my_row, j < n ? j : 0);
        if (j >= n || g >= groups) continue;
        const int e = r / p.capacity, rr = r % p.capacity;
        if (kMode == kFp8Ue8m0) {
          const u64 gw4 = static_cast<u64>(groups / 4);
          scales[(e * gw4 + g / 4) * p.capacity * 4 + 4ull * rr + (g & 3)] =
              scales[(fe * gw4 + g / 4) * p.capacity * 4 + 4ull * fr + (g & 3)];
        } else {
          float* f = reinterpret_cast<float*>(scales);
          f[(static_cast<u64>(e) * groups + g) * p.capacity + rr] = f[(static_cast<u64>(fe) * groups + g) * p.capacity + fr];
        }
      }
    }
  }
}

template <int kMode>
__device__ __forceinline__ void ll_dispatch_send_body(const LLParams& p, u32 seq) {
  extern __shared__ __align__(16) u8 smem[];
  __shared__ int s_ok;
  const RouteSmem s = route_smem(p, smem);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  ll_route(p, seq, s);
  if (ll_bases(p, seq, s, &s_ok)) ll_send<kMode>(p, seq, s, blockIdx.x * nwarps + warp, gridDim.x * nwarps, lane);
  ll_finish_send(p, kDispatchSend, seq, p.disp_cnt_offset);
}

template <int kMode>
__device__ __forceinline__ void ll_dispatch_recv_body(const LLParams& p, u32 seq) {
  __shared__ int s_ok;
  __shared__ int s_start[kMaxWorld + 1];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  if (ll_wait_arrivals(p, p.disp_cnt_offset, seq, kPhaseLLDispatchRecv, &s_ok))
    ll_expand<kMode>(p, seq, blockIdx.x * nwarps + warp, gridDim.x * nwarps, lane, s_start);
  ll_finish_block(p, kDispatchRecv, seq);
}

}  // namespace ep

#define EP_LL_DISPATCH_ENTRIES(MODE, SUFFIX)                                                                      \
  extern "C" __global__ void __launch_bounds__(ep::kLLWarps * 32, 1) ll_dispatch_##SUFFIX(const ep::LLParams p) { \
    const u32 seq = ep::ll_read_seq(p, ep::kDispatchSend);                                                    \
    ep::ll_dispatch_send_body<MODE>(p, seq);                                                                      \
    ep::ll_dispatch_recv_body<MODE>(p, seq);                                                                      \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(ep::kLLWarps * 32, 1) ll_dispatch_send_##SUFFIX(const ep::LLParams p) { \
    ep::ll_dispatch_send_body<MODE>(p, ep::ll_read_seq(p, ep::kDispatchSend));                                    \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(ep::kLLWarps * 32, 1) ll_dispatch_recv_##SUFFIX(const ep::LLParams p) { \
    ep::ll_dispatch_recv_body<MODE>(p, ep::ll_read_seq(p, ep::kDispatchRecv));                                    \
  }

EP_LL_DISPATCH_ENTRIES(ep::kBf16, bf16)
EP_LL_DISPATCH_ENTRIES(ep::kFp8, fp8)
EP_LL_DISPATCH_ENTRIES(ep::kFp8Pow2, fp8_pow2)
EP_LL_DISPATCH_ENTRIES(ep::kFp8Ue8m0, fp8_ue8m0)
