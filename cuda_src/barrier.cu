// Cross-rank barrier over the signal buffers.
//
// Protocol: each rank p owns u64 flags[W] at `flags_offset` of its signal buffer; slot q is written only
// by rank q. The generation comes from the device: value = *generation + 1 (every rank runs the same
// sequence of barriers, so the counters agree, and a CUDA graph replay advances them like an eager call).
// Lane q of rank r release-stores (system scope) flags[r] = value into rank q's buffer, then acquire-waits
// until its own flags[q] >= value; lane 0 then stores the new generation. Generations only grow, so no
// reset is needed. Everything this rank wrote before the barrier (earlier kernels on the stream included)
// is visible to every peer after it. On time-out the error record names {barrier, rank, peer, observed}.
#include "common/params.cuh"

extern "C" __global__ void __launch_bounds__(32) ep_barrier(const ep::BarrierParams p) {
  using namespace ep;
  const int lane = threadIdx.x;
  const u64 value = *reinterpret_cast<volatile const u64*>(p.generation) + 1;
  if (lane < p.world) {
    u64* remote = reinterpret_cast<u64*>(p.sig_peers[lane] + p.flags_offset) + p.rank;
    fence_sys();
    st_release_sys(remote, value);
  }
  __syncwarp();
  if (lane < p.world) {
    const u64* mine = reinterpret_cast<const u64*>(p.sig_peers[p.rank] + p.flags_offset) + lane;
    wait_geq<kSpinSleepMaxNs>(mine, value, p.err, p.timeout_ns, kPhaseBarrier, p.rank, lane);
  }
  __syncwarp();
  if (lane == 0) *p.generation = value;   // every lane read the old value above
}
