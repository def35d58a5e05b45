// Benchmark ceiling: an SM-driven all-to-all copy. Block b of the grid copies its share of the bytes
// bound for each peer with 16-byte loads (L2-only) and stores straight into the peer's buffer.
// No flags: the host brackets the kernel with ep_barrier. Used only by ep.bench.
#include "common/copy.cuh"
#include "common/params.cuh"

namespace ep {
struct BenchCopyParams {
  const u8* src;           // [W][bytes_per_peer] local source, one region per destination
  const u64* dst_peers;    // [W] base of every rank's receive buffer: [W][bytes_per_peer]
  u64 bytes_per_peer;      // multiple of 16
  i32 rank;
  i32 world;
  i32 include_self;        // also copy the region bound for this rank (locally)
  i32 reserved;
};
}  // namespace ep

extern "C" __global__ void __launch_bounds__(1024) bench_a2a_copy(const ep::BenchCopyParams p) {
  using namespace ep;
  const int lane = threadIdx.x % kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  const u64 gw = static_cast<u64>(blockIdx.x) * nwarps + threadIdx.x / kWarpSize;
  const u64 RW = static_cast<u64>(gridDim.x) * nwarps;
  constexpr u64 kPiece = 8192;   // bytes one warp moves per step (16 B x 32 lanes x kCopyUnroll... x4)
  const u64 pieces = (p.bytes_per_peer + kPiece - 1) / kPiece;
  // Interleave destinations so every link is busy at once: item i -> (peer (rank+1+i%W)%W, piece i/W).
  for (u64 item = gw; item < pieces * p.world; item += RW) {
    const int d = (p.rank + 1 + static_cast<int>(item % p.world)) % p.world;
    if (d == p.rank && !p.include_self) continue;
    const u64 off = (item / p.world) * kPiece;
    const int bytes = static_cast<int>(min(kPiece, p.bytes_per_peer - off));
    warp_copy(reinterpret_cast<u8*>(p.dst_peers[d]) + static_cast<u64>(p.rank) * p.bytes_per_peer + off,
              p.src + static_cast<u64>(d) * p.bytes_per_peer + off, bytes, lane);
  }
}
