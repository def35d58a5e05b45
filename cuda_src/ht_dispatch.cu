// HT dispatch data phase: one kernel whose blocks have one role each.
//
// Buffers (symmetric, one allocation each per rank):
//   data[s][pos]  row_bytes  token `pos` that source s sent here (pos = its index among s's tokens for us);
//                            the self region is never written: our own tokens are read from x. With owned
//                            outputs (config owned_output) the rows go straight into out_peers[d] instead,
//                            at the token's first expert row there (exchange's peer_row), and the receiver
//                            copies that row to the token's other experts: one local row copy less per
//                            (token, rank).
//   meta[s][pos]  meta_stride {token, lexp[K] (local expert | kDupBit, or -1), idx[K], w[K]} (remote s only;
//                 token is not read, it keeps the record fully defined)
//   sig.dflag[s][c] u64, sig.drange[s][c] int2: remote source s finished chunk c; its slots are [x, y)
// Sender blocks [0, S): a warp takes a chunk of kHtChunkTokens tokens at a time and, per token, sends the
// metadata record and the row (read once) to every other destination rank, through the copy policy the
// config chose (WarpRowSend: 16-byte warp stores; TmaRowSend: a bulk load into the warp's staging row, one
// bulk store per destination). Then its lanes publish the chunk's slot range on each rank and
// release-store (system scope) dflag = epoch. No block-wide barrier: a warp never waits for another. Whole
// SMs send, so their memory pipelines carry only those stores.
// Expansion: items handed out in order by a per-rank counter, one warp each, to the receiver blocks
// [S, G) from the start and to the sender warps once they have sent everything (the local expansion moves
// more bytes than the senders and is bound by the SMs' store throughput, so every SM that is free helps).
// Items: our own chunks first (records from the routing, rows from x: no wait), then (chunk, remote source)
// chunk-major, each after a bounded wait for its flag. Every token of an item becomes one output row per
// local expert it names, row = src_base[s][e] + idx (exchanged counts, so the order is fixed by routing,
// not by which warp expands), by 16-byte warp copies. The item also records recv_rows/recv_w for combine.
// Receiver warps first zero the alignment padding rows; the call's counts_out / expert_offsets (fresh
// arrays every call) come from the last block.
// The grid must be co-resident (G <= SMs): receivers wait for senders of other blocks and other ranks.
#include "common/params.cuh"
#include "common/reduce.cuh"

namespace ep {

// 16-byte vectors in flight per lane when a warp copies a row: the register budget is 64 per thread at 32
// warps per block.
constexpr int kCopyVecs = kDispatchWarps > 16 ? 8 : 16;

// How a sender warp moves one row to its n destinations (lane j < n holds the j-th one's address).
// begin(): before the token's metadata is sent; send(): the row itself; chunk_done(): before the chunk's
// flags are released; finish(): before the warp moves on to expanding.
struct WarpRowSend {
  __device__ __forceinline__ void init(u8*, u64*, int) {}
  __device__ __forceinline__ void begin(const u8*, int, int, int) {}
  __device__ __forceinline__ void send(u64 my_dst, int n, const u8* src, int bytes, int lane) {
    warp_copy_multi<kCopyVecs>(my_dst, n, src, bytes, lane);
  }
  __device__ __forceinline__ void chunk_done(int) {}
  __device__ __forceinline__ void finish(int) {}
};

struct TmaRowSend {
  u8* stage;   // the warp's staging row in shared memory
  u64* bar;    // its mbarrier
  u32 phase;   // the mbarrier's parity, flipped per load
  __device__ __forceinline__ void init(u8* stage_row, u64* mbar, int lane) {
    stage = stage_row;
    bar = mbar;
    phase = 0;
    if (lane == 0) {
      mbar_init(bar, 1);
      fence_mbar_init();
    }
    __syncwarp();
  }
  __device__ __forceinline__ void begin(const u8* src, int n, int bytes, int lane) {
    if (lane == 0 && n) staged_row_load(stage, src, bytes, bar);
  }
  __device__ __forceinline__ void send(u64 my_dst, int n, const u8*, int bytes, int lane) {
    if (lane == 0 && n) staged_row_wait(bar, phase);
    staged_row_store(my_dst, n, stage, bytes, lane);
  }
  __device__ __forceinline__ void chunk_done(int lane) {
    if (lane == 0) {
      tma_wait_all();
      fence_proxy_async_global();
    }
  }
  __device__ __forceinline__ void finish(int lane) {
    if (lane == 0) tma_wait_all();
  }
};

using RowSend = Select<kDispatchTma, TmaRowSend, WarpRowSend>::type;

// What a sender needs of one token, loaded one token ahead so the loads overlap the previous row's copy.
struct SendToken {
  int pos;     // lane d < W: slot of the token in rank d's region for us, or -1
  int code;    // lane k < K: global expert | kDupBit, or -1
  int sidx;    // lane k < K: index among this rank's tokens of that expert
  int orow;    // lane k < K, owned outputs only: the slot's row in its expert owner's output (-1: repeated / unused)
  float w;     // lane k < K
};

__device__ __forceinline__ SendToken load_send_token(const HtDispatchParams& p, int t, int lane) {
  SendToken v{-1, -1, -1, -1, 1.f};
  if (lane < p.world) v.pos = p.send_pos[static_cast<i64>(t) * p.world + lane];
  if (lane < p.topk) {
    v.code = p.route[static_cast<i64>(t) * p.topk + lane];
    v.sidx = p.slot_idx[static_cast<i64>(t) * p.topk + lane];
    if (p.weights) v.w = p.weights[static_cast<i64>(t) * p.topk + lane];
    if (p.out_peers && v.code >= 0 && !(v.code & kDupBit))
      v.orow = p.info[InfoLayout(p.local_experts, p.world).peer_row + v.code] + v.sidx;
  }
  return v;
}

// Slot code as rank d sees it: its local expert | kDupBit when rank d owns global expert `code`, else -1.
__device__ __forceinline__ int local_code(int code, int L, int d) {
  return code >= 0 && (code & ~kDupBit) / L == d ? ((code & ~kDupBit) % L) | (code & kDupBit) : -1;
}

// Where a token's row goes on rank d (lane d holds it): its slot in our region of d's data buffer, or, with
// owned outputs, the row of its first (lowest slot) expert of d in d's output, where the receivers copy it
// to the token's other experts of d from.
__device__ __forceinline__ u64 send_dst(const HtDispatchParams& p, const SendToken& tok, int orow_d, int lane) {
  if (tok.pos < 0) return 0;
  if (p.out_peers) return p.out_peers[lane] + static_cast<u64>(orow_d) * p.row_bytes;
  return p.data_peers[lane] + (static_cast<u64>(p.rank) * p.max_tokens + tok.pos) * p.slot_bytes;
}

// Scales that travel with a row (FP8 and other block-scaled payloads): a row's scales are read where they lie
// (any strides) and written after the payload of its data slot, then from there (or, for our own tokens,
// straight from the caller's array) to the output's scales in its layout. Lane j moves scales j, j + 32, ...
__device__ __forceinline__ void copy_scales(const HtDispatchParams& p, const u8* src, u64 src_stride, u8* dst,
                                            u64 dst_stride, int lane) {
  for (int j = lane; j < p.scale_count; j += kWarpSize) {
    if (p.scale_elem == 4)
      *reinterpret_cast<u32*>(dst + j * dst_stride) = *reinterpret_cast<const volatile u32*>(src + j * src_stride);
    else
      dst[j * dst_stride] = *reinterpret_cast<const volatile u8*>(src + j * src_stride);
  }
}

__device__ __forceinline__ u8* out_scale_row(const HtDispatchParams& p, int row) {
  return p.out_scales + static_cast<u64>(row / p.out_scale_block) * p.out_scale_block_stride +
         static_cast<u64>(row % p.out_scale_block) * p.out_scale_row_stride;
}

// Sender block b owns chunks b, b + S, b + 2S, ... and its warps take the next one from a shared counter
// (`next`): consecutive chunks go out in parallel, so chunk c lands at about the same time on every rank and
// the chunk-major receivers follow. After each chunk lane d publishes the slot range sent to rank d (no
// block-wide barrier: warps never wait for each other).
template <class Send>
__device__ __forceinline__ void ht_send(const HtDispatchParams& p, u64 epoch, Send& copy, u8* meta_stage, int* next,
                                        int lane) {
  const int W = p.world, K = p.topk, L = p.local_experts;
  const int nchunks = (p.num_tokens + p.chunk_tokens - 1) / p.chunk_tokens;
  const u32 remote = ~(1u << p.rank);
  const MetaView staged{meta_stage, K};
  for (;;) {
    int k = 0;
    if (lane == 0) k = atomicAdd(next, 1);
    const int c = blockIdx.x + __shfl_sync(0xFFFFFFFFu, k, 0) * p.send_blocks;
    if (c >= nchunks) break;
    const int t_begin = c * p.chunk_tokens;
    const int t_end = min(p.num_tokens, t_begin + p.chunk_tokens);
    int lo = kI32Max, hi = 0;   // lane d: slots [lo, hi) of rank d's region written in this chunk
    SendToken cur = load_send_token(p, t_begin, lane);
    for (int t = t_begin; t < t_end; ++t) {
      const SendToken tok = cur;
      if (t + 1 < t_end) cur = load_send_token(p, t + 1, lane);
      if (tok.pos >= 0) {
        lo = min(lo, tok.pos);
        hi = tok.pos + 1;
      }
      const u32 rmask = __ballot_sync(0xFFFFFFFFu, tok.pos >= 0) & remote;
      const u8* src = p.x + static_cast<i64>(t) * p.row_bytes;
      copy.begin(src, rmask, p.row_bytes, lane);
      __syncwarp();                         // the previous token's records have been sent
      if (lane == 0) {
        *staged.token() = t;
        staged.token()[1] = 0;
      }
      if (lane < K) {
        staged.idx()[lane] = tok.sidx;
        staged.w()[lane] = tok.w;
      }
      int orow_d = -1;   // lane d: the token's row in rank d's owned output
      for (u32 m = rmask; m; m &= m - 1) {
        const int d = __ffs(m) - 1;
        const int pos = __shfl_sync(0xFFFFFFFFu, tok.pos, d);
        const u64 slot = static_cast<u64>(p.rank) * p.max_tokens + pos;
        const int lexp = local_code(tok.code, L, d);
        if (lane < K) staged.lexp()[lane] = lexp;
        if (p.out_peers) {
          const u32 first = __ballot_sync(0xFFFFFFFFu, tok.orow >= 0 && lexp >= 0);   // never 0: d is named
          const int row = __shfl_sync(0xFFFFFFFFu, tok.orow, __ffs(first) - 1);
          if (lane == d) orow_d = row;
        }
        __syncwarp();
        if (lane < p.meta_stride / kVecBytes)
          st_v4(reinterpret_cast<uint4*>(p.meta_peers[d] + slot * p.meta_stride) + lane,
                reinterpret_cast<const uint4*>(meta_stage)[lane]);
        __syncwarp();   // the record is sent before the next destination rewrites lexp
      }
      // One read of the row feeds every remote destination: lane j (j < n) holds the j-th one's address.
      const u64 my_dst = compact_by_mask(rmask, send_dst(p, tok, orow_d, lane), lane);
      copy.send(my_dst, __popc(rmask), src, p.row_bytes, lane);
      if (p.scale_count) {
        const u8* sc = p.scales + static_cast<u64>(t) * p.scale_stride_t;
        for (int j = 0; j < __popc(rmask); ++j) {
          u8* slot = reinterpret_cast<u8*>(__shfl_sync(0xFFFFFFFFu, my_dst, j));
          copy_scales(p, sc, p.scale_stride_c, slot + p.scale_slot_off, p.scale_elem, lane);
        }
      }
    }
    copy.chunk_done(lane);
    __syncwarp();
    if (lane < W && lane != p.rank) {   // our own tokens are expanded straight from the routing
      if (hi == 0) lo = 0;
      const u64 cell = static_cast<u64>(p.rank) * p.max_chunks + c;
      reinterpret_cast<int2*>(p.sig_peers[lane] + p.drange_offset)[cell] = make_int2(lo, hi);
      fence_sys();
      st_release_sys(reinterpret_cast<u64*>(p.sig_peers[lane] + p.dflag_offset) + cell, epoch);
    }
  }
  copy.finish(lane);
}

// What a receiver needs of one received token, loaded one token ahead.
struct RecvToken {
  int lexp;    // lane k < K: local expert | kDupBit, or -1
  int idx;     // lane k < K
  float w;     // lane k < K
};

__device__ __forceinline__ RecvToken load_recv_token(const HtDispatchParams& p, const u8* meta_rec, int lane) {
  const MetaView meta{const_cast<u8*>(meta_rec), p.topk};
  RecvToken v{-1, 0, 0.f};
  if (lane < p.topk) {
    v.lexp = ld_cg_i32(meta.lexp() + lane);
    v.idx = ld_cg_i32(meta.idx() + lane);
    v.w = ld_cg_f32(meta.w() + lane);
  }
  return v;
}

// Expand received token i (of source s; row `src`) into one output row per local expert it names, and
// record its rows and weights for combine. in_place (owned outputs, remote tokens): the sender wrote the row
// into the token's first expert row already; it is the source of the copies to the others, `src` unused.
// The row's scales come from `sc` (stride sc_stride between scales) when the payload has any.
// TOKEN_MAJOR: the token is one row, the item's own (row i), and the receive lists hold its local experts.
__device__ __forceinline__ void expand_token(const HtDispatchParams& p, int s, i64 i, const RecvToken& tok,
                                             const u8* src, bool in_place, const u8* sc, u64 sc_stride, int lane) {
  const int K = p.topk;
  const InfoLayout lay(p.local_experts, p.world);
  int row = -1;
  if (p.token_major) {
    if (lane < K) {
      p.recv_rows[i * K + lane] = tok.lexp >= 0 ? (tok.lexp & ~kDupBit) : -1;
      p.recv_w[i * K + lane] = tok.lexp >= 0 ? tok.w : 0.f;
    }
    warp_copy_multi<kCopyVecs>(reinterpret_cast<u64>(p.out) + static_cast<u64>(i) * p.row_bytes, 1, src, p.row_bytes,
                               lane);
    if (p.scale_count) copy_scales(p, sc, sc_stride, out_scale_row(p, static_cast<int>(i)), p.out_scale_col_stride, lane);
    return;
  }
  if (lane < K) {
    if (tok.lexp >= 0) row = p.info[lay.src_base + s * p.local_experts + (tok.lexp & ~kDupBit)] + tok.idx;
    p.recv_rows[i * K + lane] = row;
    p.recv_w[i * K + lane] = tok.lexp >= 0 ? tok.w : 0.f;
  }
  u32 copy_mask = __ballot_sync(0xFFFFFFFFu, lane < K && tok.lexp >= 0 && !(tok.lexp & kDupBit));
  if (p.scale_count) {   // every expert row of the token gets its scales
    for (u32 m = copy_mask; m; m &= m - 1) {
      const int r = __shfl_sync(0xFFFFFFFFu, row, __ffs(m) - 1);
      copy_scales(p, sc, sc_stride, out_scale_row(p, r), p.out_scale_col_stride, lane);
    }
  }
  if (in_place && copy_mask) {
    src = p.out + static_cast<u64>(__shfl_sync(0xFFFFFFFFu, row, __ffs(copy_mask) - 1)) * p.row_bytes;
    copy_mask &= copy_mask - 1;
  }
  // Lane j (j < n) fetches the j-th destination, so one read of the row feeds every store.
  const int n = __popc(copy_mask);
  const u64 dst_of_lane = reinterpret_cast<u64>(p.out) + static_cast<u64>(row < 0 ? 0 : row) * p.row_bytes;
  const u64 my_dst = compact_by_mask(copy_mask, dst_of_lane, lane);
  if (n) warp_copy_multi<kCopyVecs>(my_dst, n, src, p.row_bytes, lane);
}

// Our own chunk c needs no sender and no wait: its records come straight from the routing and its rows
// from x. These items go first, so expanding warps have work while the first remote chunks are in flight.
__device__ __forceinline__ void expand_own_chunk(const HtDispatchParams& p, int c, int lane) {
  const InfoLayout lay(p.local_experts, p.world);
  const int t_begin = c * p.chunk_tokens;
  const int t_end = min(p.num_tokens, t_begin + p.chunk_tokens);
  SendToken cur = load_send_token(p, t_begin, lane);
  for (int t = t_begin; t < t_end; ++t) {
    const SendToken tok = cur;
    if (t + 1 < t_end) cur = load_send_token(p, t + 1, lane);
    const int pos = __shfl_sync(0xFFFFFFFFu, tok.pos, p.rank);
    if (pos < 0) continue;
    const RecvToken rt{local_code(tok.code, p.local_experts, p.rank), tok.sidx, tok.w};
    expand_token(p, p.rank, static_cast<i64>(p.info[lay.recv_prefix + p.rank]) + pos, rt,
                 p.x + static_cast<i64>(t) * p.row_bytes, false, p.scales + static_cast<u64>(t) * p.scale_stride_t,
                 p.scale_stride_c, lane);
  }
}

// Receive items come from one counter per rank, item_ctr[0], by atomicAdd (not a CAS loop that tags the
// count with the epoch: hundreds of warps would retry on one address).
// item_ctr[1] counts the warps that are done; the last one out resets both and advances item_ctr[2], the
// number of dispatches this rank has run: the next dispatch, ordered after this kernel on the stream, starts
// from zero with epoch item_ctr[2] + 1. Every rank runs the same sequence of dispatches, so the epochs agree
// across ranks, and a CUDA graph replay advances them like an eager call. A dispatch that is never launched
// never touches them.
__device__ __forceinline__ int next_item(u64* ctr) {
  return static_cast<int>(atomicAdd(reinterpret_cast<unsigned long long*>(ctr), 1ull));
}
__device__ __forceinline__ u64 dispatch_epoch(const u64* ctr) {
  return *reinterpret_cast<volatile const u64*>(ctr + 2) + 1;
}
__device__ __forceinline__ void dispatch_done(u64* ctr, u32 participants) {
  __threadfence();   // this warp's last item grab (and its read of the epoch) is counted before its exit is
  if (atomicAdd(reinterpret_cast<unsigned long long*>(ctr + 1), 1ull) == participants - 1) {
    atomicExch(reinterpret_cast<unsigned long long*>(ctr), 0ull);
    atomicExch(reinterpret_cast<unsigned long long*>(ctr + 1), 0ull);
    atomicAdd(reinterpret_cast<unsigned long long*>(ctr + 2), 1ull);
  }
}

// Alignment / capacity padding rows are zero, with their scales (receiver warps gw of RW, before they expand).
// TOKEN_MAJOR rows are received items, never padding; a worst-case output's rows past them (pad_rows) get
// recv_rows -1 and recv_w 0 (their tokens and scales stay unspecified, as DeepEP's).
__device__ __forceinline__ void zero_padding(const HtDispatchParams& p, int gw, int RW, int lane) {
  const InfoLayout lay(p.local_experts, p.world);
  if (p.token_major) {
    const i64 from = static_cast<i64>(p.info[lay.n_recv_total]) * p.topk, to = static_cast<i64>(p.pad_rows) * p.topk;
    for (i64 i = from + static_cast<i64>(gw) * kWarpSize + lane; i < to; i += static_cast<i64>(RW) * kWarpSize) {
      p.recv_rows[i] = -1;
      p.recv_w[i] = 0.f;
    }
    return;
  }
  for (int e = gw; e < p.local_experts; e += RW) {
    const i64 first = static_cast<i64>(p.info[lay.base + e]) + p.info[lay.counts + e];
    const i64 last = p.info[lay.base + e + 1];
    for (i64 r = first; r < last; ++r) {
      warp_zero(p.out + r * p.row_bytes, p.row_bytes, lane);
      if (p.scale_count) {
        u8* sc = out_scale_row(p, static_cast<int>(r));
        for (int j = lane; j < p.scale_count * p.scale_elem; j += kWarpSize)
          sc[(j / p.scale_elem) * p.out_scale_col_stride + j % p.scale_elem] = 0;
      }
    }
  }
}

__device__ __forceinline__ void ht_expand(const HtDispatchParams& p, u64 epoch, int lane) {
  const int W = p.world;
  const InfoLayout lay(p.local_experts, W);
  const int* info = p.info;
  // Items: our own chunks first, then (chunk, remote source) in chunk-major order: chunk c of every source
  // is sent at about the same time, so expanding warps follow the senders instead of one late source.
  const int own_items = (p.num_tokens + p.chunk_tokens - 1) / p.chunk_tokens;
  int max_nchunks = 0;
  for (int s = 0; s < W; ++s)
    if (s != p.rank) max_nchunks = max(max_nchunks, (info[lay.src_T + s] + p.chunk_tokens - 1) / p.chunk_tokens);
  const int total_items = own_items + max_nchunks * (W - 1);
  const u8* my_sig = reinterpret_cast<const u8*>(p.sig_peers[p.rank]);
  const u8* my_data = reinterpret_cast<const u8*>(p.data_peers[p.rank]);
  const u8* my_meta = reinterpret_cast<const u8*>(p.meta_peers[p.rank]);
  const bool in_place = p.out_peers != nullptr;
  for (;;) {
    int item = 0;
    if (lane == 0) item = next_item(p.item_ctr);
    item = __shfl_sync(0xFFFFFFFFu, item, 0);
    if (item >= total_items) break;
    if (item < own_items) {
      expand_own_chunk(p, item, lane);
      continue;
    }
    const int r = item - own_items;
    const int s = (p.rank + 1 + r % (W - 1)) % W, c = r / (W - 1);
    if (c * p.chunk_tokens >= info[lay.src_T + s]) continue;   // source s has fewer chunks
    const u64 cell = static_cast<u64>(s) * p.max_chunks + c;
    int ok = 1, start = 0, end = 0;
    if (lane == 0) {
      ok = wait_geq(reinterpret_cast<const u64*>(my_sig + p.dflag_offset) + cell, epoch, p.err, p.timeout_ns,
                    kPhaseHtDispatchRecv, p.rank, s);
      const int* range = reinterpret_cast<const int*>(my_sig + p.drange_offset) + 2 * cell;
      start = ld_cg_i32(range);
      end = ld_cg_i32(range + 1);
    }
    ok = __shfl_sync(0xFFFFFFFFu, ok, 0);
    if (!ok) break;
    start = __shfl_sync(0xFFFFFFFFu, start, 0);
    end = __shfl_sync(0xFFFFFFFFu, end, 0);
    const u64 slot0 = static_cast<u64>(s) * p.max_tokens;
    RecvToken cur{};
    if (start < end) cur = load_recv_token(p, my_meta + (slot0 + start) * p.meta_stride, lane);
    for (int pos = start; pos < end; ++pos) {
      const RecvToken tok = cur;
      if (pos + 1 < end) cur = load_recv_token(p, my_meta + (slot0 + pos + 1) * p.meta_stride, lane);
      const u8* slot = my_data + (slot0 + pos) * p.slot_bytes;
      expand_token(p, s, static_cast<i64>(info[lay.recv_prefix + s]) + pos, tok, in_place ? nullptr : slot, in_place,
                   slot + p.scale_slot_off, static_cast<u64>(p.scale_elem), lane);
    }
  }
}

// The call's counts_out / expert_offsets, from the routing's info (one warp).
__device__ __forceinline__ void write_counts(const HtDispatchParams& p, int lane) {
  const InfoLayout lay(p.local_experts, p.world);
  for (int e = lane; e <= p.local_experts; e += kWarpSize) {
    if (e < p.local_experts) p.counts_out[e] = p.info[lay.counts + e];
    p.expert_offsets[e] = p.info[lay.base + e];
  }
}

}  // namespace ep

extern "C" __global__ void __launch_bounds__(ep::kDispatchWarps * 32, 1) ht_dispatch(const ep::HtDispatchParams p) {
  using namespace ep;
  extern __shared__ __align__(128) u8 smem[];   // TMA senders: one staging row per sending warp
  __shared__ u64 bars[kDispatchWarps];
  __shared__ __align__(16) u8 meta_stage[kDispatchWarps][kMetaBytesMax];
  __shared__ int next_chunk;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const u64 epoch = dispatch_epoch(p.item_ctr);
  // A rank passed invalid expert ids: the exchange told every rank, and every rank's kernel moves nothing
  // (the host launches none after a wait on the exchange; a worst-case dispatch, which does not wait, is
  // reported by the host at a later call). Its outputs say so: every row unused (-1 / 0; TOKEN_MAJOR),
  // zero counts and offsets. The epoch still advances on every rank alike.
  if (p.info[InfoLayout(p.local_experts, p.world).invalid_mask]) {
    const int gw = blockIdx.x * kDispatchWarps + warp, nw = gridDim.x * kDispatchWarps;
    if (p.token_major) zero_padding(p, gw, nw, lane);   // the exchange received nothing: every row is padding
    if (p.counts_out && gw == 0)
      for (int e = lane; e <= p.local_experts; e += kWarpSize) {
        if (e < p.local_experts) p.counts_out[e] = 0;
        p.expert_offsets[e] = 0;
      }
    if (lane == 0) dispatch_done(p.item_ctr, gridDim.x * kDispatchWarps);
    return;
  }
  if (blockIdx.x < p.send_blocks) {
    if (threadIdx.x == 0) next_chunk = 0;
    __syncthreads();
    if (warp < p.send_warps) {   // the others expand from the start
      RowSend copy;
      copy.init(smem + static_cast<u64>(warp) * p.row_bytes, &bars[warp], lane);
      ht_send(p, epoch, copy, meta_stage[warp], &next_chunk, lane);
    }
  } else {
    if (p.counts_out && blockIdx.x == gridDim.x - 1 && warp == 0) write_counts(p, lane);
    const int RW = (gridDim.x - p.send_blocks) * kDispatchWarps;
    zero_padding(p, (blockIdx.x - p.send_blocks) * kDispatchWarps + warp, RW, lane);
  }
  ht_expand(p, epoch, lane);
  // Every warp passes here exactly once (a failed wait breaks out of its loop).
  if (lane == 0) dispatch_done(p.item_ctr, gridDim.x * kDispatchWarps);
}
