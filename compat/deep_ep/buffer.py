"""deep_ep.Buffer: DeepEP V1's communication buffer (intranode HT and LL) on ep's communicators.

Sizing: DeepEP callers give byte budgets (or 1 GB), never a token maximum, so the budgets are accepted and
ignored. HT builds ep communicators for the largest batch any rank brings (powers of two, at least 256 tokens)
and replaces them with larger ones when a later batch outgrows them, outside CUDA-graph capture; LL takes the
caller's num_max_dispatch_tokens_per_rank as DeepEP does. Old communicators stay alive for their handles until
destroy().
"""
from __future__ import annotations

import atexit
import logging
import weakref

import torch

import ep
from ep import bootstrap, envs, sizes
from ep.communicator import choose_backend
from ep.constants import MAX_TOPK
from ep.overlap import comm_stream

from .config import Config, combine_config, dispatch_config
from .intranode import Intranode
from .low_latency import LowLatency
from .utils import EventHandle, EventOverlap

log = logging.getLogger("deep_ep")
_announced = False
_live: "weakref.WeakSet[Buffer]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # DeepEP frees a Buffer without explicitly_destroy when it is collected; ep's close is collective, so those
    # Buffers close here, at interpreter exit (every rank exits), bounded by ep's timeout.
    for buffer in list(_live):
        try:
            buffer._close()
        except Exception as exc:     # exiting: report, never hang or mask the exit status
            log.warning("deep_ep: closing a Buffer at exit failed: %s", exc)


class Buffer:
    """DeepEP's Buffer. ``group``: a torch.distributed ProcessGroup, or None with ``comm=`` an mpi4py
    communicator (ep works on a private duplicate of either). Every constructor keyword is accepted; the
    RDMA/NVSHMEM ones only matter internode, which raises NotImplementedError."""

    num_sms: int = 20

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None):
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(value, int) or value < 0 or value % 128:
                raise ValueError(f"Buffer: {name} must be a non-negative multiple of 128, got {value!r}")
        if enable_shrink:
            raise NotImplementedError("Buffer(enable_shrink=True): rank masking (shrink) is not supported by deep_ep "
                                      "on ep")
        if not allow_nvlink_for_low_latency_mode:
            raise NotImplementedError("Buffer(allow_nvlink_for_low_latency_mode=False): LL without NVLink (RDMA "
                                      "only) is not supported by deep_ep on ep")
        if group is None and comm is None:
            raise ValueError("Buffer: give group (a torch.distributed ProcessGroup) or comm (an mpi4py communicator)")
        self._group = bootstrap.make_group(comm if group is None else group)
        self.group = group
        self.rank = self._group.rank
        self.group_size = self._group.size
        if self.group_size > 8 or len(set(self._group.hosts)) > 1:
            self._group.close()
            raise NotImplementedError(f"Buffer over {self.group_size} ranks on {len(set(self._group.hosts))} "
                                      "host(s): internode DeepEP is not served by deep_ep on ep (intranode only: "
                                      "at most 8 ranks of one host)")
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self._backend = "cpu" if not torch.cuda.is_available() else choose_backend(envs.read().backend)
        self._ht = Intranode(self)
        self._ll = LowLatency(self)
        self._destroyed = False
        _live.add(self)
        global _announced
        if not _announced:
            _announced = True
            log.warning("deep_ep %s: this is ep's DeepEP-compatible package (intranode), not DeepEP; kernels by ep %s",
                        _version(), ep.__version__)

    # ------------------------------------------------------------------------------------- statics
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        if new_num_sms % 2:
            raise ValueError(f"Buffer.set_num_sms: the SM count must be even, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event on torch's current stream, for ``previous_event=``."""
        return EventOverlap(EventHandle())

    @staticmethod
    def is_sm90_compiled() -> bool:
        return True      # ep compiles its kernels at run time for the GPU it finds

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """The bytes ep's LL buffers take for this shape (a budget for ``num_rdma_bytes``; ep allocates them)."""
        cfg = ep.MoECommunicatorConfig(mode="ll", num_experts=num_experts, hidden_size=hidden,
                                       topk=min(num_experts, MAX_TOPK),
                                       max_tokens_per_rank=num_max_dispatch_tokens_per_rank)
        return -(-sizes.ll_layout(cfg, num_ranks).total // 128) * 128

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return combine_config(num_ranks, Buffer.num_sms)

    # ------------------------------------------------------------------------------------ lifetime
    def get_comm_stream(self):
        """The stream ep's asynchronous ops run on, as a torch stream."""
        index = torch.cuda.current_device()
        return torch.cuda.ExternalStream(comm_stream(index).ptr, device=index)

    def destroy(self) -> None:
        """Collective: close every ep communicator and the group (needs ``explicitly_destroy=True``)."""
        if not self.explicitly_destroy:
            raise RuntimeError("Buffer.destroy() needs Buffer(explicitly_destroy=True)")
        self._close()

    def _close(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        try:
            self._ht.close()
            self._ll.close()
        finally:
            self._group.close()

    def _check_live(self) -> None:
        if self._destroyed:
            raise RuntimeError("this deep_ep Buffer was destroyed")

    def _unsupported(self, what: str):
        raise NotImplementedError(f"Buffer.{what}: not supported by deep_ep on ep (ep's buffers are not exposed)")

    def get_local_buffer_tensor(self, *args, **kwargs):
        self._unsupported("get_local_buffer_tensor")

    def low_latency_update_mask_buffer(self, *args, **kwargs):
        self._unsupported("low_latency_update_mask_buffer (rank masking)")

    def low_latency_query_mask_buffer(self, *args, **kwargs):
        self._unsupported("low_latency_query_mask_buffer (rank masking)")

    def low_latency_clean_mask_buffer(self, *args, **kwargs):
        self._unsupported("low_latency_clean_mask_buffer (rank masking)")

    # ------------------------------------------------------------------------------------------ HT
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: EventOverlap = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """(num_tokens_per_rank [R] int32, None (no RDMA ranks), num_tokens_per_expert [E] int32,
        is_token_in_rank [T, R] bool, event)."""
        self._check_live()
        return self._ht.get_dispatch_layout(topk_idx, num_experts, previous_event, async_finish,
                                            allocate_on_comm_stream)

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Config = None,
                 previous_event: EventOverlap = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """HT dispatch of ``x`` (bf16 ``[T, H]``, or ``(fp8 [T, H], scales [T, H/128])``). Returns (recv_x,
        recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event); a cached dispatch
        (``handle=``) returns (recv_x, None, None, None, None, event)."""
        self._check_live()
        _check_config(config)
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise ValueError(f"dispatch: expert_alignment must be an int >= 1, got {expert_alignment!r}")
        return self._ht.dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                                 num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
                                 previous_event, async_finish, allocate_on_comm_stream)

    def combine(self, x, handle, topk_weights=None, bias=None, config: Config = None,
                previous_event: EventOverlap = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """HT combine: per source token, the sum of its rows (already weighted by the caller). Returns
        (combined_x [T, H], combined_topk_weights or None, event)."""
        self._check_live()
        _check_config(config)
        return self._ht.combine(x, handle, topk_weights, bias, previous_event, async_finish, allocate_on_comm_stream)

    # ------------------------------------------------------------------------------------------ LL
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective. ep's LL buffers need no cleaning (device sequence numbers, not zeroed flags), so this is
        the rendezvous DeepEP's callers rely on, bounded by ep's timeout."""
        self._check_live()
        self._group.barrier("deep_ep clean_low_latency_buffer")

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: torch.Tensor = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False, **branch_kwargs):
        """Returns (recv_x, recv_count [L] int32, handle, event, hook): recv_x bf16 ``[L, R*T_max, H]`` or
        ``(e4m3 [L, R*T_max, H], scales)``; hook launches the receive half (return_recv_hook) or is None."""
        self._check_live()
        return self._ll.dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                 cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8,
                                 round_scale, use_ue8m0, async_finish, return_recv_hook, branch_kwargs)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: torch.Tensor = None,
                            combine_wait_recv_cost_stats: torch.Tensor = None, **branch_kwargs):
        """Per source token, sum_k topk_weights[t, k] * x[row of (t, k)] (fp32, rounded as ep.reference). Returns
        (combined_x [T, H] bf16, event, hook)."""
        self._check_live()
        return self._ll.combine(x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish,
                                return_recv_hook, out, combine_wait_recv_cost_stats, branch_kwargs)

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        """The bf16 ``[L, R*T_max, H]`` buffer to write expert outputs into for ``low_latency_combine(...,
        zero_copy=True)`` of ``handle``."""
        self._check_live()
        return self._ll.combine_buffer(handle)


def _check_config(config) -> None:
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a deep_ep.Config or None, got {type(config).__name__}")


def _version() -> str:
    from . import __version__
    return __version__
