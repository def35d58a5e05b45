// Macros -> typed constants. ep/tuning.py resolves the config (and the env overrides) into the values of the
// macros a kernel file reads; ep/jit.py passes exactly those as -D flags. Kernel bodies use these constants,
// never the raw macros. A kernel file that needs a constant whose macro was not passed fails to compile
// (undeclared identifier).
#pragma once
#include "common/constants.cuh"

namespace ep {

#ifdef EP_NCCLEP_TMA
constexpr bool kDispatchTma = EP_NCCLEP_TMA != 0;
#endif
#ifdef EP_DISPATCH_WARPS
constexpr int kDispatchWarps = EP_DISPATCH_WARPS;
static_assert(kDispatchWarps >= 4 && kDispatchWarps <= 32, "EP_DISPATCH_WARPS in [4, 32]");
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
