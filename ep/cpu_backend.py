"""The CPU backend: the whole MoECommunicator API on NumPy, ranks talking over MPI (or torch.distributed).

Each rank sends every destination the tokens routed to it (with their indices, ids and weights), builds
its output with :mod:`ep.reference`, and combine sends the bf16 partials back. Semantics and rounding are
exactly those of the GPU kernels, and so are the rules a program must follow, so model code can be
prototyped and unit-tested without GPUs:
- a cached dispatch (previous_handle) uses the handle's routing with this call's x and weights;
- LL outputs are communicator-owned: a dispatch's tokens and a combine's output are overwritten by the
  next-but-one dispatch / combine (two alternating buffers each);
  a handle can be combined while its dispatch is one of the last two;
- LL treats an invalid expert id as unused and reports it in the next call (EP_DEBUG_CHECKS: this call);
- every op passes the same op gate as on GPUs, so one rank's bad input raises on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import arrays, reference, sizes, validation
from .bootstrap import Group
from .calls import CombineCall, DispatchCall
from .config import DispatchLayout, DispatchOutput, MoECommunicatorConfig
from .errors import InvalidStateError
from .hooks import RecvHook, check_combinable, check_pending
from .runtime_base import Runtime
from .tuning import Tuning


@dataclass
class CpuHandle:
    rows: list            # per source: int64 [n_s, K] row of each slot owned here, -1 otherwise
    recv_weights: list    # per source: float32 [n_s, K]
    sent_index: list      # per destination: token indices this rank sent there
    num_tokens: int
    tokens_shape: tuple
    topk_ids: np.ndarray  # the routing (a cached dispatch reuses it)
    seq: int
    received: list = field(default_factory=lambda: [True])   # LL hooks: [0] the receive hook ran
    rank_prefix: np.ndarray | None = None   # TOKEN_MAJOR: int32 [W, W] (DispatchOutput.rank_prefix)
    recv_tokens: list | None = None   # per source: the token index of each token it sent here
    worst_rows: int = 0   # TOKEN_MAJOR worst case: the output's rows (W * T_max), else 0


class CpuRuntime(Runtime):
    def __init__(self, cfg: MoECommunicatorConfig, group: Group, tuning: Tuning, topology=None):
        self.cfg, self.group, self.tuning = cfg, group, tuning
        # Across nodes the data takes the two-hop path (ep.internode); one node: one flat exchange.
        self.two_hop = None
        if topology is not None and topology.internode:
            from .internode import TwoHopExchange
            self.two_hop = TwoHopExchange(group, topology)
        self.W, self.rank = group.size, group.rank
        self.L = cfg.num_experts // self.W
        self.seq = 0
        self.owned = None       # HT owned_output: the buffer every dispatch's tokens view (first use)
        self.ll_out = {}        # LL: the owned dispatch outputs (by payload, half) and combine output [T_max, H]
        self.ll_comb = None     # [2, T_max, H]: alternating, like the GPU's
        self.combines = 0
        self.pending = {"dispatch": 0, "combine": 0}   # sends waiting for their hook, as on GPUs
        self.waiting = {"dispatch": [], "combine": []}
        self._bad_id: str | None = None
        self.open_gate(tuning.timeout_s)

    def check_handle(self, state: CpuHandle) -> None:
        check_combinable(state.received[0], self.seq - state.seq if self.cfg.mode == "ll" else None)

    def check_pending(self, op: str, hook: bool) -> None:
        check_pending(self.pending, op, hook)

    def signal_ready(self, signals, first: int, count: int, add: int, stream) -> None:
        if stream is not None:
            raise ValueError("signal: the CPU backend takes no stream")
        signals.counters[first:first + count] += np.uint32(add)

    def check_ready(self, signals) -> None:
        counters = np.asarray(signals.counters)
        short = np.flatnonzero(counters < signals.target)
        if short.size:
            e = int(short[0])
            raise arrays.argument_error(
                InvalidStateError, "overlap", f"overlap: local expert {e}'s counter is {int(counters[e])}, below "
                f"its target {signals.target} (and {short.size - 1} more): the GPU combine would wait for the "
                "signal until timeout_s")

    def _hook(self, op: str, done: list, on_recv=None):
        """The CPU backend moves everything in the call: the hook keeps the GPU's rules (and runs ``on_recv``
        where the GPU's receive half would act)."""
        self.pending[op] += 1

        def recv():
            self.pending[op] -= 1
            if on_recv is not None:
                on_recv()
        return RecvHook(recv, done, op, self.waiting[op])

    def same_routing(self, state: CpuHandle, topk_ids) -> bool:
        ids = arrays.to_numpy(topk_ids.obj).astype(np.int64)
        return bool(np.array_equal(ids, state.topk_ids))

    def row_sources(self, state: CpuHandle, framework: str, stream):
        """As the GPU's ll_row_sources, from the handle's receive lists."""
        L, W = self.cfg.num_experts // self.W, self.W
        cap = W * self.cfg.max_tokens_per_rank
        info = np.full((L, cap), -1, np.int32)
        counts = np.zeros((L, W), np.int32)
        for s in range(W):
            for rows, t in zip(state.rows[s], state.recv_tokens[s]):
                for r in np.unique(rows[rows >= 0]):
                    info.flat[r] = t
                    counts[r // cap, s] += 1
        return arrays.from_numpy(info, framework), arrays.from_numpy(counts, framework)

    def take_input_error(self) -> BaseException | None:
        if self._bad_id is None:
            return None
        exc = arrays.argument_error(ValueError, "topk_ids", self._bad_id)
        exc.ep_code_flags = validation.EARLIER
        self._bad_id = None
        return exc

    def _invalid_slots(self, ids: np.ndarray, call: str, outcome: str) -> np.ndarray:
        """The slots of ``ids`` outside [-1, E); the first is kept for the next call to report (take_input_error)."""
        bad = (ids < -1) | (ids >= self.cfg.num_experts)
        if bad.any():
            t, k = (int(v) for v in np.argwhere(bad)[0])
            self._bad_id = (f"an earlier {call} got topk_ids[{t}, {k}] = {int(ids[t, k])} outside "
                            f"[-1, {self.cfg.num_experts}); {outcome}")
        return bad

    def _ll_ids(self, ids: np.ndarray) -> np.ndarray:
        """LL: invalid ids are treated as unused; the first one is reported in the next call."""
        bad = self._invalid_slots(ids, "LL dispatch", "that slot was treated as unused")
        return np.where(bad, -1, ids) if bad.any() else ids

    def _worst_case_ids(self, ids: np.ndarray) -> np.ndarray:
        """A worst-case dispatch, like the GPU's: if any rank's ids are invalid, nothing moves on any rank (every
        slot unused), and the rank that passed them is told in its next call."""
        bad = self._invalid_slots(ids, "worst-case dispatch", "it moved nothing on any rank")
        if not any(self.group.allgather(bool(bad.any()), "cpu worst-case ids")):
            return ids
        return np.full_like(ids, -1)

    def dispatch(self, call: DispatchCall):
        cfg, W = self.cfg, self.W
        framework = call.framework
        xn = arrays.to_numpy(call.x.obj)
        if call.scales is None:
            xn = xn.astype(np.uint16, copy=False)
        if call.previous is not None:
            ids = call.previous.topk_ids
        else:
            ids = arrays.to_numpy(call.topk_ids.obj).astype(np.int64)
        ll = cfg.mode == "ll"
        if ll:
            ids = self._ll_ids(ids)
        elif call.worst_case:
            ids = self._worst_case_ids(ids)
        w = None if call.weights is None else arrays.to_numpy(call.weights.obj).astype(np.float32)
        scales = None
        if call.fp8:   # LL cast: the e4m3 rows and their scales travel instead of the bf16 rows
            xn, scales = reference.fp8_cast(xn, round_scale=call.fp8 >= 2, ue8m0=call.fp8 == 3)
        elif call.scales is not None:   # HT: a byte payload and its scales travel as they are
            scales = arrays.to_numpy(call.scales.obj)
        if self.two_hop is not None:
            received = self.two_hop.dispatch(xn, ids, w, cfg.num_experts, scales)
        else:
            slices = [reference.slice_for_rank(self.rank, d, xn, ids, w, cfg.num_experts, W, scales) for d in range(W)]
            received = self.group.alltoall(slices, "cpu dispatch")
        token_major = cfg.layout is DispatchLayout.TOKEN_MAJOR
        routed = reference.routed_ranks(ids, cfg.num_experts, W)
        worst_rows = rank_prefix = None
        if token_major:
            res = reference.dispatch_receive_token_major(received, self.rank, cfg.num_experts, W, cfg.expert_alignment)
            previous = call.previous
            if previous is not None:
                rank_prefix, worst_rows = previous.rank_prefix, previous.worst_rows
            else:
                sent_counts = self.group.allgather(routed.sum(axis=0).astype(np.int64), "cpu rank prefix")
                rank_prefix = np.cumsum(np.array(sent_counts).reshape(W, W), axis=0).astype(np.int32)
                worst_rows = sizes.worst_case_rows(cfg, W) if call.worst_case else 0
            if worst_rows:
                res = reference.pad_token_major(res, worst_rows)
        else:
            layout_kind = DispatchLayout.EXPERT_MAJOR if (ll or cfg.layout is DispatchLayout.EXPERT_MAJOR) \
                else DispatchLayout.FLAT
            capacity = W * cfg.max_tokens_per_rank if ll else None
            res = reference.dispatch_receive(received, self.rank, cfg.num_experts, W, cfg.hidden_size,
                                             cfg.expert_alignment, layout_kind, capacity)
        tokens = res.tokens
        if ll and cfg.layout is DispatchLayout.FLAT:
            tokens = tokens.reshape(-1, cfg.hidden_size)
        like = call.x.obj
        if call.output_buffer is not None:
            target = arrays.to_numpy(call.output_buffer.obj)
            target[...] = res.tokens.reshape(target.shape)
            buf = call.output_buffer.obj
            tokens_out = buf if cfg.layout is not DispatchLayout.FLAT else buf.reshape(tokens.shape)
        elif ll:   # like the GPU: two owned buffers, alternating, so a dispatch is overwritten by the next but one
            key = (res.tokens.dtype.str, (self.seq) & 1)
            if key not in self.ll_out:
                self.ll_out[key] = np.empty(res.tokens.shape, res.tokens.dtype)
            self.ll_out[key][...] = res.tokens
            view = self.ll_out[key].reshape(tokens.shape)
            if call.fp8:
                tokens_out = arrays.from_numpy(view, framework, fp8=True)
            else:
                tokens_out = arrays.from_numpy(view, framework, bf16=True, like=like)
        elif cfg.owned_output:   # like the GPU: a view of one buffer, overwritten by the next dispatch
            if self.owned is None:
                self.owned = np.empty((sizes.owned_output_rows(cfg, W), cfg.hidden_size), np.uint16)
            view = self.owned[:tokens.shape[0]]
            view[...] = tokens
            tokens_out = arrays.from_numpy(view, framework, bf16=True, like=like)
        else:
            tokens_out = arrays.from_numpy(tokens, framework, bf16=call.scales is None, like=like)
        self.seq += 1
        out_scales = None
        if res.scales is not None:
            mn = ll or cfg.scale_layout == "mn_major"
            out_scales = scale_output(res.scales, mn, framework, like=None if call.scales is None else call.scales.obj)
        if call.cumulative_counts is not None:
            acc = arrays.to_numpy(call.cumulative_counts.obj)
            acc += res.counts.astype(acc.dtype)
        tm_ids = tm_w = None
        if token_major:
            tm_ids = arrays.from_numpy(res.topk_ids, framework)
            tm_w = arrays.from_numpy(res.topk_weights, framework)
        out = DispatchOutput(
            tokens=tokens_out,
            num_tokens_per_expert=arrays.from_numpy(res.counts.astype(np.int32), framework),
            num_tokens_per_expert_host=None if ll or worst_rows else [int(c) for c in res.counts],
            expert_offsets=arrays.from_numpy(res.offsets.astype(np.int64), framework),
            layout=cfg.layout, scales=out_scales, topk_ids=tm_ids, topk_weights=tm_w,
            rank_prefix=None if rank_prefix is None else arrays.from_numpy(rank_prefix, framework))
        sent = [np.nonzero(routed[:, d])[0].astype(np.int64) for d in range(W)]   # my tokens each rank got
        shape = tokens.shape[:-1] + (cfg.hidden_size,)   # what combine takes: bf16 rows
        handle = CpuHandle(res.rows, [sl.weights for sl in received], sent, ids.shape[0], tuple(shape), ids, self.seq,
                           rank_prefix=rank_prefix, worst_rows=worst_rows or 0,
                           recv_tokens=[np.asarray(sl.token_index) for sl in received])
        hook = None
        if call.recv_hook:
            handle.received = [False]
            hook = self._hook("dispatch", handle.received)
        return out, handle, hook

    def combine(self, call: CombineCall):
        cfg = self.cfg
        handle: CpuHandle = call.state
        y = arrays.to_numpy(call.expert_output.obj).reshape(-1, cfg.hidden_size)
        if cfg.layout is DispatchLayout.TOKEN_MAJOR:
            return self._combine_token_major(call, handle, y)
        recv_w = handle.recv_weights
        if call.weights is not None:   # combine-time weights: each source's go to its tokens' expert ranks first
            w = arrays.to_numpy(call.weights.obj).astype(np.float32)
            recv_w = self.group.alltoall([w[handle.sent_index[d]] for d in range(self.W)], "cpu combine weights")
        partials = [reference.expert_partials(y, handle.rows[s], recv_w[s]) for s in range(self.W)]
        back = self._return(partials)
        parts = [(handle.sent_index[d], back[d]) for d in range(self.W)]
        result = reference.combine_partials(handle.num_tokens, cfg.hidden_size, parts)

        def release():   # as the GPU's last receive block does, once every row is read
            if call.ready is not None:
                call.ready.obj[...] -= np.uint32(call.ready_target)
        if call.recv_hook:
            hook = self._hook("combine", [False], release)
        else:
            hook = None
            release()
        if call.out is not None:
            arrays.to_numpy(call.out.obj)[...] = result
            return call.out.obj, hook
        if cfg.mode == "ll":   # like the GPU: two owned buffers, alternating
            if self.ll_comb is None:
                self.ll_comb = np.empty((2, cfg.max_tokens_per_rank, cfg.hidden_size), np.uint16)
            self.combines += 1
            view = self.ll_comb[self.combines & 1][:handle.num_tokens]
            view[...] = result
            return arrays.from_numpy(view, call.framework, bf16=True, like=call.expert_output.obj), hook
        return arrays.from_numpy(result, call.framework, bf16=True, like=call.expert_output.obj), hook

    def _return(self, payloads: list) -> list:
        """Combine's exchange: payloads[s] goes to source rank s; returns what each expert rank sent here."""
        if self.two_hop is not None:
            return self.two_hop.combine(payloads)
        return self.group.alltoall(payloads, "cpu combine")

    def _combine_token_major(self, call: CombineCall, handle: CpuHandle, y: np.ndarray):
        """The caller's rows are the partials: each goes back to its source, which sums them in rank order."""
        cfg = self.cfg
        w = None if call.topk_weights is None else arrays.to_numpy(call.topk_weights.obj)
        back = self._return([(y[handle.rows[s]], None if w is None else w[handle.rows[s]]) for s in range(self.W)])
        parts = [(handle.sent_index[d], back[d][0]) for d in range(self.W)]
        wparts = None if w is None else [back[d][1] for d in range(self.W)]
        result, wsum = reference.combine_token_major(handle.num_tokens, cfg.hidden_size, parts, wparts, cfg.topk)
        if call.out is not None:
            arrays.to_numpy(call.out.obj)[...] = result
            out = call.out.obj
        else:
            out = arrays.from_numpy(result, call.framework, bf16=True, like=call.expert_output.obj)
        if wsum is not None:
            return (out, arrays.from_numpy(wsum, call.framework)), None
        return out, None


def scale_output(scales: np.ndarray, mn_major: bool, framework: str, like=None):
    """Received scales ``[rows, S]`` (or ``[L, cap, S]``) as the GPU lays them out: row-major, or MN-major:
    token-contiguous with the token stride padded to a multiple of 4 (a view of ``[S, rows4]``, or of
    ``[L, S, cap4]``). ``like``: the caller's scale array, whose dtype the result takes (torch FP8)."""
    if not mn_major:
        return arrays.from_numpy(np.ascontiguousarray(scales), framework, like=like)
    rows = scales.shape[-2]
    rows4 = -(-rows // 4) * 4
    buf = np.zeros(scales.shape[:-2] + (scales.shape[-1], rows4), scales.dtype)
    buf[..., :rows] = np.swapaxes(scales, -1, -2)
    t = arrays.from_numpy(buf, framework, like=like)
    if framework == arrays.TORCH:
        return t[..., :rows].transpose(-1, -2)
    return np.swapaxes(t[..., :rows], -1, -2)
