// Constants shared with the host: ep/constants.py holds the values and why; tests/cpu/test_structs.py
// compiles static_asserts rendered from that table against this file, so the two cannot drift.
#pragma once

namespace ep {

constexpr int kMaxWorld = 32;
constexpr int kMaxTopk = 32;
constexpr int kMaxLocalExperts = 1024;
constexpr int kDupBit = 1 << 30;
constexpr int kRouteChunk = 128;
constexpr int kRoutePosTile = 2048;
constexpr int kHtChunkTokens = 4;
constexpr int kBarrierSlots = 32;
constexpr int kCombineReduceWarps = 32;
constexpr int kSmemLimit = 227 * 1024;
constexpr int kMetaBytesMax = (8 + 12 * kMaxTopk + 15) / 16 * 16;
constexpr int kLLChunkChannels = 1024;
constexpr int kGatherMaxWarps = 16;

constexpr int kWarpSize = 32;
constexpr int kVecBytes = 16;   // every row is a multiple of 16 bytes (H % 8 == 0)

// Phase codes of the error record; ep/constants.py PHASES names them for Python errors.
enum Phase : int {
  kPhaseBarrier = 1,
  kPhaseHtCounts = 2,
  kPhaseHtDispatchRecv = 3,
  kPhaseHtCombineRecv = 4,
  kPhaseLLDispatchRecv = 5,
  kPhaseLLCombineRecv = 6,
  kPhaseBadExpertId = 7,
  kPhaseCapacity = 8,
  kPhaseLLCombineWeights = 9,
};

}  // namespace ep
