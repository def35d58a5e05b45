"""DeepEP's high-throughput (HT) ops over ep's TOKEN_MAJOR layout: get_dispatch_layout, dispatch, combine.

TOKEN_MAJOR is DeepEP's receive layout: one row per (source token, this rank), rows ordered by source rank then
source token, ``topk_ids`` local or -1 in the source's slot order, weights 0 at -1; combine sums the caller's
rows per source token in rank order (fp32, one rounding). What this module adds:
- one host all-gather per uncached dispatch of every rank's token count and ``num_tokens_per_rank``: it lets
  every rank grow ep's buffers together (outside CUDA-graph capture) when a batch is larger than any before
  (DeepEP callers never state a token maximum), and gives the host the received row count;
- counts rounded up to ``expert_alignment`` in Python (ep's rows are never padded in TOKEN_MAJOR);
- ``num_worst_tokens``: no host wait at all (ep's worst_case dispatch on a communicator of
  ``num_worst_tokens // R`` tokens per rank, the same on every rank), so dispatch and combine capture in CUDA
  graphs; rows past the real ones: idx -1, weight 0;
- a dispatch without top-k (``is_token_in_rank`` only) routes each token to one stand-in expert per rank.
"""
from __future__ import annotations

import torch

from ep import CapacityError, DispatchLayout, MoECommunicator, MoECommunicatorConfig

from .streams import StreamPlan, check_stream_args, raw_event, wait_on_host

MIN_TOKENS = 256     # the smallest token capacity built; capacities grow in powers of two


class HtHandle(tuple):
    """DeepEP's 6-tuple intranode handle: [0] rank_prefix_matrix int32 [R, R] (row i: tokens sources 0..i sent
    to each rank), [4] is_token_in_rank; the channel matrices, recv_src_idx and send_head DeepEP keeps for its
    own kernels are None. Valid for as long as it is referenced, across later dispatches."""

    def __new__(cls, rank_prefix_matrix, is_token_in_rank, comm, ep_handle, ids, ep_rows, num_worst, has_topk):
        self = super().__new__(cls, (rank_prefix_matrix, None, None, None, is_token_in_rank, None))
        self.comm, self.ep_handle, self.ids = comm, ep_handle, ids
        # ep_rows: the rows ep's handle takes (the received rows; a worst-case one: R * its tokens per rank)
        self.ep_rows, self.num_worst, self.has_topk = ep_rows, num_worst, has_topk
        return self


def capacity_for(num_tokens: int) -> int:
    return max(MIN_TOKENS, 1 << max(num_tokens - 1, 0).bit_length())


class Intranode:
    """The HT communicators of one Buffer: one per (experts, hidden, top-k), replaced by a larger one when a
    batch outgrows it (the old one stays alive for its handles until the Buffer is destroyed)."""

    def __init__(self, buffer):
        self.buf = buffer
        self.comms: dict = {}
        self.retired: list = []

    def communicator(self, num_experts: int, hidden: int, topk: int, num_tokens: int, worst: int = 0) -> MoECommunicator:
        """The communicator for a batch of ``num_tokens`` on this rank (collective when it is built: every rank
        asks for the same one); ``worst``: a num_worst_tokens dispatch's, of exactly worst // R tokens per rank."""
        key = (num_experts, hidden, topk) + ((worst,) if worst else ())
        comm = self.comms.get(key)
        if comm is not None and (worst or comm.config.max_tokens_per_rank >= num_tokens):
            return comm
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"deep_ep on ep: a dispatch of {num_tokens} tokens needs larger buffers, which cannot "
                               "be allocated during CUDA-graph capture; run one such batch eagerly first")
        per_rank = worst // self.buf.group_size if worst else capacity_for(num_tokens)
        cfg = MoECommunicatorConfig(mode="ht", num_experts=num_experts, hidden_size=hidden, topk=topk,
                                    max_tokens_per_rank=per_rank, num_sms=max(self.buf.num_sms, 2),
                                    output_layout=DispatchLayout.TOKEN_MAJOR)
        new = MoECommunicator(cfg, self.buf._group, backend=self.buf._backend)
        if comm is not None:
            self.retired.append(comm)
        self.comms[key] = new
        return new

    def close(self) -> None:
        for comm in list(self.comms.values()) + self.retired:
            comm.close()
        self.comms.clear()
        self.retired.clear()

    # ---------------------------------------------------------------------------------------- layout
    def get_dispatch_layout(self, topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream):
        check_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        if topk_idx.dim() != 2:
            raise ValueError(f"topk_idx must be [num_tokens, num_topk], got shape {tuple(topk_idx.shape)}")
        R = self.buf.group_size
        if num_experts % R:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the {R} ranks")
        plan = StreamPlan(self.buf._backend, topk_idx.device, previous_event, async_finish)
        with plan.run_on_comm():
            # Device ops only, none of them waits on the host (no boolean indexing, no bincount): capturable.
            valid = topk_idx >= 0
            rank_of = torch.where(valid, topk_idx // (num_experts // R), R)
            ranks = torch.arange(R, device=topk_idx.device, dtype=rank_of.dtype)
            is_token_in_rank = (rank_of.unsqueeze(-1) == ranks).any(dim=1)
            num_tokens_per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int32)
            slots = torch.where(valid, topk_idx, num_experts).reshape(-1).to(torch.int64)
            per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_idx.device)
            per_expert.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))
            num_tokens_per_expert = per_expert[:num_experts]
        event = plan.finish((num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank))
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, event

    # -------------------------------------------------------------------------------------- dispatch
    def dispatch(self, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                 num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens, previous_event,
                 async_finish, allocate_on_comm_stream):
        check_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        if num_tokens_per_rdma_rank is not None:
            raise NotImplementedError("num_tokens_per_rdma_rank: internode dispatch (deep_ep on ep is intranode only)")
        payload, scales = (x if isinstance(x, tuple) else (x, None))
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("a cached dispatch (handle=) takes the handle's routing: pass topk_idx=None and "
                                 "topk_weights=None")
            return self._cached(payload, scales, handle, previous_event, async_finish)
        if (topk_idx is None) != (topk_weights is None):
            raise ValueError("topk_idx and topk_weights are given together or not at all")
        if is_token_in_rank is None or num_tokens_per_rank is None:
            raise ValueError("dispatch without handle= needs num_tokens_per_rank and is_token_in_rank (from "
                             "get_dispatch_layout)")
        R, rank = self.buf.group_size, self.buf.rank
        T, H = payload.shape[0], payload.shape[1]
        has_topk = topk_idx is not None
        if has_topk:
            if num_tokens_per_expert is None:
                raise ValueError("dispatch with topk_idx needs num_tokens_per_expert (from get_dispatch_layout)")
            E, ids, weights = num_tokens_per_expert.numel(), topk_idx, topk_weights
        else:       # no top-k: one stand-in expert per rank carries each (token, rank) row
            E = R
            ranks = torch.arange(R, device=is_token_in_rank.device, dtype=torch.int64)
            ids = torch.where(is_token_in_rank, ranks, torch.full_like(ranks, -1))
            weights = None
        worst = int(num_worst_tokens or 0)
        if worst:
            if worst < R:
                raise ValueError(f"num_worst_tokens ({worst}) must be at least the {R} ranks (it bounds every rank's "
                                 f"tokens by num_worst_tokens // {R})")
            comm = self.communicator(E, H, ids.shape[1], T, worst)
            ep_rows = R * comm.config.max_tokens_per_rank
        else:
            wait_on_host(previous_event)     # the counts below may come from a layout still running
            sent = [int(v) for v in num_tokens_per_rank.tolist()]
            everyone = self.buf._group.allgather((T, sent), "deep_ep dispatch sizes")
            comm = self.communicator(E, H, ids.shape[1], max(t for t, _ in everyone))
            ep_rows = int(sum(s[rank] for _, s in everyone))
        plan = StreamPlan(self.buf._backend, payload.device, previous_event, async_finish)
        try:
            if plan.on_comm:
                out, eh, _ = comm.dispatch_async(payload, ids, weights, scales, previous_event=plan.previous,
                                                 worst_case=bool(worst))
            else:
                out, eh = comm.dispatch(payload, ids, weights, scales, worst_case=bool(worst))
        except CapacityError as exc:
            if not worst:
                raise
            raise CapacityError(f"num_worst_tokens={worst} allows {worst // R} tokens per rank ({R} ranks); this "
                                f"rank has {T}: pass a larger num_worst_tokens") from exc
        with plan.post():
            prefix = out.rank_prefix
            recv_x = _pad_rows(out.tokens, worst)
            recv_scales = None if scales is None else _pad_rows(out.scales, worst)
            recv_idx = recv_w = None
            if has_topk:
                recv_idx = _pad_rows(out.topk_ids.to(topk_idx.dtype), worst, fill=-1)
                recv_w = _pad_rows(out.topk_weights, worst, fill=0)
        counts = [] if worst else [-(-c // expert_alignment) * expert_alignment for c in out.num_tokens_per_expert_host]
        if not has_topk:
            counts = [] if worst else [ep_rows]
        event = plan.finish((recv_x, recv_scales, recv_idx, recv_w, prefix))
        new_handle = HtHandle(prefix, is_token_in_rank, comm, eh, ids, ep_rows, worst, has_topk)
        recv = recv_x if scales is None else (recv_x, recv_scales)
        return recv, recv_idx, recv_w, counts, new_handle, event

    def _cached(self, payload, scales, handle: HtHandle, previous_event, async_finish):
        comm = handle.comm
        plan = StreamPlan(self.buf._backend, payload.device, previous_event, async_finish)
        if plan.on_comm:
            out, _, _ = comm.dispatch_async(payload, handle.ids, None, scales, previous_handle=handle.ep_handle,
                                            previous_event=plan.previous)
        else:
            out, _ = comm.dispatch(payload, handle.ids, None, scales, previous_handle=handle.ep_handle)
        with plan.post():
            recv_x = _pad_rows(out.tokens, handle.num_worst)
            recv_scales = None if scales is None else _pad_rows(out.scales, handle.num_worst)
        event = plan.finish((recv_x, recv_scales))
        return (recv_x if scales is None else (recv_x, recv_scales)), None, None, None, None, event

    # --------------------------------------------------------------------------------------- combine
    def combine(self, x, handle, topk_weights, bias, previous_event, async_finish, allocate_on_comm_stream):
        check_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        if not isinstance(handle, HtHandle):
            raise TypeError(f"handle must come from this package's Buffer.dispatch, got {type(handle).__name__}")
        if bias is not None:
            raise NotImplementedError("combine(bias=...): adding a bias in combine is not supported by deep_ep on ep; "
                                      "add it to the result")
        n = handle.ep_rows
        if handle.num_worst and x.shape[0] == handle.num_worst:
            x = x[:n]
            topk_weights = None if topk_weights is None else topk_weights[:n]
        comm = handle.comm
        plan = StreamPlan(self.buf._backend, x.device, previous_event, async_finish)
        if plan.on_comm:
            result, _ = comm.combine_async(x, handle.ep_handle, topk_weights=topk_weights,
                                           previous_event=plan.previous)
        else:
            result = comm.combine(x, handle.ep_handle, topk_weights=topk_weights)
        combined, weights = result if topk_weights is not None else (result, None)
        return combined, weights, plan.finish()


def _pad_rows(t, rows: int, fill=None):
    """``t`` with ``rows`` rows (0: unchanged); the added rows hold ``fill`` (None: unspecified)."""
    if not rows or t.shape[0] == rows:
        return t
    out = (torch.empty if fill is None else torch.zeros)((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    if fill:
        out.fill_(fill)
    out[:t.shape[0]] = t
    return out
