"""Public configuration and result types of ep: frozen, keyword-only, validated at construction."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .constants import GATHER_MAX_WARPS, MAX_LOCAL_EXPERTS, MAX_TOPK, MAX_WORLD_SIZE
from .errors import ConfigError

HT_DEFAULT_SMS = 24               # HT leaves the rest of the GPU to the compute it overlaps
LL_DEFAULT_SMS_UNKNOWN_GPU = 132  # LL's default is every SM; without a GPU to ask (CPU backend), an H100/H200's
LL_MAX_TOKENS = 1 << 14           # LL's routing bitmap lives in shared memory (ep.sizes.ll_route_smem)

__all__ = ["MAX_LOCAL_EXPERTS", "MAX_TOPK", "MAX_WORLD_SIZE", "DispatchLayout", "CommOverlapConfig", "HtTuning", "Fp8Cast",
           "LLTuning", "MoECommunicatorConfig", "QuantScales", "DispatchOutput", "DispatchHandle"]


class DispatchLayout(enum.Enum):
    """How dispatched tokens are laid out for the expert MLP.

    FLAT: ``tokens [N, H]``, rows grouped by local expert ascending, then source rank, then source
    token index; ``expert_offsets [L+1]`` indexes the groups.
    EXPERT_MAJOR: ``tokens [L, capacity, H]``; rows ``[0, count_e)`` of expert ``e`` are valid, same order.
    TOKEN_MAJOR (HT): ``tokens [N, H]``, one row per (source token, this rank), ordered by source rank then
    source token index, with ``topk_ids [N, K]`` (the slot's local expert, or -1 where another rank owns it)
    and ``topk_weights [N, K]`` (0 at -1); the caller applies its experts and weights and combine sums the
    rows. This moves exactly DeepEP's bytes.
    """

    FLAT = "flat"
    EXPERT_MAJOR = "expert_major"
    TOKEN_MAJOR = "token_major"


@dataclass(frozen=True, kw_only=True)
class CommOverlapConfig:
    """SM budget of the data kernels, so that compute can overlap communication on the other SMs.

    ``dispatch_num_sms`` / ``combine_num_sms`` (None = ``MoECommunicatorConfig.num_sms``) set the block
    counts of the dispatch and combine data kernels independently. The env knobs ``EP_DISPATCH_NSM`` and
    ``EP_COMBINE_NSM`` override both.
    """

    dispatch_num_sms: int | None = None
    combine_num_sms: int | None = None

    def __post_init__(self):
        for name in ("dispatch_num_sms", "combine_num_sms"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"CommOverlapConfig.{name} must be a positive int or None, got {value!r}")


def _check_int(owner: str, name: str, value: Any, lo: int, hi: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        what = f"an int in [{lo}, {hi}]" + (" or None" if optional else "")
        raise ConfigError(f"{owner}.{name} must be {what}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class HtTuning:
    """Tuning of the HT kernels. Every field has an environment override (in brackets), read once when a
    communicator is built; resolved with the rest of the config into ``MoECommunicator.tuning``.

    dispatch_senders [EP_DISPATCH_SENDERS]: dispatch blocks that send (the rest expand what arrives);
      None = a third of the dispatch grid, at least 1.
    dispatch_warps [EP_DISPATCH_WARPS]: warps per dispatch block.
    dispatch_copy [EP_NCCLEP_TMA]: how senders move a row to its destinations: "warp" (16-byte stores of
      one read of the row) or "tma" (a bulk load into shared memory, one bulk store per destination).
    combine [EP_COMBINE_PUSH]: "push" (the copy engines copy each peer's partials into the source's landing
      buffer, one more symmetric buffer of W x max_tokens_per_rank rows, and the source sums locally) or
      "pull" (the source reads the partials from the peers over NVLink).
    gather_warps_wide / gather_warps_narrow / gather_wide_max_blocks [EP_CMB_TMA_WARPS_WIDE / _NARROW /
      _MAXCH]: warps per block of the pull combine's gather: wide up to that many blocks, narrow above.
    """

    dispatch_senders: int | None = None
    dispatch_warps: int = 24
    dispatch_copy: str = "warp"
    combine: str = "push"
    gather_warps_wide: int = 16
    gather_warps_narrow: int = 4
    gather_wide_max_blocks: int = 32

    def __post_init__(self):
        _check_int("HtTuning", "dispatch_senders", self.dispatch_senders, 1, 1024, optional=True)
        _check_int("HtTuning", "dispatch_warps", self.dispatch_warps, 4, 32)
        if self.dispatch_copy not in ("warp", "tma"):
            raise ConfigError(f"HtTuning.dispatch_copy must be 'warp' or 'tma', got {self.dispatch_copy!r}")
        if self.combine not in ("push", "pull"):
            raise ConfigError(f"HtTuning.combine must be 'push' or 'pull', got {self.combine!r}")
        _check_int("HtTuning", "gather_warps_wide", self.gather_warps_wide, 1, GATHER_MAX_WARPS)
        _check_int("HtTuning", "gather_warps_narrow", self.gather_warps_narrow, 1, GATHER_MAX_WARPS)
        _check_int("HtTuning", "gather_wide_max_blocks", self.gather_wide_max_blocks, 1, 1024)


@dataclass(frozen=True, kw_only=True)
class LLTuning:
    """Tuning of the LL kernels (environment overrides in brackets).

    warps [EP_LL_WARPS]: warps per LL block.
    """

    warps: int = 16

    def __post_init__(self):
        _check_int("LLTuning", "warps", self.warps, 4, 32)


@dataclass(frozen=True, kw_only=True)
class MoECommunicatorConfig:
    """Everything a communicator needs to size its buffers and pick its kernels.

    mode: "ht" (high throughput, exact-size FLAT outputs, one host wait per uncached dispatch) or
      "ll" (low latency: no host synchronization, fixed-capacity EXPERT_MAJOR output, graph capturable).
    num_experts (E), hidden_size (H, multiple of 8), topk (K <= E), max_tokens_per_rank (T_max).
    Experts are placed evenly and contiguously: rank r owns experts [r*E/W, (r+1)*E/W).
    owned_output ("ht", FLAT): dispatch returns ``tokens`` as a view of a communicator-owned buffer of
      ``W*T_max*min(K, L) + L*(expert_alignment-1)`` rows (ep.sizes.owned_output_rows), valid until this
      rank's next dispatch (or close()). Peers then write every received token straight into its first expert
      row, which saves the receiver one row copy per (token, rank); a cached dispatch
      then always queues a cross-rank barrier first. Off: fresh exact-size outputs per call.
    num_sms [EP_DISPATCH_NSM / EP_COMBINE_NSM override the dispatch / combine share, as does ``overlap``]:
      blocks (one per SM) of the data kernels. None: 24 for "ht" (the rest of the GPU stays free for compute
      to overlap), every SM for "ll" (decode runs it alone, and its latency falls with more SMs copying).
    timeout_s [EP_TIMEOUT_S]: bound of every device and host wait.
    shared_gpu [EP_SHARED_GPU]: allow several ranks of a node on one GPU (ranks beyond the GPU count share
      GPUs round-robin). For tests only: it proves correctness, never speed.
    scale_layout ("ht", FP8 and other block-scaled payloads): how ``DispatchOutput.scales`` is laid out:
      "row_major" ``[rows, S]`` contiguous, or "mn_major": token-contiguous with the token stride padded to a
      multiple of 4 (16-byte aligned for TMA: what DeepGEMM's grouped GEMMs read without a transpose).
    ranks_per_node [EP_RANKS_PER_NODE]: ranks per node (NVLink domain); None = the ranks of a host. Fewer
      than the world size makes the path internode (ep.internode): the CPU backend runs it (virtual nodes
      on one machine included, results bit-identical to one node); the GPU backend's network hop is not
      built yet and refuses it.
    ht_tuning, ll_tuning: kernel tuning of each mode (HtTuning, LLTuning).
    """

    mode: str = "ht"
    num_experts: int
    hidden_size: int
    topk: int
    max_tokens_per_rank: int
    num_sms: int | None = None
    expert_alignment: int = 1
    output_layout: DispatchLayout | None = None   # None: FLAT for "ht", EXPERT_MAJOR for "ll"
    dtype: str = "bfloat16"
    timeout_s: float = 60.0
    owned_output: bool = False
    overlap: CommOverlapConfig = field(default_factory=CommOverlapConfig)
    shared_gpu: bool = False
    scale_layout: str = "row_major"
    ranks_per_node: int | None = None
    ht_tuning: HtTuning = field(default_factory=HtTuning)
    ll_tuning: LLTuning = field(default_factory=LLTuning)

    def __post_init__(self):
        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")

        if self.mode not in ("ht", "ll"):
            raise ConfigError(f"mode must be 'ht' or 'll', got {self.mode!r}")
        for name in ("num_experts", "hidden_size", "topk", "max_tokens_per_rank", "expert_alignment"):
            positive_int(name, getattr(self, name))
        if self.num_sms is not None:
            positive_int("num_sms", self.num_sms)
        if self.hidden_size % 8:
            raise ConfigError(f"hidden_size must be a multiple of 8 (16-byte rows), got {self.hidden_size}")
        if self.topk > self.num_experts:
            raise ConfigError(f"topk ({self.topk}) must be <= num_experts ({self.num_experts})")
        if self.topk > MAX_TOPK:
            raise ConfigError(f"topk must be <= {MAX_TOPK}, got {self.topk}")
        if self.max_tokens_per_rank > (1 << 24):
            raise ConfigError(f"max_tokens_per_rank must be <= {1 << 24}, got {self.max_tokens_per_rank}")
        if self.dtype != "bfloat16":
            raise ConfigError(f"dtype must be 'bfloat16', got {self.dtype!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or not 0 < self.timeout_s < float("inf"):
            raise ConfigError(f"timeout_s must be a finite number of seconds > 0, got {self.timeout_s!r}")
        if self.output_layout is not None and not isinstance(self.output_layout, DispatchLayout):
            raise ConfigError(f"output_layout must be a DispatchLayout or None, got {self.output_layout!r}")
        if self.mode == "ll" and self.expert_alignment != 1:
            raise ConfigError("expert_alignment applies to mode='ht' only (LL segments have a fixed capacity)")
        if not isinstance(self.owned_output, bool):
            raise ConfigError(f"owned_output must be a bool, got {self.owned_output!r}")
        if self.owned_output and self.mode != "ht":
            raise ConfigError("owned_output applies to mode='ht' (LL outputs are communicator-owned already)")
        if self.owned_output and self.layout is not DispatchLayout.FLAT:
            raise ConfigError("owned_output needs the FLAT layout: an owned EXPERT_MAJOR output would have to hold "
                              "L x W*T_max rows (its worst-case capacity)")
        if not isinstance(self.overlap, CommOverlapConfig):
            raise ConfigError(f"overlap must be a CommOverlapConfig, got {self.overlap!r}")
        if self.scale_layout not in ("row_major", "mn_major"):
            raise ConfigError(f"scale_layout must be 'row_major' or 'mn_major', got {self.scale_layout!r}")
        if self.layout is DispatchLayout.TOKEN_MAJOR and self.mode != "ht":
            raise ConfigError("output_layout=TOKEN_MAJOR applies to mode='ht' (LL is expert-major by design)")
        if self.ranks_per_node is not None:
            positive_int("ranks_per_node", self.ranks_per_node)
        if not isinstance(self.shared_gpu, bool):
            raise ConfigError(f"shared_gpu must be a bool, got {self.shared_gpu!r}")
        if not isinstance(self.ht_tuning, HtTuning):
            raise ConfigError(f"ht_tuning must be an HtTuning, got {self.ht_tuning!r}")
        if not isinstance(self.ll_tuning, LLTuning):
            raise ConfigError(f"ll_tuning must be an LLTuning, got {self.ll_tuning!r}")
        if self.mode == "ll" and self.max_tokens_per_rank > LL_MAX_TOKENS:
            raise ConfigError(f"mode='ll' takes max_tokens_per_rank <= {LL_MAX_TOKENS} (decode batches), got "
                              f"{self.max_tokens_per_rank}")
        if self.mode == "ht" and (self.overlap.dispatch_num_sms or self.num_sms or HT_DEFAULT_SMS) < 2:
            raise ConfigError("mode='ht' dispatch needs at least 2 SMs (sender blocks and receiver blocks); "
                              "set num_sms or overlap.dispatch_num_sms >= 2")

    def sms_for(self, gpu_sms: int | None) -> int:
        """Blocks of the data kernels when neither the overlap config nor an env knob says otherwise."""
        if self.num_sms is not None:
            return self.num_sms
        if self.mode == "ht":
            return HT_DEFAULT_SMS
        return gpu_sms if gpu_sms is not None else LL_DEFAULT_SMS_UNKNOWN_GPU

    @property
    def layout(self) -> DispatchLayout:
        if self.output_layout is not None:
            return self.output_layout
        return DispatchLayout.FLAT if self.mode == "ht" else DispatchLayout.EXPERT_MAJOR

    def check_world(self, world_size: int) -> None:
        """Validate the parts of the config that depend on the number of ranks."""
        if not 1 <= world_size <= MAX_WORLD_SIZE:
            raise ConfigError(f"world size must be in [1, {MAX_WORLD_SIZE}], got {world_size}")
        if self.num_experts % world_size:
            raise ConfigError(f"num_experts ({self.num_experts}) must be divisible by the world size ({world_size})")
        if self.num_experts // world_size > MAX_LOCAL_EXPERTS:
            raise ConfigError(f"at most {MAX_LOCAL_EXPERTS} experts per rank, got {self.num_experts // world_size}")


@dataclass(frozen=True, kw_only=True)
class Fp8Cast:
    """LL dispatch of bf16 tokens as e4m3 with per-128-channel scales (ep.reference.fp8_cast has the rounding).

    round_scale: scales rounded up to powers of two. ue8m0 (implies round_scale): only the exponent byte of each
    scale is kept, four per int32. The outputs are ``tokens [L, cap, H]`` e4m3 (torch.float8_e4m3fn, or uint8
    bit patterns) and ``scales [L, cap, H/128]`` float32 (ue8m0: ``[L, cap, H/512]`` int32), token-contiguous.
    """

    round_scale: bool = False
    ue8m0: bool = False

    def __post_init__(self):
        for name in ("round_scale", "ue8m0"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Fp8Cast.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def mode(self) -> int:
        """cuda_src/common/fp8.cuh Fp8Mode."""
        return 3 if self.ue8m0 else 2 if self.round_scale else 1


@dataclass(frozen=True, kw_only=True)
class QuantScales:
    """Per-block scales that travel with quantized tokens (HT): ``scales [T, S]`` of any dtype and strides
    (float32 ``[T, H/128]``, packed UE8M0 int32 ``[T, H/512]``, E8M0 uint8 ``[T, H/32]``, E4M3 ``[T, H/16]``).
    ``dispatch(..., scales=)`` takes this or the array itself; block_size documents the format.
    """

    scales: Any
    block_size: int = 128

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"QuantScales.block_size must be a positive int, got {self.block_size!r}")


@dataclass(frozen=True)
class DispatchOutput:
    """What the local expert MLP consumes.

    tokens: FLAT / TOKEN_MAJOR ``[N, H]`` or EXPERT_MAJOR ``[L, capacity, H]``, in the caller's framework and
      the dtype of x (bf16, or the payload of an FP8 / byte dispatch).
    num_tokens_per_expert: device int32 ``[L]`` (rows of each local expert, padding excluded).
    num_tokens_per_expert_host: the same as a Python list (HT only; None in LL, which never syncs).
    expert_offsets: int64 ``[L+1]``, exclusive cumulative sum of the padded segments, indexing
      ``tokens`` viewed as ``[rows, H]`` (EXPERT_MAJOR: ``e * capacity``).
    layout: the layout of ``tokens``.
    scales: FP8 dispatches only: the scales of ``tokens`` in the same row order (LL: ``[L, capacity, H/128]``
      float32, or ``[L, capacity, H/512]`` int32 of packed UE8M0 bytes, as views of token-contiguous
      (MN-major) buffers; HT: see ``MoECommunicatorConfig.scale_layout``); None for bf16.
    topk_ids, topk_weights: TOKEN_MAJOR only: int32 / float32 ``[N, K]`` (see DispatchLayout); else None.
    rank_prefix: TOKEN_MAJOR only: device int32 ``[W, W]``, entry ``[i, j]`` = the tokens ranks ``0..i`` send
      to rank ``j`` (column ``rank``: where each source's block of rows ends; DeepEP's rank_prefix_matrix).
    A ``worst_case=True`` dispatch (TOKEN_MAJOR) has ``W * max_tokens_per_rank`` rows: those past the
    received ones have topk_ids -1 and weights 0 (their tokens and scales are unspecified), and
    ``num_tokens_per_expert_host`` is None: nothing waits on the host.
    """

    tokens: Any
    num_tokens_per_expert: Any
    num_tokens_per_expert_host: list | None
    expert_offsets: Any
    layout: DispatchLayout
    scales: Any = None
    topk_ids: Any = None
    topk_weights: Any = None
    rank_prefix: Any = None


class DispatchHandle:
    """Opaque record of one dispatch: everything combine needs. Only the communicator reads it."""

    __slots__ = ("_owner", "_mode", "_state", "num_tokens", "_framework", "__weakref__")

    def __init__(self, owner: int, mode: str, state: Any, num_tokens: int, framework: str = "numpy"):
        self._owner = owner
        self._mode = mode
        self._state = state
        self.num_tokens = num_tokens
        self._framework = framework   # the dispatch's: where row_sources puts its arrays

    def __repr__(self) -> str:
        return f"DispatchHandle(mode={self._mode!r}, num_tokens={self.num_tokens})"
