// Macro knobs -> typed constants. ep/envs.py declares every knob once; ep/jit.py passes the macros a
// kernel file uses as -D flags. Kernel bodies use these constants, never the raw macros. A kernel file
// that needs a constant whose macro was not passed fails to compile (undeclared identifier).
#pragma once

namespace ep {

constexpr int kMaxWorld = 32;   // peer masks are u32 (ep/config.py MAX_WORLD_SIZE)
constexpr int kMaxTopk = 32;    // ep/config.py MAX_TOPK
constexpr int kWarpSize = 32;
constexpr int kVecBytes = 16;   // every row is a multiple of 16 bytes (H % 8 == 0)

#ifdef EP_NCCLEP_TMA
constexpr bool kDispatchTma = EP_NCCLEP_TMA != 0;
#endif
#ifdef EP_DISPATCH_RECV_TMA
constexpr bool kRecvTma = EP_DISPATCH_RECV_TMA != 0;
#endif
#ifdef EP_DISPATCH_WARPS
constexpr int kDispatchWarps = EP_DISPATCH_WARPS;
static_assert(kDispatchWarps >= 4 && kDispatchWarps <= 32, "EP_DISPATCH_WARPS in [4, 32]");
#endif
#ifdef EP_COMBINE_PUSH
constexpr bool kCombinePush = EP_COMBINE_PUSH != 0;
#endif
#ifdef EP_CMB_TMA
constexpr bool kCombineTma = EP_CMB_TMA != 0;
#endif
#ifdef EP_CMB_TMA_STAGES
constexpr int kCombineStages = EP_CMB_TMA_STAGES;
static_assert(kCombineStages >= 1 && kCombineStages <= 4, "EP_CMB_TMA_STAGES in [1, 4]");
#endif
#ifdef EP_CMB_TMA_WARPS_WIDE
constexpr int kCombineWarpsWide = EP_CMB_TMA_WARPS_WIDE;
constexpr int kCombineWarpsMaxCh = EP_CMB_TMA_WARPS_MAXCH;
constexpr int kCombineWarpsNarrow = EP_CMB_TMA_WARPS_NARROW;
static_assert(kCombineWarpsWide >= 1 && kCombineWarpsWide <= 32 && kCombineWarpsNarrow >= 1 && kCombineWarpsNarrow <= 32,
              "EP_CMB_TMA_WARPS_WIDE / _NARROW in [1, 32]");
// Warps per HT combine block for a grid of `blocks` blocks (ep/ht.py combine_warps uses the same rule).
__host__ __device__ constexpr int combine_warps(int blocks) {
  return blocks <= kCombineWarpsMaxCh ? kCombineWarpsWide : kCombineWarpsNarrow;
}
// The most warps combine_warps() can give: the gather kernel's launch bounds.
constexpr int kCombineWarpsMax = kCombineWarpsWide > kCombineWarpsNarrow ? kCombineWarpsWide : kCombineWarpsNarrow;
#endif
#ifdef EP_LL_WARPS
constexpr int kLLWarps = EP_LL_WARPS;
static_assert(kLLWarps >= 4 && kLLWarps <= 32, "EP_LL_WARPS in [4, 32]");
#endif
#ifdef EP_DEBUG_TRAP
constexpr bool kTrapOnTimeout = EP_DEBUG_TRAP != 0;
#else
constexpr bool kTrapOnTimeout = false;
#endif

}  // namespace ep
