// HT dispatch data phase: one kernel, senders and receivers in every block.
//
// Buffers (symmetric, one allocation each per rank):
//   data[s][pos]  row_bytes  token `pos` that source s sent here (pos = its index among s's tokens for us)
//   meta[s][pos]  meta_stride {token, lexp[K] (local expert | kDupBit, or -1), idx[K], w[K]}
//   sig.dflag[s][c] u64, sig.drange[s][c] int2: source s finished chunk c; its slots are [x, y)
// Warps [0, W/2) send: block b takes chunks b, b+G, ... of CHS tokens; each token is read once and written
// once per destination RANK (TMA bulk copy or 16-byte warp stores), with its metadata. After a chunk the
// senders meet at a named barrier and thread d publishes the chunk's slot range on rank d, then
// release-stores (system scope) dflag = epoch.
// Warps [W/2, W) receive: every (source, chunk) item is owned by one receiver warp of the grid, which
// acquire-waits (bounded) for its flag and expands each token into one output row per local expert it
// names: row = src_base[s][e] + idx (exchanged counts, so order is fixed by routing, not timing). They
// also record recv_rows/recv_w for combine, and zero the alignment padding rows.
// The grid must be co-resident (G <= SMs): receivers wait for senders of other blocks and other ranks.
#include "common/params.cuh"
#include "common/reduce.cuh"

namespace ep {

constexpr int kSendWarps = kDispatchWarps / 2;
// One token's metadata record, staged in shared memory and sent as 16-byte stores: as single-word stores it
// was ~25 tiny NVLink writes per (token, destination).
constexpr int kMetaBytesMax = (8 + 12 * kMaxTopk + 15) / 16 * 16;
constexpr int kRecvWarps = kDispatchWarps - kSendWarps;
constexpr int kExpandUnroll = 16;  // 8 KB in flight per receiver warp: local expansion is latency-bound
constexpr int kSendUnroll = 16;    // warp-store senders (EP_NCCLEP_TMA=0): 8 KB of the row loaded per round

__device__ __forceinline__ void ht_send(const HtDispatchParams& p, u8* smem, u64* bar, u8* meta_stage, int warp,
                                        int lane) {
  const int W = p.world, K = p.topk, L = p.local_experts;
  const int nchunks = (p.num_tokens + p.chunk_tokens - 1) / p.chunk_tokens;
  u8* my_row = smem + static_cast<u64>(warp) * p.row_bytes;   // TMA staging row of this warp
  u32 phase = 0;
  if (kDispatchTma && lane == 0) {
    mbar_init(bar, 1);
    fence_mbar_init();
  }
  __syncwarp();
  for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const int t_begin = c * p.chunk_tokens;
    const int t_end = min(p.num_tokens, t_begin + p.chunk_tokens);
    for (int t = t_begin + warp; t < t_end; t += kSendWarps) {
      const int my_pos = lane < W ? p.send_pos[static_cast<i64>(t) * W + lane] : -1;
      const u32 dmask = __ballot_sync(0xFFFFFFFFu, my_pos >= 0);
      int code = -1, sidx = -1;
      float wk = 1.f;
      if (lane < K) {
        code = p.route[static_cast<i64>(t) * K + lane];
        sidx = p.slot_idx[static_cast<i64>(t) * K + lane];
        if (p.weights) wk = p.weights[static_cast<i64>(t) * K + lane];
      }
      const int owner = code >= 0 ? (code & ~kDupBit) / L : -1;
      const u8* src = p.x + static_cast<i64>(t) * p.row_bytes;
      const MetaView staged{meta_stage, K};
      if (lane == 0) {
        *staged.token() = t;
        staged.token()[1] = 0;
      }
      if (lane < K) {
        staged.idx()[lane] = sidx;
        staged.w()[lane] = wk;
      }
      if (kDispatchTma && lane == 0) {
        tma_wait_read<0>();                 // the previous token's stores have read the staging row
        mbar_arrive_expect_tx(bar, p.row_bytes);
        tma_load(my_row, src, p.row_bytes, bar);
        while (!mbar_try_wait(bar, phase)) {}
        phase ^= 1u;
      }
      __syncwarp();
      for (u32 m = dmask; m; m &= m - 1) {
        const int d = __ffs(m) - 1;
        const int pos = __shfl_sync(0xFFFFFFFFu, my_pos, d);
        const u64 slot = static_cast<u64>(p.rank) * p.max_tokens + pos;
        if (lane < K) staged.lexp()[lane] = owner == d ? ((code & ~kDupBit) % L) | (code & kDupBit) : -1;
        __syncwarp();
        if (lane < p.meta_stride / kVecBytes)
          st_v4(reinterpret_cast<uint4*>(p.meta_peers[d] + slot * p.meta_stride) + lane,
                reinterpret_cast<const uint4*>(meta_stage)[lane]);
        __syncwarp();   // the record is sent before the next destination rewrites lexp
        if (kDispatchTma && lane == 0)
          tma_store(reinterpret_cast<u8*>(p.data_peers[d] + slot * p.row_bytes), my_row, p.row_bytes);
      }
      if (kDispatchTma && lane == 0) tma_commit();
      if (!kDispatchTma) {
        // One read of the row feeds every destination: lane j (j < n) holds the j-th destination's slot.
        const u64 my_slot = static_cast<u64>(p.rank) * p.max_tokens + my_pos;
        const u64 dst_of_lane = my_pos >= 0 ? p.data_peers[lane] + my_slot * p.row_bytes : 0;
        warp_copy_multi<kSendUnroll>(compact_by_mask(dmask, dst_of_lane, lane), __popc(dmask), src, p.row_bytes, lane);
      }
    }
    if (kDispatchTma && lane == 0) {
      tma_wait_all();
      fence_proxy_async_global();
    }
    __syncwarp();
    named_barrier(1, kSendWarps * kWarpSize);
    if (threadIdx.x < W) {
      const int d = threadIdx.x;
      int start = -1, end = 0;
      for (int t = t_begin; t < t_end; ++t) {
        const int pos = p.send_pos[static_cast<i64>(t) * W + d];
        if (pos >= 0) {
          if (start < 0) start = pos;
          end = pos + 1;
        }
      }
      if (start < 0) start = end = 0;
      const u64 cell = static_cast<u64>(p.rank) * p.max_chunks + c;
      reinterpret_cast<int2*>(p.sig_peers[d] + p.drange_offset)[cell] = make_int2(start, end);
      fence_sys();
      st_release_sys(reinterpret_cast<u64*>(p.sig_peers[d] + p.dflag_offset) + cell, p.epoch);
    }
  }
  if (kDispatchTma && lane == 0) tma_wait_all();
}

__device__ __forceinline__ void ht_receive(const HtDispatchParams& p, int rwarp, int lane) {
  const int W = p.world, K = p.topk, L = p.local_experts;
  const InfoLayout lay(L, W);
  const int* info = p.info;
  const int RW = gridDim.x * kRecvWarps;
  const int gw = blockIdx.x * kRecvWarps + rwarp;
  // Items (source, chunk) in chunk-major order: chunk c of every source is sent at about the same time,
  // so receivers follow the senders' progress instead of waiting on one late source.
  int max_nchunks = 0;
  for (int s = 0; s < W; ++s) max_nchunks = max(max_nchunks, (info[lay.src_T + s] + p.chunk_tokens - 1) / p.chunk_tokens);
  const int total_items = max_nchunks * W;
  const u8* my_sig = reinterpret_cast<const u8*>(p.sig_peers[p.rank]);
  const u8* my_data = reinterpret_cast<const u8*>(p.data_peers[p.rank]);
  const u8* my_meta = reinterpret_cast<const u8*>(p.meta_peers[p.rank]);
  for (int item = gw; item < total_items; item += RW) {
    const int c = item / W, s = item % W;
    if (c * p.chunk_tokens >= info[lay.src_T + s]) continue;   // source s has fewer chunks
    const u64 cell = static_cast<u64>(s) * p.max_chunks + c;
    int ok = 1, start = 0, end = 0;
    if (lane == 0) {
      ok = wait_geq(reinterpret_cast<const u64*>(my_sig + p.dflag_offset) + cell, p.epoch, p.err, p.timeout_ns,
                    kPhaseHtDispatchRecv, p.rank, s);
      const int* range = reinterpret_cast<const int*>(my_sig + p.drange_offset) + 2 * cell;
      start = ld_cg_i32(range);
      end = ld_cg_i32(range + 1);
    }
    ok = __shfl_sync(0xFFFFFFFFu, ok, 0);
    if (!ok) return;
    start = __shfl_sync(0xFFFFFFFFu, start, 0);
    end = __shfl_sync(0xFFFFFFFFu, end, 0);
    for (int pos = start; pos < end; ++pos) {
      const u64 slot = static_cast<u64>(s) * p.max_tokens + pos;
      const MetaView meta{const_cast<u8*>(my_meta + slot * p.meta_stride), K};
      const i64 i = info[lay.recv_prefix + s] + pos;
      int lexp = -1, row = -1;
      float w = 0.f;
      if (lane < K) {
        lexp = ld_cg_i32(meta.lexp() + lane);
        if (lexp >= 0) {
          row = info[lay.src_base + s * L + (lexp & ~kDupBit)] + ld_cg_i32(meta.idx() + lane);
          w = ld_cg_f32(meta.w() + lane);
        }
        p.recv_rows[i * K + lane] = row;
        p.recv_w[i * K + lane] = w;
      }

      const u32 copy_mask = __ballot_sync(0xFFFFFFFFu, lane < K && lexp >= 0 && !(lexp & kDupBit));
      // Lane j (j < n) fetches the j-th destination, so one read of the row feeds every store.
      const int n = __popc(copy_mask);
      const u64 dst_of_lane = reinterpret_cast<u64>(p.out) + static_cast<u64>(row < 0 ? 0 : row) * p.row_bytes;
      const u64 my_dst = compact_by_mask(copy_mask, dst_of_lane, lane);
      if (n) warp_copy_multi<kExpandUnroll>(my_dst, n, my_data + slot * p.row_bytes, p.row_bytes, lane);
    }
  }
  // Alignment / capacity padding rows are zero.
  for (int e = gw; e < L; e += RW) {
    const i64 first = static_cast<i64>(info[lay.base + e]) + info[lay.counts + e];
    const i64 last = info[lay.base + e + 1];
    for (i64 r = first; r < last; ++r) warp_zero(p.out + r * p.row_bytes, p.row_bytes, lane);
  }
}

}  // namespace ep

extern "C" __global__ void __launch_bounds__(ep::kDispatchWarps * 32, 1) ht_dispatch(const ep::HtDispatchParams p) {
  using namespace ep;
  extern __shared__ __align__(128) u8 smem[];
  __shared__ u64 bars[kSendWarps];
  __shared__ __align__(16) u8 meta_stage[kSendWarps][kMetaBytesMax];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (warp < kSendWarps) {
    ht_send(p, smem, &bars[warp], meta_stage[warp], warp, lane);
  } else {
    ht_receive(p, warp - kSendWarps, lane);
  }
}
