// Benchmark ceiling: SM-driven all-to-all copies that move each rank's real per-peer byte volume.
// Used only by ep.bench (ep/bench/ceiling.py), never by the library.
//
// Buffers: the source is local, [W][slot] bytes, region d bound for rank d. The destination of region d
// is rank d's receive buffer (IPC-mapped, [W][slot]) at region `rank`: the host puts both addresses in
// the params (src[d], dst[d]) and the byte count of each destination in bytes[d] (0 = nothing to send,
// which is how the self region is skipped). No flags and no waits: the host brackets the launch with a
// device barrier (ep_barrier) and CUDA events; the kernel boundary makes the remote stores visible.
//
// Work items are (destination, chunk) pairs numbered so that consecutive items go to different
// destinations: the warps in flight at any moment keep every link busy.
//   bench_a2a_copy:     each warp copies one chunk per item with 16-byte loads (kBenchUnroll vectors in
//                       flight per lane) then 16-byte stores straight into the peer's memory.
//   bench_a2a_copy_tma: lane 0 of each warp runs a kBenchTmaStages-deep TMA pipeline: bulk load of a
//                       chunk into shared memory (completing on an mbarrier), bulk store to the peer.
#include "common/params.cuh"

namespace ep {

constexpr int kBenchUnroll = 8;                                   // 16 B x 8 x 32 lanes = 4 KB per warp item
constexpr u64 kBenchChunk = kVecBytes * kBenchUnroll * kWarpSize;  // bytes of one vector-copy item
constexpr int kBenchTmaStages = 3;                                // shared-memory stages per warp (TMA)
constexpr u32 kBenchTmaChunk = 16384;                             // bytes of one TMA item (one bulk copy)

struct BenchCopyParams {     // mirrored by ep/bench/copy_params.py BENCH_COPY_PARAMS
  u64 src[kMaxWorld];        // local source of the bytes bound for rank d
  u64 dst[kMaxWorld];        // where they land: rank d's receive buffer, region of this rank
  u64 bytes[kMaxWorld];      // bytes for rank d, multiple of 16 (0: nothing, e.g. this rank)
  u64 max_bytes;             // max over d of bytes[d]
  i32 rank;
  i32 world;
};

// Item i -> destination (rank + 1 + i % W) % W and chunk i / W of that destination.
__device__ __forceinline__ int bench_item_dest(const BenchCopyParams& p, u64 item) {
  return (p.rank + 1 + static_cast<int>(item % static_cast<u64>(p.world))) % p.world;
}

}  // namespace ep

extern "C" __global__ void __launch_bounds__(1024) bench_a2a_copy(const ep::BenchCopyParams p) {
  using namespace ep;
  const int lane = threadIdx.x % kWarpSize;
  const u64 nwarps = blockDim.x / kWarpSize;
  const u64 gw = static_cast<u64>(blockIdx.x) * nwarps + threadIdx.x / kWarpSize;
  const u64 RW = static_cast<u64>(gridDim.x) * nwarps;
  const u64 items = (p.max_bytes + kBenchChunk - 1) / kBenchChunk * static_cast<u64>(p.world);
  for (u64 item = gw; item < items; item += RW) {
    const int d = bench_item_dest(p, item);
    const u64 off = (item / static_cast<u64>(p.world)) * kBenchChunk;
    if (off >= p.bytes[d]) continue;
    const int nvec = static_cast<int>(min(kBenchChunk, p.bytes[d] - off) / kVecBytes);
    const uint4* s = reinterpret_cast<const uint4*>(p.src[d] + off);
    uint4* t = reinterpret_cast<uint4*>(p.dst[d] + off);
    uint4 v[kBenchUnroll];
#pragma unroll
    for (int u = 0; u < kBenchUnroll; ++u) {
      const int i = u * kWarpSize + lane;
      if (i < nvec) v[u] = ld_nc_v4(s + i);
    }
#pragma unroll
    for (int u = 0; u < kBenchUnroll; ++u) {
      const int i = u * kWarpSize + lane;
      if (i < nvec) st_v4(t + i, v[u]);
    }
  }
}

// Dynamic shared memory: (blockDim.x / 32) * kBenchTmaStages * kBenchTmaChunk bytes.
extern "C" __global__ void __launch_bounds__(1024) bench_a2a_copy_tma(const ep::BenchCopyParams p) {
  using namespace ep;
  extern __shared__ __align__(128) u8 smem[];
  __shared__ __align__(8) u64 bars[kWarpSize][kBenchTmaStages];   // <= 32 warps per block
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const u64 nwarps = blockDim.x / kWarpSize;
  const u64 gw = static_cast<u64>(blockIdx.x) * nwarps + warp;
  const u64 RW = static_cast<u64>(gridDim.x) * nwarps;
  if (lane != 0) return;   // one issuing thread per warp; no block-wide barrier follows
  u8* stage_mem = smem + static_cast<u64>(warp) * kBenchTmaStages * kBenchTmaChunk;
#pragma unroll
  for (int s = 0; s < kBenchTmaStages; ++s) mbar_init(&bars[warp][s], 1);
  fence_mbar_init();
  const u64 items = (p.max_bytes + kBenchTmaChunk - 1) / kBenchTmaChunk * static_cast<u64>(p.world);
  u32 n = 0;   // items this thread has issued: stage n % S, use n / S of that stage's mbarrier
  for (u64 item = gw; item < items; item += RW) {
    const int d = bench_item_dest(p, item);
    const u64 off = (item / static_cast<u64>(p.world)) * kBenchTmaChunk;
    if (off >= p.bytes[d]) continue;
    const u32 bytes = static_cast<u32>(min(static_cast<u64>(kBenchTmaChunk), p.bytes[d] - off));
    const int s = static_cast<int>(n % kBenchTmaStages);
    u8* buf = stage_mem + static_cast<u64>(s) * kBenchTmaChunk;
    // The store issued S items ago read this stage; at most S-1 newer bulk groups may still be reading.
    if (n >= static_cast<u32>(kBenchTmaStages)) tma_wait_read<kBenchTmaStages - 1>();
    mbar_arrive_expect_tx(&bars[warp][s], bytes);
    tma_load(buf, reinterpret_cast<const void*>(p.src[d] + off), bytes, &bars[warp][s]);
    const u32 parity = (n / kBenchTmaStages) & 1u;
    while (!mbar_try_wait(&bars[warp][s], parity)) {
    }
    tma_store(reinterpret_cast<void*>(p.dst[d] + off), buf, bytes);
    tma_commit();
    ++n;
  }
  tma_wait_all();   // every store performed before the kernel (and its completion event) ends
}
