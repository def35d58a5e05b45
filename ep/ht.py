"""HT mode on GPUs: buffers and the launch sequence of a dispatch and a combine.

Uncached dispatch:  ht_route_count -> ht_route_exchange -> ht_route_positions (queued), host waits once on
                    the mapped pinned epoch to size the outputs exactly, then ht_dispatch (which also writes
                    the call's counts and offsets, as for a cached dispatch).
Worst case (TOKEN_MAJOR, worst_case=True): the same kernels without the host wait: the outputs have the
                    most rows a rank can receive (W * T_max; ht_dispatch marks the rows past the received ones
                    -1 / 0), and the exchange takes its epoch from a device counter, so the whole dispatch and
                    its combines (ht_token_major_push instead of host-sized copies) replay in CUDA graphs. A
                    rank's invalid topk_ids make every rank's ht_dispatch move nothing (its outputs: no rows,
                    zero counts); the exchange records them in input_err, which the next call reports
                    (take_input_error; a graph replay's too). The count slots are double-buffered, since
                    nothing else orders back-to-back exchanges then (cuda_src/ht_layout.cu).
Cached dispatch:    (ep_barrier if the previous op was a dispatch, or always with an owned output)
                    -> ht_dispatch, with the handle's layout.
Owned output (config owned_output): ht_dispatch's senders write each token straight into its first expert
                    row of the destination's owned output (the exchange tells every rank every rank's layout)
                    instead of the data buffer, and receivers copy it from there to the token's other experts.
                    The output stays valid until this rank's next dispatch: a peer's dispatch writes into it
                    only after a rendezvous this rank reaches once its earlier queued work is done, the
                    count exchange (uncached) or the barrier that a cached dispatch then always queues. (The
                    combine's own barrier does not do: a peer past it may start its next cached dispatch
                    while this rank's gather still reads its own tokens' rows, which may be the output.)
Combine (HtTuning.combine = "push", default): ht_combine_reduce once per peer (the next rank first), each followed by a
                    copy-engine copy of that peer's partials into its landing buffer on a side stream, then once for
                    our own tokens (under the last copy) -> join -> ep_barrier -> ht_combine_sum (local: our
                    landing buffer and our own partials). The copies first wait for an ep_barrier run on another
                    side stream under the first reduce: every peer has finished its previous combine's sum, the
                    last reader of its landing buffer, so the push combine needs no conditional barrier.
Combine ("pull"): (ep_barrier if the previous op was a combine) -> ht_combine_reduce (peers' tokens)
                    -> ep_barrier -> ht_combine_gather (pulls the peers' partials, folds our own tokens').
Why the conditional barriers: a rank's data buffer region [s] is written by s (dispatch) and by itself
(combine partials) and read by itself (expansion, push copies) and, pulling, by s (gather). After a combine
every peer has finished reading, and the count exchange of an uncached dispatch is itself a rendezvous; only
back-to-back cached dispatches or back-to-back pull combines need an explicit one. Once a CUDA graph has been captured (cached
dispatches and combines can be: no host wait), the host no longer knows what ran before, so the barrier is
always queued. The kernels keep their sequence numbers on the device (dispatch epoch, barrier generation),
so graph replays and eager calls interleave freely.
The push combine's copies run on the copy engines, so the reducing SMs never stall on remote stores.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import arrays, constants, sizes, structs, validation
from .bootstrap import Group
from .calls import CombineCall, DispatchCall
from .config import DispatchLayout, DispatchOutput, MoECommunicatorConfig
from .errors import EPError, PeerInputError
from .peer_memory import ErrorRecord, HostMapped, SymmetricBuffer, host_wait
from .runtime_base import Barrier, GpuRuntime, load_kernels, ptr
from .tuning import Tuning, dispatch_static_smem

log = logging.getLogger("ep.ht")

INT_MAX = 2**31 - 1


@dataclass
class Routing:
    """Layout of one routing, reusable by a cached dispatch (previous_handle)."""

    workspace: Any           # one int32 allocation: route [T, K], slot_idx [T, K], send_pos [T, W], info
    send_pos_ptr: int
    info_ptr: int
    counts_host: list
    total_rows: int
    capacity: int
    n_recv: int
    recv_prefix: list        # [W + 1]: the received items of source s are [recv_prefix[s], recv_prefix[s + 1])
    num_tokens: int
    topk_ids_copy: Any       # int32 [T, K] on the device, only with EP_DEBUG_CHECKS
    dispatch_params: Any     # ht_dispatch params of this routing, per-call fields zero: each dispatch fills a copy
    rank_prefix: Any         # int32 [W, W] device view of info's rank_prefix (TOKEN_MAJOR outputs show it)
    worst: bool = False      # a worst-case routing: the host knows none of the counts (counts_host None)
    combine_params: Any = None   # ht_combine params of this routing, per-handle and per-call fields zero


@dataclass
class HtHandle:
    routing: Routing
    recv_lists: Any          # int32 [2, n_recv, K]: recv_rows, then recv_w (float32 bits); written by ht_dispatch
    tokens_shape: tuple
    combine_params: Any      # ht_combine params of this handle, expert_out/out zero: each combine fills a copy


class HtRuntime(GpuRuntime):
    def __init__(self, cfg: MoECommunicatorConfig, group: Group, tuning: Tuning):
        import cupy
        self.cfg, self.group, self.tuning = cfg, group, tuning
        plan = self.plan = tuning.ht
        self.W, self.rank = group.size, group.rank
        self.L = cfg.num_experts // self.W
        self.combine_push = plan.combine == "push"
        self.layout = sizes.ht_layout(cfg, self.W, self.combine_push)
        self.row_bytes = sizes.row_bytes(cfg)
        self.meta_stride = sizes.meta_stride(cfg.topk)
        self.timeout_ns = tuning.timeout_ns
        self._bufs = []
        self.data = self._sym(self.layout.data_bytes, "ht.data")
        self.meta = self._sym(self.layout.meta_bytes, "ht.meta")
        self.sig = self._sym(self.layout.sig_bytes, "ht.sig")
        # Owned dispatch output (config owned_output): peers write received rows straight into it.
        self.owned = self._sym(self.layout.out_bytes, "ht.out") if cfg.owned_output else None
        self._owned_views: dict = {}
        # Where peer d's partials of our tokens lie (row send_pos[t][d]). Push combine: region d of our landing
        # buffer, copied there by d, and our own in region `rank` of our data buffer; pull: region `rank` of d's
        # data buffer, read by the gather over NVLink.
        region = cfg.max_tokens_per_rank * self.row_bytes
        if self.combine_push:
            self.land = self._sym(self.layout.land_bytes, "ht.land")
            bases = [self.land.ptr + d * region for d in range(self.W)]
            bases[self.rank] = self.data.ptr + self.rank * region
            # Side streams: [0] runs the barrier in front of the copies, [step] the copies to the step-th next
            # rank. Events: start, barrier done, one per peer's reduce, one per side stream to join.
            self.side_streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(self.W)]
            self.events = [cupy.cuda.Event(disable_timing=True) for _ in range(2 * self.W + 1)]
        else:
            self.land = None
            bases = [p + self.rank * region for p in self.data.peer_ptrs]
        self.partial_peers = cupy.asarray(np.array(bases, dtype=np.uint64))
        self.token_major = cfg.layout is DispatchLayout.TOKEN_MAJOR
        self.wland = None
        if self.token_major:   # the weights a TOKEN_MAJOR combine sums land next to the rows
            self.wland = self._sym(self.layout.wland_bytes, "ht.wland")
            wregion = cfg.max_tokens_per_rank * cfg.topk * 4
            self.w_peers = cupy.asarray(np.array([self.wland.ptr + d * wregion for d in range(self.W)], np.uint64))
        self.err = ErrorRecord()
        # ht_dispatch's receive-item counter and done count (reset by the kernel) and its epoch, the count of
        # dispatches run (advanced by the kernel, so CUDA graph replays advance it too).
        self.item_ctr = cupy.zeros(3, np.uint64)
        # The count exchanges run, advanced by ht_route_exchange (graph replays advance it too).
        self.epoch_ctr = cupy.zeros(1, np.uint64)
        # This rank's first invalid topk_ids of a worst-case dispatch (sticky until take_input_error reads it).
        self.input_err = ErrorRecord()
        # The routing kernels' scratch, kept across calls: `bad` (the first invalid slot; INT_MAX = none, reset
        # by ht_route_exchange once read), then chunk_cnt [chunks, E + W] (fully rewritten by ht_route_count).
        max_chunks = -(-cfg.max_tokens_per_rank // constants.ROUTE_CHUNK)
        self.route_scratch = cupy.full(1 + max_chunks * (cfg.num_experts + self.W), INT_MAX, np.int32)
        info_lay = self.info_lay = sizes.info_layout(self.L, self.W)
        self.info_size = info_lay["size"]
        # The host mirror: info up to peer_row (the host never reads the peers' layout), then bad index, value.
        self.host = HostMapped(8 + 4 * info_lay["host_size"])
        self.host_epoch = self.host.view(np.uint64, 1)
        self.host_info = self.host.view(np.int32, info_lay["host_size"], offset=8)
        # Routing kernels' params, per-call fields zero: each uncached dispatch fills a copy.
        bad = ptr(self.route_scratch)
        self.route_params = structs.pack(
            structs.HT_ROUTE_PARAMS, topk_ids=0, route=0, slot_idx=0, send_pos=0, chunk_cnt=bad + 4, bad=bad, info=0,
            host_epoch=self.host.ptr, host_info=self.host.ptr + 8, sig_peers=ptr(self.sig.table), err=self.err.ptr,
            epoch_ctr=ptr(self.epoch_ctr), input_err=self.input_err.ptr, epoch=0, timeout_ns=self.timeout_ns,
            cnt_offset=self.layout.cnt_offset, cnt_stride=self.layout.cnt_stride, ids_64=0, rank=self.rank, world=self.W, num_tokens=0, topk=cfg.topk, num_experts=cfg.num_experts,
            local_experts=self.L, nchunks=0, alignment=cfg.expert_alignment,
            expert_major=int(cfg.layout is DispatchLayout.EXPERT_MAJOR), record_invalid=0)
        self.k = load_kernels(group, tuning.kernels)
        static = self.k["ht_dispatch"].static_smem
        if static > dispatch_static_smem(plan.dispatch_warps):
            raise EPError(f"ht_dispatch uses {static} bytes of static shared memory, more than ep.tuning budgets "
                          f"({dispatch_static_smem(plan.dispatch_warps)}): update dispatch_static_smem")
        self.barrier = Barrier(self.k["ep_barrier"], self.sig, self.layout.barrier_offset, self.err, self.rank,
                               self.W, self.timeout_ns)
        self.exchange_seq = 0   # the host's number of its latest count exchange (published in host_epoch)
        self.last_op = None     # "dispatch" / "combine" as the host queued them, until a CUDA graph is captured
        self.graphs = False     # a graph was captured: its replays may run anywhere, so every barrier is kept
        self._cupy = cupy
        cupy.cuda.runtime.deviceSynchronize()   # the initial values above are in place before any stream uses them
        self.open_gate(tuning.timeout_s)

    def take_input_error(self) -> BaseException | None:
        """This rank's invalid topk_ids of an earlier worst-case dispatch (eager or replayed; that dispatch moved
        nothing on any rank), as the exchange recorded them; None otherwise."""
        if not self.input_err.raised():
            return None
        f = self.input_err.fields()
        self.input_err.clear()
        flat, K = int(f["peer"]), self.cfg.topk
        value = int(np.uint64(f["observed"]).view(np.int64))
        exc = arrays.argument_error(ValueError, "topk_ids", f"an earlier worst-case dispatch got topk_ids[{flat // K}, "
                                    f"{flat % K}] = {value} outside [-1, {self.cfg.num_experts}); it moved nothing "
                                    "on any rank")
        exc.ep_code_flags = validation.EARLIER
        return exc

    def _sym(self, nbytes: int, name: str) -> SymmetricBuffer:
        buf = SymmetricBuffer(self.group, nbytes, name)
        self._bufs.append(buf)
        return buf

    def same_routing(self, state: "HtHandle", topk_ids) -> bool:
        """EP_DEBUG_CHECKS: whether ``topk_ids`` (ArrayInfo) equal the routing of the handle (a device
        compare and a host wait)."""
        return bool((_as_cupy(topk_ids.obj).astype(np.int32) == state.routing.topk_ids_copy).all())

    def _note_capture(self, stream) -> None:
        if not self.graphs and stream.is_capturing():
            self.graphs = True

    def _barrier_after(self, op: str, stream) -> None:
        """The barrier that back-to-back cached dispatches or back-to-back combines need (module doc). The host
        knows the previous op only while no CUDA graph exists: once one is captured, its replays can put
        anything before this op, so the barrier is always queued (and inside a capture as well). A cached
        dispatch into an owned output always queues it: peers write into this rank's output (module doc)."""
        self._note_capture(stream)
        if self.graphs or self.last_op == op or (op == "dispatch" and self.owned is not None):
            self.barrier(stream)

    # ---------------------------------------------------------------------------------- dispatch
    def _route_start(self, call: DispatchCall) -> tuple:
        """Queue the routing kernels and pack the dispatch params; returns what _route_finish needs."""
        W, K, E = self.W, self.cfg.topk, self.cfg.num_experts
        T, stream, ids = call.num_tokens, call.stream, call.topk_ids
        nchunks = -(-T // constants.ROUTE_CHUNK)
        # One allocation for the routing's arrays (in the caller's framework: inside a torch CUDA graph capture
        # it comes from the graph's pool and lives as long as the graph); ht_route_exchange writes all of info.
        n_route, n_pos = max(T, 1) * K, max(T, 1) * W
        workspace, route = arrays.empty(call.framework, (2 * n_route + n_pos + self.info_size,), "int32", stream)
        slot_idx = route + 4 * n_route
        send_pos = slot_idx + 4 * n_route
        info = send_pos + 4 * n_pos
        at = 2 * n_route + n_pos + self.info_lay["rank_prefix"]
        rank_prefix = workspace[at:at + W * W].reshape(W, W)
        self.exchange_seq += 1
        rows = sizes.worst_case_rows(self.cfg, W) if call.worst_case else 0
        ids_ptr, ids_64 = ids.ptr, ids.dtype == "int64"
        params = self.route_params.update(topk_ids=ids_ptr, route=route, slot_idx=slot_idx, send_pos=send_pos,
                                info=info, epoch=self.exchange_seq, ids_64=int(ids_64), num_tokens=T, nchunks=nchunks,
                                record_invalid=int(call.worst_case))
        if nchunks:
            self.k["ht_route_count"].launch(nchunks, constants.ROUTE_CHUNK, params, smem=4 * (E + W), stream=stream)
        self.k["ht_route_exchange"].launch(1, 1024, params, smem=4 * (E + W), stream=stream)
        if nchunks:
            self.k["ht_route_positions"].launch(
                nchunks, constants.ROUTE_CHUNK, params,
                smem=4 * (constants.ROUTE_CHUNK // 32) * min(E + W, constants.ROUTE_POS_TILE), stream=stream)
        dispatch_params = self._dispatch_params(route, slot_idx, send_pos, info, T, rows)
        return workspace, send_pos, info, T, self.exchange_seq, dispatch_params, rank_prefix

    def _topk_ids_copy(self, topk_ids: arrays.ArrayInfo, stream):
        """EP_DEBUG_CHECKS: the routing's ids, copied on the dispatch's stream (a worst-case dispatch may be
        inside a CUDA-graph capture of that stream)."""
        if not self.tuning.debug_checks:
            return None
        with stream:
            return _as_cupy(topk_ids.obj).astype(np.int32)

    def _route_worst(self, pending: tuple, topk_ids: arrays.ArrayInfo, stream) -> Routing:
        """The layout of a worst-case dispatch: device arrays only, nothing waited for."""
        workspace, send_pos, info, T, _, dispatch_params, rank_prefix = pending
        routing = Routing(workspace, send_pos, info, None, 0, 0, sizes.worst_case_rows(self.cfg, self.W), None, T,
                          self._topk_ids_copy(topk_ids, stream), dispatch_params, rank_prefix, worst=True)
        routing.combine_params = self._combine_params(routing)
        return routing

    def _route_finish(self, pending: tuple, topk_ids: arrays.ArrayInfo, stream) -> Routing:
        """Wait for the count exchange of _route_start and return the layout."""
        workspace, send_pos, info, T, epoch, dispatch_params, rank_prefix = pending
        W, L, K, E = self.W, self.L, self.cfg.topk, self.cfg.num_experts
        # The host bound exceeds the device bound so the kernel reports first, with rank/peer details.
        host_wait(lambda: int(self.host_epoch[0]) == epoch, 2 * self.timeout_ns / 1e9 + 1.0, "ht count exchange", self.err)
        lay = self.info_lay
        hi = self.host_info.copy()
        invalid = int(hi[lay["invalid_mask"]])
        if invalid:
            self.last_op = None   # the exchange was a rendezvous of every rank, and nothing else was launched
            if invalid >> self.rank & 1:
                flat = int(hi[lay["host_bad"]])   # the mirror's value is narrowed to int32: read the id as given
                value = int(_as_cupy(topk_ids.obj)[flat // K, flat % K].item())
                raise arrays.argument_error(ValueError, "topk_ids", f"topk_ids[{flat // K}, {flat % K}] = {value} is "
                                                                    f"outside [-1, {E}); nothing was sent")
            bad_ranks = [r for r in range(W) if invalid >> r & 1]
            raise PeerInputError(f"rank(s) {bad_ranks} passed invalid topk_ids (ValueError in argument topk_ids) to "
                                 "this dispatch; nothing was sent and the communicator stays usable")
        counts = hi[lay["counts"]:lay["counts"] + L].tolist()
        prefix = hi[lay["recv_prefix"]:lay["recv_prefix"] + W + 1].tolist()
        routing = Routing(workspace, send_pos, info, counts, int(hi[lay["total_rows"]]), int(hi[lay["capacity"]]),
                          int(hi[lay["n_recv_total"]]), prefix, T, self._topk_ids_copy(topk_ids, stream),
                          dispatch_params, rank_prefix)
        routing.combine_params = self._combine_params(routing)
        return routing

    def dispatch(self, call: DispatchCall):
        # Everything up to a launch runs while the GPU may be idle: keep it lean.
        cfg, L, K, H = self.cfg, self.L, self.cfg.topk, self.cfg.hidden_size
        T, stream, framework = call.num_tokens, call.stream, call.framework
        ids_info, x_info, w_info = call.topk_ids, call.x, call.weights
        counts_specs = [((L + 1,), "int64"), ((L,), "int32")]   # expert_offsets, num_tokens_per_expert
        previous = call.previous
        if previous is None:
            pending = self._route_start(call)
            # While the routing kernels run: the outputs whose size does not depend on the exchange.
            (offsets, offsets_ptr), (counts_dev, counts_ptr) = arrays.empty_many(framework, counts_specs, stream)
            if call.worst_case:
                self._note_capture(stream)
                routing = self._route_worst(pending, ids_info, stream)
            else:
                routing = self._route_finish(pending, ids_info, stream)
        else:
            routing = previous.routing
            self._barrier_after("dispatch", stream)
        payload = x_info.shape[1]                           # elements of a row: H for bf16, its width otherwise
        if cfg.layout is DispatchLayout.EXPERT_MAJOR:
            rows_shape = (L, routing.capacity)
        elif self.token_major:
            rows_shape = (routing.n_recv,)
        else:
            rows_shape = (routing.total_rows,)
        shape = rows_shape + (payload,)
        # Receive lists sized exactly (a handle keeps them until it is dropped), in the caller's framework like
        # the outputs: inside a torch CUDA graph capture they come from the graph's memory pool too.
        n = max(routing.n_recv, 1)
        specs = [((2, n, K), "int32")] + ([] if previous is None else counts_specs)
        scale_spec = self._scale_spec(call, rows_shape, routing) if call.scales is not None else None
        if scale_spec is not None:
            specs.append((scale_spec["alloc"], call.scales.obj.dtype))
        if self.owned is None:
            specs.append((shape, "bf16" if call.scales is None else x_info.obj.dtype))
        (recv_lists, rows_ptr), *rest = arrays.empty_many(framework, specs, stream)
        if self.owned is None:
            tokens, tokens_ptr = rest.pop()
        else:
            tokens, tokens_ptr = self._owned_view(framework, shape[0]), self.owned.ptr
        out_scales = scale_fields = None
        if scale_spec is not None:
            sc_arr, sc_ptr = rest.pop()
            out_scales, scale_fields = self._scale_outputs(sc_arr, sc_ptr, scale_spec, call)
        if previous is not None:
            (offsets, offsets_ptr), (counts_dev, counts_ptr) = rest
        w_ptr = rows_ptr + 4 * n * K
        # The dispatch kernel writes counts and offsets from the routing's info (fresh arrays every call).
        params = routing.dispatch_params.update(x=x_info.ptr, weights=0 if w_info is None else w_info.ptr, out=tokens_ptr,
            recv_rows=rows_ptr, recv_w=w_ptr, counts_out=counts_ptr, expert_offsets=offsets_ptr,
            **({} if scale_fields is None else scale_fields))
        self.k["ht_dispatch"].launch(self.plan.dispatch_blocks, self.plan.dispatch_warps * 32, params,
                                     smem=self.plan.dispatch_smem, stream=stream)
        self.last_op = "dispatch"
        tm_ids = tm_w = None
        if self.token_major:   # the receive lists are the rows' local experts and weights
            tm_ids = recv_lists[0][:routing.n_recv]
            tm_w = recv_lists[1][:routing.n_recv].view(arrays.dtype_of(framework, "float32"))
        out = DispatchOutput(
            tokens=tokens,
            num_tokens_per_expert=counts_dev,
            num_tokens_per_expert_host=None if routing.worst else list(routing.counts_host),
            expert_offsets=offsets,
            layout=cfg.layout, scales=out_scales, topk_ids=tm_ids, topk_weights=tm_w,
            rank_prefix=routing.rank_prefix if self.token_major else None)
        combine_shape = rows_shape + (H,)   # combine takes bf16 rows whatever the payload
        combine_params = routing.combine_params.update(recv_rows=rows_ptr, recv_w=w_ptr)   # a combine adds two more
        return out, HtHandle(routing, recv_lists, combine_shape, combine_params), None

    def _scale_spec(self, call: DispatchCall, rows_shape: tuple, routing: Routing) -> dict:
        """Shape and strides of the output scales (MoECommunicatorConfig.scale_layout)."""
        S, elem = call.scales.shape[1], call.scales.itemsize
        mn = self.cfg.scale_layout == "mn_major"
        if len(rows_shape) == 2:   # EXPERT_MAJOR [L, cap, S]
            L, cap = rows_shape
            cap4 = sizes.round_up(max(cap, 1), 4)
            if mn:
                return {"alloc": (L, S, cap4), "view": "em_mn", "block": max(cap, 1), "block_stride": S * cap4 * elem,
                        "row_stride": elem, "col_stride": cap4 * elem, "S": S}
            return {"alloc": (L, cap, S), "view": None, "block": INT_MAX, "block_stride": 0,
                    "row_stride": S * elem, "col_stride": elem, "S": S}
        rows = rows_shape[0]
        if mn:
            rows4 = sizes.round_up(max(rows, 1), 4)
            return {"alloc": (S, rows4), "view": "mn", "rows": rows, "block": INT_MAX, "block_stride": 0,
                    "row_stride": elem, "col_stride": rows4 * elem, "S": S}
        return {"alloc": (rows, S), "view": None, "block": INT_MAX, "block_stride": 0, "row_stride": S * elem,
                "col_stride": elem, "S": S}

    def _scale_outputs(self, arr, ptr_, spec: dict, call: DispatchCall):
        """(the caller's view of the output scales, the dispatch params that describe them)."""
        view = arr
        torch_fw = call.framework == arrays.TORCH
        if spec["view"] == "mn":
            view = arr[:, :spec["rows"]].transpose(0, 1) if torch_fw else arr[:, :spec["rows"]].T
        elif spec["view"] == "em_mn":
            cap = arr.shape[2] if spec["block"] == INT_MAX else spec["block"]
            view = arr[:, :, :cap].transpose(1, 2) if torch_fw else arr[:, :, :cap].transpose(0, 2, 1)
        t_stride, c_stride = call.scales.strides()
        fields = dict(scales=call.scales.ptr, out_scales=ptr_, scale_stride_t=t_stride, scale_stride_c=c_stride,
                      out_scale_block_stride=spec["block_stride"], out_scale_row_stride=spec["row_stride"],
                      out_scale_col_stride=spec["col_stride"], row_bytes=call.x.shape[1] * call.x.itemsize,
                      scale_count=spec["S"], scale_elem=call.scales.itemsize,
                      scale_slot_off=sizes.round_up(call.x.shape[1] * call.x.itemsize, 16), out_scale_block=spec["block"])
        return view, fields

    def _dispatch_params(self, route: int, slot_idx: int, send_pos: int, info: int, T: int, pad_rows: int):
        """ht_dispatch params of one routing (device pointers of its arrays); the per-call fields (inputs,
        outputs) are zero until a dispatch updates them. pad_rows: a worst-case routing's output rows."""
        cfg = self.cfg
        return structs.pack(
            structs.HT_DISPATCH_PARAMS, x=0, weights=0, route=route, slot_idx=slot_idx,
            send_pos=send_pos, info=info, data_peers=ptr(self.data.table), meta_peers=ptr(self.meta.table),
            sig_peers=ptr(self.sig.table), out=0, out_peers=0 if self.owned is None else ptr(self.owned.table),
            recv_rows=0, recv_w=0, item_ctr=ptr(self.item_ctr), counts_out=0,
            expert_offsets=0, err=self.err.ptr, timeout_ns=self.timeout_ns,
            dflag_offset=self.layout.dflag_offset, drange_offset=self.layout.drange_offset, rank=self.rank,
            world=self.W, num_tokens=T, topk=cfg.topk, local_experts=self.L, row_bytes=self.row_bytes,
            slot_bytes=self.row_bytes, max_tokens=cfg.max_tokens_per_rank, chunk_tokens=constants.HT_CHUNK_TOKENS,
            max_chunks=self.layout.max_chunks, meta_stride=self.meta_stride, send_blocks=self.plan.dispatch_senders,
            send_warps=self.plan.dispatch_send_warps, scales=0, out_scales=0, scale_stride_t=0, scale_stride_c=0,
            out_scale_block_stride=0, out_scale_row_stride=0, out_scale_col_stride=0, scale_count=0, scale_elem=0,
            scale_slot_off=0, out_scale_block=INT_MAX, token_major=int(self.token_major), pad_rows=pad_rows)

    def _combine_params(self, routing: Routing):
        """ht_combine params of one routing; the handle's receive lists (recv_rows, recv_w) and the call's
        arrays (expert_out, out) are zero until a dispatch and a combine update them."""
        cfg = self.cfg
        return structs.pack(
            structs.HT_COMBINE_PARAMS, expert_out=0, recv_rows=0, recv_w=0, send_pos=routing.send_pos_ptr,
            info=routing.info_ptr, data_peers=ptr(self.data.table), partial_peers=ptr(self.partial_peers),
            own_partial=0, out=0, w_peers=0, own_w=0, out_w=0, land_peers=0, wland_peers=0,
            err=self.err.ptr, timeout_ns=self.timeout_ns, rank=self.rank, world=self.W, num_tokens=routing.num_tokens,
            topk=cfg.topk, local_experts=self.L, row_bytes=self.row_bytes, max_tokens=cfg.max_tokens_per_rank,
            item_lo=0, item_hi=INT_MAX, skip_own=0 if self.combine_push else 1, own_at_prefix=int(routing.worst))

    def _owned_view(self, framework: str, rows: int):
        """The first ``rows`` rows of the owned output in the caller's framework (the whole-buffer view is made
        once per framework: a DLPack conversion per call would cost host time)."""
        view = self._owned_views.get(framework)
        if view is None:
            cp = self._cupy
            H = self.cfg.hidden_size
            mem = cp.cuda.UnownedMemory(self.owned.ptr, self.layout.out_bytes, self.owned)
            full = cp.ndarray((self.layout.out_bytes // (2 * H), H), np.uint16, cp.cuda.MemoryPointer(mem, 0))
            view = self._owned_views[framework] = arrays.to_framework(full, framework, bf16=True)
        return view[:rows]

    # ----------------------------------------------------------------------------------- combine
    def combine(self, call: CombineCall):
        """Queue a combine into ``call.out``, or into a fresh ``[T, H]`` array; returns it."""
        handle: HtHandle = call.state
        stream, plan = call.stream, self.plan
        if call.out is None:
            out, out_ptr = arrays.empty(call.framework, (handle.routing.num_tokens, self.cfg.hidden_size), "bf16",
                                        stream)
        else:
            out, out_ptr = call.out.obj, call.out.ptr
        if self.token_major:
            return self._combine_token_major(call, handle, out, out_ptr)
        params = handle.combine_params.update(expert_out=call.expert_output.ptr, out=out_ptr)
        if not self.combine_push:
            self._barrier_after("combine", stream)
            self._reduce(params, stream)
            self.barrier(stream)
            self.k["ht_combine_gather"].launch(plan.combine_blocks, plan.gather_warps * 32, params, stream=stream)
        else:
            self._note_capture(stream)
            self._reduce_and_push(params, handle.routing, stream)
            self.barrier(stream)
            self.k["ht_combine_sum"].launch(plan.combine_blocks, plan.reduce_warps * 32, params, stream=stream)
        self.last_op = "combine"
        return out, None

    def _combine_token_major(self, call: CombineCall, handle: "HtHandle", out, out_ptr: int):
        """TOKEN_MAJOR: the caller's rows (and weights) are the partials. The copy engines copy each peer's
        contiguous block of them into that peer's landing buffers, after a barrier (run on a side stream) that
        says every peer has finished summing its previous combine; then a barrier and the local ordered sum."""
        stream, K = call.stream, self.cfg.topk
        y, w = call.expert_output.ptr, call.topk_weights
        self._note_capture(stream)
        if handle.routing.worst:
            return self._combine_worst(call, handle, out, out_ptr)
        rt = self._cupy.cuda.runtime
        W, rank, rb = self.W, self.rank, self.row_bytes
        prefix = handle.routing.recv_prefix
        region, wregion = self.cfg.max_tokens_per_rank * rb, self.cfg.max_tokens_per_rank * K * 4
        ready = self._landing_barrier(stream)
        for step in range(1, W):
            s, cs = (rank + step) % W, self.side_streams[step].ptr
            lo, hi = prefix[s], prefix[s + 1]
            if hi == lo:
                continue
            rt.streamWaitEvent(cs, ready.ptr, 0)
            rt.memcpyAsync(self.land.peer_ptrs[s] + rank * region, y + lo * rb, (hi - lo) * rb, rt.memcpyDefault, cs)
            if w is not None:
                rt.memcpyAsync(self.wland.peer_ptrs[s] + rank * wregion, w.ptr + lo * K * 4, (hi - lo) * K * 4,
                               rt.memcpyDefault, cs)
        self._join_side_streams(stream)
        self.barrier(stream)
        fields = dict(expert_out=y, out=out_ptr, own_partial=y + prefix[rank] * rb)
        return self._sum_token_major(call, handle, out, fields, 0 if w is None else w.ptr + prefix[rank] * K * 4)

    def _combine_worst(self, call: CombineCall, handle: "HtHandle", out, out_ptr: int):
        """TOKEN_MAJOR combine of a worst-case dispatch: the host does not know where each source's block of
        rows starts, so after a barrier (every peer has finished summing its previous combine) the
        ht_token_major_push kernel copies every peer's block into its landing buffers, reading the blocks from
        the routing's info; then a barrier and the sum, which finds our own block from info too."""
        stream, y, w = call.stream, call.expert_output.ptr, call.topk_weights
        fields = dict(expert_out=y, out=out_ptr, own_partial=y, land_peers=ptr(self.land.table),
                      wland_peers=0 if w is None else ptr(self.wland.table), own_w=0 if w is None else w.ptr)
        self.barrier(stream)
        self.k["ht_token_major_push"].launch(self.plan.combine_blocks, self.plan.reduce_warps * 32,
                                             handle.combine_params.update(**fields), stream=stream)
        self.barrier(stream)
        return self._sum_token_major(call, handle, out, fields, 0 if w is None else w.ptr)

    def _sum_token_major(self, call: CombineCall, handle: "HtHandle", out, fields: dict, own_w: int):
        """ht_combine_sum of a TOKEN_MAJOR combine (the partials are in place); with topk_weights, their sums
        too. Returns what the combine returns."""
        w, K = call.topk_weights, self.cfg.topk
        out_w = None
        if w is not None:
            out_w, out_w_ptr = arrays.empty(call.framework, (handle.routing.num_tokens, K), "float32", call.stream)
            fields = dict(fields, w_peers=ptr(self.w_peers), own_w=own_w, out_w=out_w_ptr)
        params = handle.combine_params.update(**fields)
        self.k["ht_combine_sum"].launch(self.plan.combine_blocks, self.plan.reduce_warps * 32, params,
                                        stream=call.stream)
        self.last_op = "combine"
        return (out, out_w) if w is not None else out, None

    def _reduce(self, params, stream) -> None:
        self.k["ht_combine_reduce"].launch(self.plan.combine_blocks, self.plan.reduce_warps * 32, params,
                                           stream=stream)

    def _reduce_and_push(self, params, routing: Routing, stream) -> None:
        """Push combine up to its barrier: reduce the peers' tokens one peer at a time (the step-th next rank at
        step 1..W-1) and copy each peer's partials with the copy engines into its landing buffer while the next
        peer's are reduced; our own tokens' partials last, under the last copy. The copies first wait for a
        barrier, run on a side stream under the first reduce: every peer has finished reading its landing buffer
        (its previous combine's sum). The side streams join ``stream`` before it returns."""
        rt = self._cupy.cuda.runtime
        W, rank, rb = self.W, self.rank, self.row_bytes
        region = self.cfg.max_tokens_per_rank * rb
        prefix = routing.recv_prefix
        ready = self._landing_barrier(stream)
        for step in range(1, W):
            s, cs, reduced = (rank + step) % W, self.side_streams[step].ptr, self.events[step + 1]
            lo, hi = prefix[s], prefix[s + 1]
            if hi == lo:
                continue
            self._reduce(params.update(item_lo=lo, item_hi=hi), stream)
            rt.eventRecord(reduced.ptr, stream.ptr)
            rt.streamWaitEvent(cs, ready.ptr, 0)
            rt.streamWaitEvent(cs, reduced.ptr, 0)
            rt.memcpyAsync(self.land.peer_ptrs[s] + rank * region, self.data.ptr + s * region, (hi - lo) * rb,
                           rt.memcpyDefault, cs)
        if prefix[rank + 1] > prefix[rank]:
            self._reduce(params.update(item_lo=prefix[rank], item_hi=prefix[rank + 1]), stream)
        self._join_side_streams(stream)

    def _landing_barrier(self, stream):
        """Fork side stream 0 off ``stream`` and run there the barrier after which every peer has finished
        reading its landing buffer (its previous combine's sum). Returns the event the copies wait for."""
        rt = self._cupy.cuda.runtime
        start, ready = self.events[0], self.events[1]
        rt.eventRecord(start.ptr, stream.ptr)
        rt.streamWaitEvent(self.side_streams[0].ptr, start.ptr, 0)
        self.barrier(self.side_streams[0])
        rt.eventRecord(ready.ptr, self.side_streams[0].ptr)
        return ready

    def _join_side_streams(self, stream) -> None:
        """``stream`` waits for everything queued on the side streams."""
        rt = self._cupy.cuda.runtime
        for side, joined in zip(self.side_streams, self.events[self.W + 1:]):
            rt.eventRecord(joined.ptr, side.ptr)
            rt.streamWaitEvent(stream.ptr, joined.ptr, 0)

    def close(self) -> None:
        super().close()
        self._owned_views = {}
        for buf in self._bufs:
            buf.close()
        self._bufs = []
        self.err.close()
        self.input_err.close()
        self.host.close()


def _as_cupy(arr):
    """A CuPy view of a torch CUDA tensor (zero-copy) or the CuPy array itself."""
    import cupy
    if arrays.framework_of(arr) == arrays.TORCH:
        return cupy.from_dlpack(arr)
    return cupy.asarray(arr)
