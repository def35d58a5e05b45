// Bounded device waits and the host-visible error record.
//
// The error record lives in mapped pinned host memory. The first failing thread claims it (CAS on
// `claim`), fills the fields, then release-stores `flag = 1`; the host polls `flag` and then reads the
// fields. Every wait also gives up early once `flag` is set, so one time-out does not become W of them.
#pragma once
#include "common/config.cuh"
#include "common/ptx.cuh"

namespace ep {

struct ErrorRecord {      // mirrored by ep/structs.py ERROR_RECORD
  u32 claim;
  u32 flag;
  i32 phase;
  i32 rank;
  i32 peer;
  i32 reserved;
  u64 observed;
  u64 expected;
};
static_assert(sizeof(ErrorRecord) == 40, "ErrorRecord layout is mirrored in Python");

__device__ __forceinline__ bool error_raised(const ErrorRecord* err) {
  return *reinterpret_cast<const volatile u32*>(&err->flag) != 0;
}

// Fill the record if no failure claimed it first. Returns whether this call filled it.
__device__ __noinline__ bool record_first(ErrorRecord* err, int phase, int rank, int peer, u64 observed, u64 expected) {
  if (atomicCAS(&err->claim, 0u, 1u) != 0u) return false;
  err->phase = phase;
  err->rank = rank;
  err->peer = peer;
  err->observed = observed;
  err->expected = expected;
  __threadfence_system();
  *reinterpret_cast<volatile u32*>(&err->flag) = 1u;
  __threadfence_system();
  return true;
}

// A bounded wait gave up: record it (and trap under EP_DEBUG_TRAP).
__device__ __forceinline__ void record_error(ErrorRecord* err, int phase, int rank, int peer, u64 observed,
                                             u64 expected) {
  record_first(err, phase, rank, peer, observed, expected);
  if (kTrapOnTimeout) __trap();
}

// Poll until *flag >= target, then acquire (system scope). False on time-out (recorded) or when another
// wait failed. Polls are relaxed loads with a growing sleep between them, capped at kSleepMaxNs, and one
// fence at the end: hundreds of warps spinning on a few flag lines make an L2 hot spot that slows every
// other access of the GPU, the peers' incoming stores included, so waits with many pollers sleep up to
// kPollSleepMaxNs; a wait of at most one warp per peer (barriers, LL) spins tighter (kSpinSleepMaxNs).
constexpr u32 kPollSleepMaxNs = 1024;
constexpr u32 kSpinSleepMaxNs = 64;
template <u32 kSleepMaxNs = kPollSleepMaxNs>
__device__ __forceinline__ bool wait_geq(const u64* flag, u64 target, ErrorRecord* err, u64 timeout_ns,
                                         int phase, int rank, int peer) {
  const u64 start = global_timer_ns();
  u32 sleep_ns = 0;   // the first poll does not sleep
  for (u32 iter = 0;; ++iter) {
    if (sleep_ns) __nanosleep(sleep_ns);
    sleep_ns = sleep_ns ? min(2 * sleep_ns, kSleepMaxNs) : 32u;
    const u64 v = ld_relaxed_sys(flag);
    if (v >= target) {
      fence_sys();
      return true;
    }
    if ((iter & 255u) == 255u) {
      if (error_raised(err)) return false;
      if (global_timer_ns() - start > timeout_ns) {
        record_error(err, phase, rank, peer, v, target);
        return false;
      }
    }
  }
}

}  // namespace ep
