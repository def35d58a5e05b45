// What the LL kernels share: the params, device sequence numbers (graph-replay safe), buffer addressing,
// the arrival signals and the copies in column chunks.
//
// Sequence numbers live in device memory so that a captured CUDA graph, whose kernel arguments are frozen,
// still advances them on every replay: one per half of each op (dispatch send / receive, combine send /
// receive), because with receive hooks a second send may run before the first receive. Every block of a
// half reads seq = state[i] + 1 at its start; the last block to finish it (counter state[4 + i]) stores seq
// back. Halves run in the same order on every rank, so the i-th receive pairs with the i-th send. Parity
// par = seq & 1 selects the half of every double-buffered region.
//
// Work is split in column chunks of kChunkChannels channels (2 KB of bf16): an item is (token, rank,
// chunk), so a few tokens still spread over many warps and SMs.
#pragma once
#include "common/copy.cuh"
#include "common/params.cuh"

namespace ep {

constexpr int kDispatchSend = 0, kDispatchRecv = 1, kCombineSend = 2, kCombineRecv = 3;
constexpr int kChunkChannels = kLLChunkChannels;   // channels per work item (2 KB of bf16, 1 KB of e4m3)
constexpr int kFp8Group = 128;             // channels per FP8 scale
constexpr int kMaxLLGroupsPerChunk = kChunkChannels / kFp8Group;

__device__ __forceinline__ u32 ll_read_seq(const LLParams& p, int which) {
  return *reinterpret_cast<volatile u32*>(p.state + which) + 1u;
}

// The last block to finish a half publishes its sequence number. Returns true in thread 0 of that block.
__device__ __forceinline__ bool ll_finish_block(const LLParams& p, int which, u32 seq) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const u32 done = atomicAdd(p.state + 4 + which, 1u);
    if (done == gridDim.x - 1) {
      p.state[4 + which] = 0u;
      *reinterpret_cast<volatile u32*>(p.state + which) = seq;
      __threadfence();
      return true;
    }
  }
  return false;
}

__device__ __forceinline__ LLCountSlot* ll_count_slot(const LLParams& p, int rank, int par, int src) {
  return reinterpret_cast<LLCountSlot*>(p.sig_peers[rank] + p.cnt_offset +
                                        static_cast<u64>(par * p.world + src) * p.cnt_stride);
}
__device__ __forceinline__ i32* ll_slot_counts(LLCountSlot* slot) { return reinterpret_cast<i32*>(slot + 1); }

__device__ __forceinline__ u8* ll_meta(const LLParams& p, int rank, int par, int src, int t) {
  return reinterpret_cast<u8*>(p.meta_peers[rank]) +
         (static_cast<u64>(par * p.world + src) * p.max_tokens + t) * p.meta_stride;
}

// Warp-collective read of a MetaRec: false when it is not of dispatch `seq` (the token was not sent here);
// else lane k < K holds slot k's row here (-1: another rank's expert or unused) and whether it is the first
// slot naming that row (a repeated expert names one row).
__device__ __forceinline__ bool rec_rows(u8* rec, u32 seq, int K, int lane, int* row, bool* first) {
  const u32 tag = lane == 0 ? ld_cg_u32(&reinterpret_cast<MetaRec*>(rec)->seq) : 0u;
  if (__shfl_sync(0xFFFFFFFFu, tag, 0) != seq) return false;
  const int r = lane < K ? ld_cg_i32(meta_rows(rec) + lane) : -1;
  bool f = r >= 0;
  for (int j = 0; j < K; ++j) {
    const int other = __shfl_sync(0xFFFFFFFFu, r, j);
    f &= !(j < lane && other == r);
  }
  *row = r;
  *first = f;
  return true;
}

// The dispatch output and scales are double-buffered: two micro-batches may be in flight (receive hooks),
// and a dispatch's rows stay valid while it is one of the last two. The half is the host's (out_par, the
// same on every rank: every rank makes the same calls), not the device sequence's parity, so the outputs a
// captured graph returned always view the half its replays write.
__device__ __forceinline__ u8* ll_out(const LLParams& p, int rank) {
  return reinterpret_cast<u8*>(p.out_peers[rank]) + static_cast<u64>(p.out_par) * p.local_experts * p.capacity * 2 * p.hidden;
}
__device__ __forceinline__ u8* ll_scales(const LLParams& p, int rank) {
  return reinterpret_cast<u8*>(p.scale_peers[rank]) +
         static_cast<u64>(p.out_par) * p.local_experts * (p.hidden / 128) * p.capacity * 4;
}

__device__ __forceinline__ u64* ll_arrivals(const LLParams& p, int rank, u64 offset, int src) {
  return reinterpret_cast<u64*>(p.sig_peers[rank] + offset) + src;
}

// A valid expert id of slot (t, k), or -1 (unused; an invalid id is recorded once and treated as unused).
__device__ __forceinline__ int ll_expert(const LLParams& p, int t, int k, bool report) {
  const i64 i = static_cast<i64>(t) * p.topk + k;
  i64 id = p.ids_64 ? static_cast<const long long*>(p.topk_ids)[i] : static_cast<const int*>(p.topk_ids)[i];
  if (id < -1 || id >= p.num_experts) {
    if (report) record_first(p.input_err, kPhaseBadExpertId, p.rank, static_cast<int>(i), static_cast<u64>(id),
                             static_cast<u64>(p.num_experts));
    return -1;
  }
  return static_cast<int>(id);
}

// The end of a send half: each block fences its writes (system scope: peers read them over NVLink) and counts
// itself done; the last block publishes the half's seq and release-adds 1 to the arrivals of this rank in
// every destination. So a receiver waits for one arrival per source and op, whatever the sender's grid.
// ll_last_block is that count alone (done: the blocks-done word; seq_word: where the last one stores seq, or null).
__device__ __forceinline__ bool ll_last_block(u32* done, u32* seq_word, u32 seq) {
  __shared__ int s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_sys();
    s_last = atomicAdd(done, 1u) == gridDim.x - 1;
    if (s_last) {
      *done = 0u;
      if (seq_word) *reinterpret_cast<volatile u32*>(seq_word) = seq;
      fence_sys();
    }
  }
  __syncthreads();
  return s_last != 0;
}

__device__ __forceinline__ void ll_finish_send(const LLParams& p, int which, u32 seq, u64 offset) {
  if (ll_last_block(p.state + 4 + which, p.state + which, seq) && threadIdx.x < p.world)
    red_add_release_sys(ll_arrivals(p, threadIdx.x, offset, p.rank), 1ull);
}

// Every source's arrival of this op (lane s of warp 0 waits for source s); false on time-out.
__device__ __forceinline__ bool ll_wait_arrivals(const LLParams& p, u64 offset, u32 seq, int phase, int* s_ok) {
  if (threadIdx.x == 0) *s_ok = 1;
  __syncthreads();
  if (threadIdx.x < p.world &&
      !wait_geq<kSpinSleepMaxNs>(ll_arrivals(p, p.rank, offset, threadIdx.x), static_cast<u64>(seq), p.err,
                                 p.timeout_ns, phase, p.rank, threadIdx.x))
    *s_ok = 0;
  __syncthreads();
  return *s_ok != 0;
}

// Bytes [c * chunk, ...) of a row of `row_bytes`: the chunk's offset and length.
__device__ __forceinline__ int chunk_bytes(int c, int chunk, int row_bytes) { return min(chunk, row_bytes - c * chunk); }

// Copy `bytes` (multiple of 16) from src to each of the n destinations lanes 0..n-1 hold (16-byte vectors,
// every load before the stores).
__device__ __forceinline__ void warp_copy_chunk(u64 my_dst, int n, const u8* src, int bytes, int lane) {
  warp_copy_multi<4>(my_dst, n, src, bytes, lane);
}

}  // namespace ep
