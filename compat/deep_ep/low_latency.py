"""DeepEP's low-latency (LL) ops over ep's LL mode: low_latency_dispatch / _combine and their buffers.

ep's LL matches DeepEP's contract where callers depend on it: ``recv_x [L, R*T_max, H]`` (bf16, or e4m3 with
per-128-channel scales, float32 or packed UE8M0, token-contiguous), ``recv_count [L]``, weights given at combine
time, a receive hook, no host synchronization (CUDA-graph capturable), two dispatches alive at once. Rows are
ordered by source rank then source token (deterministic, where DeepEP's order is set by atomics). The handle's
``src_info`` / ``layout_range`` ([0], [1]) are computed on the device when first read (ep's row_sources: one
small kernel, off the hot path), while the handle can still be combined. One ep LL communicator serves each
(T_max, hidden, experts, top-k) a Buffer meets.
"""
from __future__ import annotations

import torch

from ep import Fp8Cast, MoECommunicator, MoECommunicatorConfig

from .utils import EventHandle, EventOverlap

# Keywords of DeepEP branches (hybrid-ep, LL single-batch overlap) that callers pass only when they use those
# features: accepted when falsy, else NotImplementedError naming the feature.
DISPATCH_BRANCH_KWARGS = {"use_nvfp4": "NVFP4 LL dispatch", "x_global_scale": "NVFP4 LL dispatch",
                          "use_ue8m0_for_sf": "NVFP4 LL dispatch (UE8M0 scale factors)",
                          "topk_weights": "weights carried by the LL dispatch (hybrid-ep)"}
COMBINE_BRANCH_KWARGS = {name: "single-batch overlap of the LL combine (DeepEP's SBO branches)" for name in
                         ("overlap", "packed_recv_count", "comp_signal", "block_m", "threshold", "num_sms",
                          "src_signals", "src_signal_expect_value")}


def reject_branch_kwargs(table: dict, given: dict, op: str) -> None:
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise TypeError(f"{op}() got unexpected keyword argument(s) {unknown}")
    for name, value in given.items():
        if _truthy(value):
            raise NotImplementedError(f"{op}({name}=...): {table[name]} is not supported by deep_ep on ep")


def _truthy(value) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    return True      # a tensor or any other object asks for the feature


class LLHandle(tuple):
    """DeepEP's 5-tuple LL handle (src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts).
    src_info int32 [L, R*T_max] (the source token of each row) and layout_range int64 [L, R] (per source rank
    ``begin << 32 | count``) are computed when first read, on the current stream (ep keeps the routing on the
    device in its own form); reading them needs the receive hook called and at most one newer dispatch."""

    def __new__(cls, num_max_tokens, hidden, num_experts, comm, ep_handle, parity, num_tokens, topk):
        self = super().__new__(cls, (None, None, num_max_tokens, hidden, num_experts))
        self.comm, self.ep_handle, self.parity = comm, ep_handle, parity
        self.num_tokens, self.topk = num_tokens, topk
        self._sources = None
        return self

    def _row_sources(self) -> tuple:
        if self._sources is None:
            src_info, counts = self.comm.row_sources(self.ep_handle)
            counts = counts.to(torch.int64)
            begin = torch.cumsum(counts, dim=1) - counts
            self._sources = (src_info, (begin << 32) | counts)
        return self._sources

    def __getitem__(self, index):
        if isinstance(index, slice):
            wanted = range(5)[index]
            return tuple(self)[index] if 0 in wanted or 1 in wanted else super().__getitem__(index)
        if index in (0, 1, -5, -4):
            return self._row_sources()[index % 5]
        return super().__getitem__(index)

    def __iter__(self):
        yield from self._row_sources()
        yield from super().__getitem__(slice(2, 5))


class LowLatency:
    """The LL communicators of one Buffer and the combine buffers get_next_low_latency_combine_buffer hands out
    (two per communicator, by dispatch parity, as DeepEP double-buffers its send buffer)."""

    def __init__(self, buffer):
        self.buf = buffer
        self.comms: dict = {}
        self.combine_buffers: dict = {}
        self.dispatches = 0

    def communicator(self, num_max_tokens: int, hidden: int, num_experts: int, topk: int) -> MoECommunicator:
        key = (num_max_tokens, hidden, num_experts, topk)
        comm = self.comms.get(key)
        if comm is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("deep_ep on ep: the first low_latency_dispatch of a shape builds its buffers, "
                                   "which cannot happen during CUDA-graph capture; run one eagerly first")
            cfg = MoECommunicatorConfig(mode="ll", num_experts=num_experts, hidden_size=hidden, topk=topk,
                                        max_tokens_per_rank=num_max_tokens)
            comm = self.comms[key] = MoECommunicator(cfg, self.buf._group, backend=self.buf._backend)
        return comm

    def close(self) -> None:
        for comm in self.comms.values():
            comm.close()
        self.comms.clear()
        self.combine_buffers.clear()

    def dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_local_expert_recv_stats,
                 dispatch_wait_recv_cost_stats, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook,
                 branch_kwargs):
        reject_branch_kwargs(DISPATCH_BRANCH_KWARGS, branch_kwargs, "low_latency_dispatch")
        if dispatch_wait_recv_cost_stats is not None:
            raise NotImplementedError("low_latency_dispatch(dispatch_wait_recv_cost_stats=...): per-rank wait "
                                      "timing is not recorded by deep_ep on ep")
        if async_finish and return_recv_hook:
            raise ValueError("low_latency_dispatch: async_finish and return_recv_hook cannot both be set")
        if use_ue8m0 and not round_scale:
            raise ValueError("low_latency_dispatch: use_ue8m0=True needs round_scale=True")
        if x.dim() != 2 or topk_idx.dim() != 2:
            raise ValueError(f"low_latency_dispatch: x must be [T, H] and topk_idx [T, K], got {tuple(x.shape)} "
                             f"and {tuple(topk_idx.shape)}")
        comm = self.communicator(int(num_max_dispatch_tokens_per_rank), x.shape[1], int(num_experts),
                                 topk_idx.shape[1])
        cast = Fp8Cast(round_scale=bool(round_scale), ue8m0=bool(use_ue8m0)) if use_fp8 else None
        stats = cumulative_local_expert_recv_stats
        hook = None
        event = EventOverlap(None)
        if async_finish:
            out, eh, done = comm.dispatch_async(x, topk_idx, cast=cast, cumulative_counts=stats)
            event = EventOverlap(EventHandle(done), (x, topk_idx))
        elif return_recv_hook:
            out, eh, hook = comm.dispatch(x, topk_idx, cast=cast, cumulative_counts=stats, return_recv_hook=True)
        else:
            out, eh = comm.dispatch(x, topk_idx, cast=cast, cumulative_counts=stats)
        handle = LLHandle(comm.config.max_tokens_per_rank, x.shape[1], int(num_experts), comm, eh,
                          self.dispatches % 2, x.shape[0], topk_idx.shape[1])
        self.dispatches += 1
        recv_x = (out.tokens, out.scales) if use_fp8 else out.tokens
        return recv_x, out.num_tokens_per_expert, handle, event, hook

    def combine_buffer(self, handle: LLHandle):
        """The bf16 ``[L, R*T_max, H]`` buffer a zero-copy combine of ``handle`` reads its expert outputs from."""
        comm = _llhandle(handle).comm
        key = (id(comm), handle.parity)
        buf = self.combine_buffers.get(key)
        if buf is None:
            L, cap = comm.num_local_experts, comm.world_size * comm.config.max_tokens_per_rank
            device = torch.device("cuda", comm.device) if self.buf._backend == "gpu" else torch.device("cpu")
            buf = self.combine_buffers[key] = torch.empty((L, cap, comm.config.hidden_size), dtype=torch.bfloat16,
                                                          device=device)
        return buf

    def combine(self, x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish, return_recv_hook, out,
                combine_wait_recv_cost_stats, branch_kwargs):
        reject_branch_kwargs(COMBINE_BRANCH_KWARGS, branch_kwargs, "low_latency_combine")
        if use_logfmt:
            raise NotImplementedError("low_latency_combine(use_logfmt=True): the LogFMT wire format is not supported "
                                      "by deep_ep on ep (combine moves bf16)")
        if combine_wait_recv_cost_stats is not None:
            raise NotImplementedError("low_latency_combine(combine_wait_recv_cost_stats=...): per-rank wait timing "
                                      "is not recorded by deep_ep on ep")
        if async_finish and return_recv_hook:
            raise ValueError("low_latency_combine: async_finish and return_recv_hook cannot both be set")
        handle = _llhandle(handle)
        if tuple(topk_idx.shape) != (handle.num_tokens, handle.topk) or topk_weights.shape != topk_idx.shape:
            raise ValueError(f"low_latency_combine: topk_idx and topk_weights must be the dispatch's [T, K] = "
                             f"[{handle.num_tokens}, {handle.topk}], got {tuple(topk_idx.shape)} and "
                             f"{tuple(topk_weights.shape)}")
        if zero_copy and x.data_ptr() != self.combine_buffer(handle).data_ptr():
            raise ValueError("low_latency_combine(zero_copy=True): x must be get_next_low_latency_combine_buffer"
                             "(handle)")
        comm = handle.comm
        if out is None:
            out = torch.empty((handle.num_tokens, handle[3]), dtype=torch.bfloat16, device=x.device)
        hook = None
        event = EventOverlap(None)
        if async_finish:
            combined, done = comm.combine_async(x, handle.ep_handle, out=out, weights=topk_weights)
            event = EventOverlap(EventHandle(done), (x, topk_idx, topk_weights))
        elif return_recv_hook:
            combined, hook = comm.combine(x, handle.ep_handle, out=out, weights=topk_weights, return_recv_hook=True)
        else:
            combined = comm.combine(x, handle.ep_handle, out=out, weights=topk_weights)
        return combined, event, hook


def _llhandle(handle) -> LLHandle:
    if not isinstance(handle, LLHandle):
        raise TypeError(f"handle must come from this package's Buffer.low_latency_dispatch, got "
                        f"{type(handle).__name__}")
    return handle
