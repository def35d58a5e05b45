// Kernel parameter structs, passed by value as the single kernel argument.
// Mirrored field by field by NumPy structured dtypes in ep/structs.py; tests/cpu/test_structs.py compiles
// static_asserts generated from those dtypes against this file, so the two cannot drift.
#pragma once
#include "common/types.cuh"
#include "common/wait.cuh"

namespace ep {

struct BarrierParams {
  const u64* sig_peers;   // [W] base of every rank's signal buffer
  ErrorRecord* err;
  u64* generation;        // device counter of this communicator's barriers (the kernel advances it)
  u64 timeout_ns;
  u64 flags_offset;       // byte offset of u64 flags[W] inside the signal buffer
  i32 rank;
  i32 world;
};

// One source's count slot in the HT count exchange (cnt_offset + ((epoch & 1) * W + source) * cnt_stride of
// each signal buffer: two sets, by the exchange's parity); i32 counts[E + W] follow it (the source's rows per
// global expert, then its tokens per rank).
struct CountSlot {
  u64 epoch;              // the exchange this slot belongs to (release-stored last)
  i32 tokens_to_you;      // tokens the source sends to the slot's owner
  i32 num_tokens;         // the source's T
  i32 invalid;            // the source's topk_ids hold an id outside [-1, E)
  i32 reserved;
};
__device__ __forceinline__ i32* slot_counts(CountSlot* slot) { return reinterpret_cast<i32*>(slot + 1); }

struct HtRouteParams {
  const void* topk_ids;   // [T, K] int32 or int64
  i32* route;             // [T, K] global expert id | kDupBit, or -1
  i32* slot_idx;          // [T, K] index of the token among this rank's tokens of that expert
  i32* send_pos;          // [T, W] slot in destination's region for this rank, or -1
  i32* chunk_cnt;         // [nchunks, E + W] per-chunk counts, scanned in place into chunk bases
  i32* bad;               // [1] smallest flat index t*K+k of an invalid id (init INT_MAX)
  i32* info;              // per-call info, layout InfoLayout below
  u64* host_epoch;        // mapped pinned: set to `epoch` once host_info is written
  i32* host_info;         // mapped pinned: copy of info + {bad_index, bad_value}
  const u64* sig_peers;   // [W]
  ErrorRecord* err;
  u64* epoch_ctr;         // [1] exchanges run (advanced by ht_route_exchange, so CUDA graph replays advance it
                          // too): the slots' epoch is this + 1
  ErrorRecord* input_err; // record_invalid: this rank's first invalid id is recorded here (sticky until the host
                          // reads it), for a dispatch whose host does not wait on the exchange
  u64 epoch;              // the host's number of this launch, published in host_epoch (a replay republishes
                          // its captured number, which no host waits for)
  u64 timeout_ns;
  u64 cnt_offset;         // byte offset of the count slots in the signal buffer
  i32 cnt_stride;         // bytes per source's count slot: CountSlot, then i32 counts[E]
  i32 ids_64;
  i32 rank;
  i32 world;
  i32 num_tokens;
  i32 topk;
  i32 num_experts;
  i32 local_experts;
  i32 nchunks;
  i32 alignment;
  i32 expert_major;       // 1: EXPERT_MAJOR (capacity = largest padded count), 0: FLAT
  i32 record_invalid;     // 1: a worst-case dispatch (no host wait): record this rank's invalid id in input_err
};

struct HtDispatchParams {
  const u8* x;            // [T, row_bytes]: bf16 rows, or any byte payload (FP8, MXFP8, NVFP4)
  const float* weights;   // [T, K] or nullptr (all ones)
  const i32* route;
  const i32* slot_idx;
  const i32* send_pos;
  const i32* info;
  const u64* data_peers;  // [W] base of every rank's data buffer: [W][T_max][slot_bytes]
  const u64* meta_peers;  // [W] base of every rank's meta buffer: [W][T_max][meta_stride]
  const u64* sig_peers;   // [W]
  u8* out;                // [rows, row_bytes] (EXPERT_MAJOR viewed flat; TOKEN_MAJOR: one row per received item)
  const u64* out_peers;   // [W] every rank's owned output (config owned_output), or nullptr: then senders write
                          // rows into the data buffers and receivers copy every row out of them
  i32* recv_rows;         // [n_recv, K] output row of each slot owned here (TOKEN_MAJOR: its local expert), or -1
  float* recv_w;          // [n_recv, K]
  u64* item_ctr;          // [3] receive items handed out, warps done, dispatches run (ht_dispatch.cu next_item)
  i32* counts_out;        // [L] rows per local expert (num_tokens_per_expert), or nullptr
  i64* expert_offsets;    // [L + 1], or nullptr
  const u8* scales;       // [T] rows of scale_count elements of scale_elem bytes (strides below); an empty
                          // array may have no address: scale_count, never this pointer, says whether there are scales
  u8* out_scales;         // the output's scales: element (row, j) at (row / block) * block_stride +
                          // (row % block) * row_stride + j * col_stride bytes
  ErrorRecord* err;
  u64 timeout_ns;
  u64 dflag_offset;       // u64 [W][max_chunks] in the signal buffer
  u64 drange_offset;      // int2 [W][max_chunks]
  u64 scale_stride_t;     // bytes between two tokens' scales in `scales`
  u64 scale_stride_c;     // bytes between two scales of a token
  u64 out_scale_block_stride;
  u64 out_scale_row_stride;
  u64 out_scale_col_stride;
  i32 rank;
  i32 world;
  i32 num_tokens;
  i32 topk;
  i32 local_experts;
  i32 row_bytes;          // payload bytes of a row
  i32 slot_bytes;         // bytes of a data-buffer slot: the payload (16-byte aligned), then its scales
  i32 max_tokens;
  i32 chunk_tokens;
  i32 max_chunks;
  i32 meta_stride;
  i32 send_blocks;        // blocks [0, send_blocks) send, the others expand what arrives
  i32 send_warps;         // warps of a sender block that send (TMA: one staging row each); the others expand
  i32 scale_count;        // scales per row (0: none)
  i32 scale_elem;         // bytes per scale (1 or 4)
  i32 scale_slot_off;     // where a slot's scales start
  i32 out_scale_block;    // rows per block of out_scales (EXPERT_MAJOR: the capacity; else INT_MAX)
  i32 token_major;        // 1: TOKEN_MAJOR output (row = received item; recv_rows hold local experts)
  i32 pad_rows;           // TOKEN_MAJOR worst case: the output's rows; recv_rows/recv_w rows [n_recv, pad_rows)
                          // get -1 / 0 (0: the output has exactly n_recv rows)
};

struct HtCombineParams {
  const u8* expert_out;   // [rows, H]
  const i32* recv_rows;
  const float* recv_w;
  const i32* send_pos;
  const i32* info;
  const u64* data_peers;
  const u64* partial_peers;   // [W]: where peer d's partials of our tokens lie (row send_pos[t][d])
  const u8* own_partial;  // TOKEN_MAJOR: our own tokens' partials (rows of the caller's y), else nullptr
  u8* out;                // [T, H]
  const u64* w_peers;     // TOKEN_MAJOR weights: [W] where peer d's weight rows of our tokens lie, or nullptr
  const float* own_w;     // TOKEN_MAJOR weights: our own tokens' weight rows
  float* out_w;           // TOKEN_MAJOR weights: [T, K] their sums
  const u64* land_peers;  // TOKEN_MAJOR worst case: [W] every rank's landing buffer (ht_token_major_push)
  const u64* wland_peers; // TOKEN_MAJOR worst case: [W] every rank's weight landing buffer, or nullptr
  ErrorRecord* err;
  u64 timeout_ns;
  i32 rank;
  i32 world;
  i32 num_tokens;
  i32 topk;
  i32 local_experts;
  i32 row_bytes;
  i32 max_tokens;
  i32 item_lo;            // reduce: the received items [item_lo, item_hi) of this launch
  i32 item_hi;
  i32 skip_own;           // reduce: 1 = leave out our own tokens (the pull gather folds them itself)
  i32 own_at_prefix;      // TOKEN_MAJOR: 1 = own_partial / own_w point at row 0 of the caller's arrays and our
                          // own block starts at info's recv_prefix[rank] (the host does not know it)
};

struct LLParams {
  const u8* x;                // dispatch: [T, H] bf16
  const void* topk_ids;       // dispatch: [T, K] int32 / int64
  const float* weights;       // dispatch: [T, K] or nullptr (ones); combine: [T, K] combine-time weights or nullptr
  const u8* expert_out;       // combine: [L * cap, H] bf16
  u8* out;                    // combine: [T, H] bf16
  u8* copy_out;               // dispatch: a caller's output_buffer [L * cap, row] the valid rows are copied to, or nullptr
  i32* counts_out;            // dispatch: [L] this call's rows per local expert
  void* cum_counts;           // dispatch: [L] caller-owned counters the counts are added to (int32 / int64), or nullptr
  u32* ready;                 // combine: [L] per-expert readiness counters (overlap), or nullptr; the combine's
                              // last block takes ready_target off each once every row is read
  const u64* out_peers;       // [W] dispatch output of every rank: [L][cap][row_bytes]
  const u64* scale_peers;     // [W] FP8 scales of every rank: [L][groups][cap] (f32, or u8 exponents in u32 words)
  const u64* meta_peers;      // [W] [2][W][T_max] MetaRec of meta_stride bytes
  const u64* comb_peers;      // [W] [2][W][T_max][H] bf16 partials of each source's tokens
  const u64* sig_peers;       // [W] signal buffers: count slots, arrival counters
  u32* state;                 // local: seq of {dispatch send, dispatch recv, combine send, combine recv}, then
                              // each half's blocks done
  u32* send_mask;             // local: [2][T_max] ranks each own token went to
  i32* ntok;                  // local: [2][W] tokens of each source this dispatch (by dispatch parity)
  i32* src_info;              // ll_row_sources: [L][cap] source token of each row (-1 past the expert's rows)
  i32* src_counts;            // ll_row_sources: [L][W] rows of each local expert from each source
  ErrorRecord* err;
  ErrorRecord* input_err;     // invalid expert ids (treated as -1) are reported here, not as a time-out
  u64 timeout_ns;
  u64 cnt_offset;             // count slots [2][W] of cnt_stride bytes in the signal buffer
  u64 disp_cnt_offset;        // u64 [W] dispatch arrivals (blocks done sending) from each source
  u64 comb_cnt_offset;        // u64 [W] combine arrivals from each expert rank
  u64 wgt_cnt_offset;         // u64 [W] combine-time weights: the last combine seq whose weights each source wrote
  i32 rank;
  i32 world;
  i32 num_tokens;
  i32 topk;
  i32 num_experts;
  i32 local_experts;
  i32 hidden;
  i32 max_tokens;
  i32 capacity;               // rows per local expert (W * T_max)
  i32 cnt_stride;
  i32 meta_stride;
  i32 ids_64;
  i32 age;                    // combine: how many dispatches ago its dispatch ran (0 or 1)
  i32 fp8;                    // dispatch: 0 bf16, 1 e4m3 + f32 scales, 2 + power-of-two scales, 3 + UE8M0 bytes
  i32 cols_per_tile;          // dispatch: expert columns per shared-memory tile of the routing bitmap
  u32 ready_target;           // combine: the readiness value that releases an expert's rows
  i32 cum_64;                 // dispatch: cum_counts holds int64 (else int32)
  i32 out_par;                // dispatch: which half of the double-buffered output (the host alternates it, so a
                              // graph replays into the half its outputs view); combine: which half of the output
};

// ll_signal_ready: counters[first + i] += add (release, GPU scope) for i < count: the expert MLP's progress
// signal of an overlapped LL combine (ep.OverlapSignals).
struct SignalParams {
  u32* counters;
  i32 first;
  i32 count;
  u32 add;
  i32 reserved;
};

// The metadata of one (token, destination) a source writes into the destination's meta buffer.
// rows[k] is the destination's output row (expert * cap + index) of slot k when the destination owns that
// slot's expert, else -1 (a repeated expert gives the same row twice); seq tags the dispatch it belongs to.
struct MetaRec {
  u32 seq;
  i32 reserved;
};
__device__ __forceinline__ i32* meta_rows(u8* rec) { return reinterpret_cast<i32*>(rec + 8); }
__device__ __forceinline__ float* meta_w(u8* rec, int K) { return reinterpret_cast<float*>(rec + 8 + 4 * K); }

// One source's count slot: seq (release-stored last), its T, then its rows per global expert.
struct LLCountSlot {
  u64 seq;
  i32 num_tokens;
  i32 reserved;
};

// Per-call HT info (i32 array), written by ht_route_exchange. Mirrored by ep/sizes.py info_layout().
// counts[L], base[L + 1], src_base[W][L] describe this rank's output; peer_row[E] describes the peers': the
// row of this rank's first token of global expert g in the output of g's owner (the host mirror stops there).
// The host mirror adds {bad flat index, bad value} after peer_row.
struct InfoLayout {
  int invalid_mask, total_rows, capacity, n_recv_total;
  int counts, base, src_base, recv_n, recv_prefix, src_T, peer_row, rank_prefix, size;
  __host__ __device__ constexpr InfoLayout(int L, int W)
      : invalid_mask(0), total_rows(1), capacity(2), n_recv_total(3), counts(4), base(4 + L),
        src_base(4 + L + L + 1), recv_n(4 + 2 * L + 1 + W * L), recv_prefix(4 + 2 * L + 1 + W * L + W),
        src_T(4 + 2 * L + 1 + W * L + 2 * W + 1), peer_row(4 + 2 * L + 1 + W * L + 3 * W + 1),
        rank_prefix(4 + 2 * L + 1 + 2 * W * L + 3 * W + 1), size(4 + 2 * L + 1 + 2 * W * L + 3 * W + 1 + W * W) {}
};

// Per-token metadata that rides along with a dispatched token (meta buffer entry).
struct MetaView {
  u8* base;
  int K;
  __device__ __forceinline__ i32* token() const { return reinterpret_cast<i32*>(base); }
  __device__ __forceinline__ i32* lexp() const { return reinterpret_cast<i32*>(base + 8); }
  __device__ __forceinline__ i32* idx() const { return reinterpret_cast<i32*>(base + 8 + 4 * K); }
  __device__ __forceinline__ float* w() const { return reinterpret_cast<float*>(base + 8 + 8 * K); }
};

}  // namespace ep
