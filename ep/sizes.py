"""Buffer-size arithmetic, as plain functions (testable without a GPU).

Every byte offset that a kernel receives is computed here; the C side only adds them to base pointers.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import MoECommunicatorConfig
from .constants import BARRIER_SLOTS, HT_CHUNK_TOKENS
from .structs import COUNT_SLOT


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def row_bytes(cfg: MoECommunicatorConfig) -> int:
    return cfg.hidden_size * 2


def meta_stride(topk: int) -> int:
    """{token, pad, lexp[K], idx[K], w[K]} rounded to 16 bytes (cuda_src/common/params.cuh MetaView)."""
    return round_up(8 + 12 * topk, 16)


def info_layout(L: int, W: int) -> dict[str, int]:
    """Offsets (in int32) of the per-call HT info array; mirrors InfoLayout in params.cuh (a CPU test compares
    them). The host mirror holds the fields before ``peer_row``, then {bad index, bad value}, then the
    abort code of every source (``host_abort``)."""
    lay = {"invalid_mask": 0, "total_rows": 1, "capacity": 2, "n_recv_total": 3, "counts": 4}
    lay["base"] = lay["counts"] + L
    lay["src_base"] = lay["base"] + L + 1
    lay["recv_n"] = lay["src_base"] + W * L
    lay["recv_prefix"] = lay["recv_n"] + W
    lay["src_T"] = lay["recv_prefix"] + W + 1
    lay["peer_row"] = lay["src_T"] + W      # [E]: device only, the host mirror holds the fields before it
    lay["rank_prefix"] = lay["peer_row"] + W * L   # [W, W]: tokens sources 0..i send to rank j (DeepEP's matrix)
    lay["size"] = lay["rank_prefix"] + W * W
    lay["host_bad"] = lay["peer_row"]
    lay["host_size"] = lay["peer_row"] + 2
    return lay


@dataclass(frozen=True)
class HtLayout:
    """Byte layout of the HT symmetric buffers of one rank."""

    data_bytes: int        # [W][T_max][row]
    meta_bytes: int        # [W][T_max][meta_stride]
    sig_bytes: int
    out_bytes: int         # owned dispatch output [owned_output_rows, H], 0 without owned_output
    land_bytes: int        # push combine's landing buffer [W][T_max][row] (HtTuning.combine = "push"), else 0
    wland_bytes: int       # TOKEN_MAJOR: the landing buffer of the weights combine sums, [W][T_max][K] float32
    barrier_offset: int
    cnt_offset: int
    cnt_stride: int
    dflag_offset: int
    drange_offset: int
    max_chunks: int

    @property
    def total(self) -> int:
        return self.data_bytes + self.meta_bytes + self.sig_bytes + self.out_bytes + self.land_bytes + self.wland_bytes


def worst_case_rows(cfg: MoECommunicatorConfig, world: int) -> int:
    """Rows of a worst-case TOKEN_MAJOR output: the most a rank can receive, one per (source token, rank)."""
    return world * cfg.max_tokens_per_rank


def owned_output_rows(cfg: MoECommunicatorConfig, world: int) -> int:
    """Rows of the owned HT dispatch output: the most a FLAT output can need, every token of every rank naming
    min(K, L) of our experts, plus the alignment padding of every expert."""
    L = cfg.num_experts // world
    return world * cfg.max_tokens_per_rank * min(cfg.topk, L) + L * (cfg.expert_alignment - 1)


def ht_layout(cfg: MoECommunicatorConfig, world: int, combine_push: bool) -> HtLayout:
    T = cfg.max_tokens_per_rank
    max_chunks = -(-T // HT_CHUNK_TOKENS)
    cnt_stride = round_up(COUNT_SLOT.itemsize + 4 * (cfg.num_experts + world), 16)   # CountSlot, counts[E + W]
    barrier_offset = 0
    cnt_offset = round_up(BARRIER_SLOTS * 8, 128)
    dflag_offset = round_up(cnt_offset + 2 * world * cnt_stride, 128)   # two sets of slots (epoch parity)
    drange_offset = round_up(dflag_offset + world * max_chunks * 8, 128)
    sig_bytes = round_up(drange_offset + world * max_chunks * 8, 4096)
    out_bytes = owned_output_rows(cfg, world) * row_bytes(cfg) if cfg.owned_output else 0
    data_bytes = world * T * row_bytes(cfg)
    token_major = cfg.layout.value == "token_major"
    return HtLayout(data_bytes, world * T * meta_stride(cfg.topk), sig_bytes, out_bytes,
                    data_bytes if combine_push else 0, world * T * cfg.topk * 4 if token_major else 0, barrier_offset,
                    cnt_offset, cnt_stride, dflag_offset, drange_offset, max_chunks)


@dataclass(frozen=True)
class LLLayout:
    """Byte layout of the LL buffers of one rank (cuda_src/ll_dispatch.cu, ll_combine.cu)."""

    out_bytes: int         # symmetric: dispatch output [2][L][cap][2H] by parity (FP8 uses [L][cap][H] of a half)
    scale_bytes: int       # symmetric: FP8 scales [2][L][H/128][cap] f32 (0 when H % 128)
    meta_bytes: int        # symmetric: [2][W][T_max][meta_stride] MetaRec
    comb_bytes: int        # symmetric: [2][W][T_max][2H] partials
    sig_bytes: int         # symmetric: count slots [2][W] of cnt_stride, then arrivals
    cnt_offset: int
    cnt_stride: int
    disp_cnt_offset: int
    comb_cnt_offset: int
    wgt_cnt_offset: int
    meta_stride: int
    local_bytes: int       # state, send masks, ntok, counts, offsets, the owned combine output

    @property
    def total(self) -> int:
        return self.out_bytes + self.scale_bytes + self.meta_bytes + self.comb_bytes + self.sig_bytes + self.local_bytes


LL_STATE_WORDS = 12        # ll_common.cuh: four seqs, four blocks-done counters; ll_combine.cu: two recorded dseqs,
                           # the weight push's blocks-done counter


def ll_meta_stride(topk: int) -> int:
    """MetaRec {seq, reserved, rows[K], w[K]} rounded to 16 bytes."""
    return round_up(8 + 8 * topk, 16)


def ll_layout(cfg: MoECommunicatorConfig, world: int) -> LLLayout:
    T, H, K = cfg.max_tokens_per_rank, cfg.hidden_size, cfg.topk
    L = cfg.num_experts // world
    cap = world * T
    cnt_stride = round_up(16 + 4 * cfg.num_experts, 16)
    cnt_offset = 0
    disp_cnt_offset = round_up(cnt_offset + 2 * world * cnt_stride, 128)
    comb_cnt_offset = disp_cnt_offset + BARRIER_SLOTS * 8
    wgt_cnt_offset = comb_cnt_offset + BARRIER_SLOTS * 8
    sig_bytes = round_up(wgt_cnt_offset + BARRIER_SLOTS * 8, 4096)
    meta_stride = ll_meta_stride(K)
    local = (4 * LL_STATE_WORDS + 4 * 2 * T + 4 * 2 * world + 2 * 4 * L + 8 * (L + 1) + 2 * T * 2 * H)
    return LLLayout(out_bytes=2 * L * cap * 2 * H, scale_bytes=2 * L * (H // 128) * cap * 4 if H % 128 == 0 else 0,
                    meta_bytes=2 * world * T * meta_stride, comb_bytes=2 * world * T * 2 * H, sig_bytes=sig_bytes,
                    cnt_offset=cnt_offset, cnt_stride=cnt_stride, disp_cnt_offset=disp_cnt_offset,
                    comb_cnt_offset=comb_cnt_offset, wgt_cnt_offset=wgt_cnt_offset, meta_stride=meta_stride,
                    local_bytes=local)


def ll_route_smem(cfg: MoECommunicatorConfig, limit: int) -> tuple[int, int]:
    """(expert columns per tile, dynamic shared memory bytes) of the LL dispatch's routing bitmap: base[E]
    i32, then per tile words u32 and prefix u16 [ceil(T_max/32)][cols], then idx u16 [T_max][K]. The widest
    tile that fits in ``limit`` bytes; (0, need) when not even one column does."""
    E, T, K = cfg.num_experts, cfg.max_tokens_per_rank, cfg.topk
    nw = -(-T // 32)
    fixed = 4 * E + 2 * T * K
    cols = min(E, (limit - fixed) // (6 * nw)) if limit > fixed else 0
    need = fixed + 6 * nw * max(cols, 1)
    return (cols if cols >= 1 else 0), round_up(need, 16)


def check_row_index_range(cfg: MoECommunicatorConfig, world: int) -> None:
    """Output rows are int32 in the kernels; refuse configs whose worst case would overflow."""
    from .errors import ConfigError
    L = cfg.num_experts // world
    worst = world * cfg.max_tokens_per_rank * min(cfg.topk, L) + L * cfg.expert_alignment
    if cfg.mode == "ht" and cfg.output_layout is not None and cfg.layout.value == "expert_major":
        worst = L * (world * cfg.max_tokens_per_rank + cfg.expert_alignment)
    if cfg.mode == "ll":
        worst = L * world * cfg.max_tokens_per_rank
    if worst >= 2 ** 31:
        raise ConfigError(f"worst-case output rows ({worst}) exceed int32; lower max_tokens_per_rank")
