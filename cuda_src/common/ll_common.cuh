// Shared pieces of the LL kernels: device sequence numbers (graph-replay safe) and buffer addressing.
//
// A sequence number lives in device memory (state[0] dispatch, state[1] combine) so that a captured CUDA
// graph, whose kernel arguments are frozen, still advances it on every replay. Every block reads
// seq = state[i] + 1 at its start; the last block to finish (counter state[2 + i]) stores seq back.
#pragma once
#include "common/copy.cuh"
#include "common/params.cuh"

namespace ep {

__device__ __forceinline__ u32 ll_read_seq(const LLParams& p, int which) {
  return *reinterpret_cast<volatile u32*>(p.state + which) + 1u;
}

__device__ __forceinline__ void ll_finish_block(const LLParams& p, int which, u32 seq) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const u32 done = atomicAdd(p.state + 2 + which, 1u);
    if (done == gridDim.x - 1) {
      p.state[2 + which] = 0u;
      *reinterpret_cast<volatile u32*>(p.state + which) = seq;
      __threadfence();
    }
  }
}

__device__ __forceinline__ u64 ll_slot(const LLParams& p, int parity, int src, int t) {
  return (static_cast<u64>(parity) * p.world + src) * p.max_tokens + t;
}

__device__ __forceinline__ u64* ll_counter(const LLParams& p, int rank, u64 offset, int src) {
  return reinterpret_cast<u64*>(p.sig_peers[rank] + offset) + src;
}

__device__ __forceinline__ int* ll_ntok(const LLParams& p, int rank, int parity, int src) {
  return reinterpret_cast<int*>(p.sig_peers[rank] + p.ntok_offset) + parity * p.world + src;
}

// Every thread d < W of the block signals rank d, then waits for every rank's signal (seq * G arrivals).
__device__ __forceinline__ bool ll_exchange_arrivals(const LLParams& p, u64 offset, u32 seq, int phase, int* s_abort) {
  __syncthreads();
  if (threadIdx.x == 0) *s_abort = 0;
  if (threadIdx.x < p.world) {
    fence_sys();
    red_add_release_sys(ll_counter(p, threadIdx.x, offset, p.rank), 1ull);
  }
  __syncthreads();
  if (threadIdx.x < p.world) {
    const u64 target = static_cast<u64>(seq) * gridDim.x;
    if (!wait_geq(ll_counter(p, p.rank, offset, threadIdx.x), target, p.err, p.timeout_ns, phase, p.rank, threadIdx.x))
      *s_abort = 1;
  }
  __syncthreads();
  return *s_abort == 0;
}

}  // namespace ep
