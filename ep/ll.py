"""LL mode on GPUs: one kernel per op (or two, split at a receive hook), no host synchronization, no
allocation after the first call.

Built lazily by :meth:`LLRuntime.prepare` (collective), which the communicator calls on the first LL use:
a process that only uses HT never compiles or allocates any of this. Device sequence numbers (in ``state``)
select the buffer parity, so a CUDA graph of dispatch -> MLP -> combine replays correctly. Peers write
every row straight into this rank's symmetric output (cuda_src/ll_dispatch.cu).

Lifetime rules (documented in the README):
- the communicator-owned dispatch output and combine output (each double-buffered) stay valid while their op
  is one of the last two;
- a handle can be combined while at most one newer dispatch has been sent (age 0 or 1): a newer send half
  rewrites the older dispatch's metadata of that parity, even before its hook is called;
- with ``return_recv_hook=True`` at most two dispatches (or combines) may wait for their hook.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from . import arrays, sizes, structs, validation
from .bootstrap import Group
from .calls import CombineCall, DispatchCall
from .config import DispatchLayout, DispatchOutput, MoECommunicatorConfig
from .errors import EPError, InvalidStateError
from .peer_memory import ErrorRecord, SymmetricBuffer
from .runtime_base import GpuRuntime, load_kernels, ptr
from .constants import LL_CHUNK_CHANNELS
from .hooks import RecvHook, check_combinable, check_pending
from .tuning import LL_PAYLOADS, LL_STATIC_SMEM, Tuning

log = logging.getLogger("ep.ll")


@dataclass
class LLHandle:
    seq: int             # the dispatch's number among this rank's LL dispatches (1, 2, ...)
    num_tokens: int
    tokens_shape: tuple  # the expert output combine takes: [L, cap, H] (or [L * cap, H] for FLAT)
    received: list = field(default_factory=lambda: [True])   # [0]: the receive half has been launched


class LLRuntime(GpuRuntime):
    def __init__(self, cfg: MoECommunicatorConfig, group: Group, tuning: Tuning):
        self.cfg, self.group, self.tuning = cfg, group, tuning
        self.plan = tuning.ll
        self.W, self.rank = group.size, group.rank
        self.L = cfg.num_experts // self.W
        self.capacity = self.W * cfg.max_tokens_per_rank
        self.ready = False
        self.sent = 0            # dispatch send halves issued
        self.received = 0        # dispatch receive halves issued
        self.pending = {"dispatch": 0, "combine": 0}   # sends waiting for their hook
        self.waiting = {"dispatch": [], "combine": []}   # their hooks' done flags, oldest first (RecvHook)
        self.combines = 0        # combines issued (the owned combine output alternates too)
        self.open_gate(tuning.timeout_s)

    def prepare(self) -> None:
        """Compile the LL kernels and allocate the LL buffers (collective; idempotent)."""
        if self.ready:
            return
        import cupy
        cfg, W, L, T, H = self.cfg, self.W, self.L, self.cfg.max_tokens_per_rank, self.cfg.hidden_size
        lay = self.layout = sizes.ll_layout(cfg, W)
        self._bufs = []
        try:
            self.out = self._sym(lay.out_bytes, "ll.out")
            self.scales = self._sym(lay.scale_bytes, "ll.scales")
            self.meta = self._sym(lay.meta_bytes, "ll.meta")
            self.comb = self._sym(lay.comb_bytes, "ll.comb")
            self.sig = self._sym(lay.sig_bytes, "ll.sig")
            self.err = ErrorRecord()
            self.input_err = ErrorRecord()
            self.counts = cupy.zeros((2, L), np.int32)   # by output half, like the tokens
            self.offsets = cupy.arange(L + 1, dtype=np.int64) * self.capacity
            self.comb_out = cupy.empty((2, T, H), np.uint16)   # alternating, like the dispatch output
            self.state = cupy.zeros(sizes.LL_STATE_WORDS, np.uint32)
            self.send_mask = cupy.zeros(2 * T, np.uint32)
            self.ntok = cupy.zeros(2 * W, np.int32)
            self.k = load_kernels(self.group, self.tuning.kernels)
            static = max(k.static_smem for k in self.k.values())
            if static > LL_STATIC_SMEM:
                raise EPError(f"the LL kernels use {static} bytes of static shared memory, more than ep.tuning "
                              f"budgets ({LL_STATIC_SMEM})")
        except BaseException:
            for buf in self._bufs:
                buf.close()
            raise
        self._views: dict = {}
        self._state_ptr = ptr(self.state)
        self._params = structs.pack(
            structs.LL_PARAMS, x=0, topk_ids=0, weights=0, expert_out=0, out=0, copy_out=0, counts_out=ptr(self.counts),
            cum_counts=0, ready=0, out_peers=ptr(self.out.table), scale_peers=ptr(self.scales.table),
            meta_peers=ptr(self.meta.table), comb_peers=ptr(self.comb.table), sig_peers=ptr(self.sig.table),
            state=ptr(self.state), send_mask=ptr(self.send_mask), ntok=ptr(self.ntok), src_info=0, src_counts=0,
            err=self.err.ptr,
            input_err=self.input_err.ptr, timeout_ns=self.tuning.timeout_ns, cnt_offset=lay.cnt_offset,
            disp_cnt_offset=lay.disp_cnt_offset, comb_cnt_offset=lay.comb_cnt_offset, wgt_cnt_offset=lay.wgt_cnt_offset,
            rank=self.rank, world=W,
            num_tokens=0, topk=cfg.topk, num_experts=cfg.num_experts, local_experts=L, hidden=H, max_tokens=T,
            capacity=self.capacity, cnt_stride=lay.cnt_stride, meta_stride=lay.meta_stride, ids_64=0, age=0, fp8=0,
            cols_per_tile=self.plan.cols_per_tile, ready_target=0, cum_64=0, out_par=0)
        # Per-call constants of the host path.
        self._threads = self.plan.warps * 32
        self._items_per_token = min(W, cfg.topk) * -(-H // LL_CHUNK_CHANNELS)
        self._counts_ptr = (ptr(self.counts), ptr(self.counts) + 4 * L)
        self._comb_out_ptr = (ptr(self.comb_out), ptr(self.comb_out) + self.comb_out[0].nbytes)
        cupy.cuda.runtime.deviceSynchronize()
        self.group.barrier("ll prepare")
        self.ready = True

    def _sym(self, nbytes: int, name: str) -> SymmetricBuffer:
        buf = SymmetricBuffer(self.group, nbytes, name)
        self._bufs.append(buf)
        return buf

    # -------------------------------------------------------------------------------- views
    def _device_array(self, buf: SymmetricBuffer, shape: tuple, dtype) -> "object":
        import cupy
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        mem = cupy.cuda.UnownedMemory(buf.ptr, max(nbytes, 1), buf)
        return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, 0))

    def views(self, framework: str, payload: str, half: int = 0) -> dict:
        """The owned outputs (``half`` of the double-buffered dispatch output) as the caller's framework. The
        first call of a framework converts every payload and half at once: a later one may run inside a CUDA
        graph capture, where a DLPack conversion (a stream wait) is not allowed."""
        key = (framework, payload, half)
        v = self._views.get(key)
        if v is None:
            for p in self._payloads():
                for h in (0, 1):
                    self._views[(framework, p, h)] = self._make_views(framework, p, h)
            v = self._views[key]
        return v

    def _payloads(self) -> list[str]:
        H = self.cfg.hidden_size
        return [p for p in LL_PAYLOADS if p == "bf16" or H % (512 if p == "fp8_ue8m0" else 128) == 0]

    def _make_views(self, framework: str, payload: str, half: int) -> dict:
        cfg, L, cap, H = self.cfg, self.L, self.capacity, self.cfg.hidden_size
        flat = cfg.layout is DispatchLayout.FLAT
        out_half = self._device_array(self.out, (2, L * cap * 2 * H), np.uint8)[half]
        if payload == "bf16":
            tok = out_half.view(np.uint16).reshape(L, cap, H)
            tokens = arrays.to_framework(tok.reshape(L * cap, H) if flat else tok, framework, bf16=True)
            scales = None
        else:
            tok = out_half[:L * cap * H].reshape(L, cap, H)
            tokens = arrays.to_framework(tok.reshape(L * cap, H) if flat else tok, framework, fp8=True)
            sc_half = self._device_array(self.scales, (2, L * (H // 128) * cap * 4), np.uint8)[half]
            if payload == "fp8_ue8m0":
                sc = sc_half[:L * (H // 512) * cap * 4].view(np.int32).reshape(L, H // 512, cap)
            else:
                sc = sc_half.view(np.float32).reshape(L, H // 128, cap)
            scales = arrays.to_framework(sc, framework)
            scales = scales.transpose(1, 2) if framework == arrays.TORCH else scales.transpose(0, 2, 1)
        counts = arrays.to_framework(self.counts[half], framework)
        offsets = arrays.to_framework(self.offsets, framework)
        return {
            "tokens": tokens, "scales": scales, "counts": counts, "offsets": offsets,
            "comb_out": arrays.to_framework(self.comb_out[half], framework, bf16=True), "comb_out_rows": {},
            # What a dispatch into the owned buffers returns: the same immutable record every time.
            "output": DispatchOutput(tokens=tokens, num_tokens_per_expert=counts, num_tokens_per_expert_host=None,
                                     expert_offsets=offsets, layout=cfg.layout, scales=scales),
            "tokens_shape": tuple(int(d) for d in tokens.shape),
        }

    # ------------------------------------------------------------------------------- checks
    def check_errors(self) -> None:
        if self.ready:
            super().check_errors()

    def take_input_error(self) -> BaseException | None:
        if not self.ready or not self.input_err.raised():
            return None
        f = self.input_err.fields()
        self.input_err.clear()
        K = self.cfg.topk
        exc = arrays.argument_error(ValueError, "topk_ids", (
            f"an earlier LL dispatch got topk_ids[{f['peer'] // K}, {f['peer'] % K}] = "
            f"{np.int64(np.uint64(f['observed']).view(np.int64))} outside [-1, {self.cfg.num_experts}); "
            "that slot was treated as unused"))
        exc.ep_code_flags = validation.EARLIER
        return exc

    def check_handle(self, state: LLHandle) -> None:
        # Age in dispatches SENT since: a newer dispatch's send half (hook not called yet) already rewrote this
        # parity's MetaRecs, masks and token counts. (The kernels' age counts receives: where the device finds it.)
        check_combinable(state.received[0], self.sent - state.seq)

    def check_pending(self, op: str, hook: bool) -> None:
        """At most two sends of an op may wait for their hook (two buffers), and an op without a hook waits for
        none (the receive halves run in the order of their sends)."""
        check_pending(self.pending, op, hook)

    def same_routing(self, state, topk_ids) -> bool:
        return True   # LL has no cached dispatch

    # ---------------------------------------------------------------------------- dispatch
    def dispatch(self, call: DispatchCall):
        if not self.ready:
            self.prepare()
        T, stream = call.num_tokens, call.stream
        payload = LL_PAYLOADS[call.fp8]
        half = self.sent & 1   # alternates on every rank alike (module doc of ll_dispatch.cu)
        views = self.views(call.framework, payload, half)
        cum, w = call.cumulative_counts, call.weights
        params = self._params.update(
            x=call.x.ptr, topk_ids=call.topk_ids.ptr, weights=0 if w is None else w.ptr,
            copy_out=0 if call.output_buffer is None else call.output_buffer.ptr,
            cum_counts=0 if cum is None else cum.ptr, cum_64=int(cum is not None and cum.dtype == "int64"),
            num_tokens=T, ids_64=int(call.topk_ids.dtype == "int64"), fp8=call.fp8, out_par=half,
            counts_out=self._counts_ptr[half])
        threads = self._threads
        blocks = self._grid(T, self.plan.dispatch_blocks)
        if call.output_buffer is None:
            out, shape = views["output"], views["tokens_shape"]
        else:
            tokens = call.output_buffer.obj
            if self.cfg.layout is DispatchLayout.FLAT:
                tokens = tokens.reshape(self.L * self.capacity, self.cfg.hidden_size)
            out = DispatchOutput(tokens=tokens, num_tokens_per_expert=views["counts"], num_tokens_per_expert_host=None,
                                 expert_offsets=views["offsets"], layout=self.cfg.layout, scales=views["scales"])
            shape = tuple(int(d) for d in tokens.shape)
        handle = LLHandle(self.sent + 1, T, shape)
        if call.recv_hook:
            self.k[f"ll_dispatch_send_{payload}"].launch(blocks, threads, params, smem=self.plan.dispatch_smem,
                                                         stream=stream)
            handle.received = [False]
            self.pending["dispatch"] += 1

            def recv():
                self.k[f"ll_dispatch_recv_{payload}"].launch(blocks, threads, params, stream=stream)
                self.received += 1
                self.pending["dispatch"] -= 1
            hook = RecvHook(recv, handle.received, "dispatch", self.waiting["dispatch"])
        else:
            self.k[f"ll_dispatch_{payload}"].launch(blocks, threads, params, smem=self.plan.dispatch_smem,
                                                    stream=stream)
            self.received += 1
            hook = None
        self.sent += 1
        return out, handle, hook

    # ----------------------------------------------------------------------------- combine
    def combine(self, call: CombineCall):
        handle: LLHandle = call.state
        T = handle.num_tokens
        if call.out is None:
            half = self.combines & 1
            views = self.views(call.framework, "bf16", half)
            out = views["comb_out_rows"].get(T)
            if out is None:   # one view per token count: slicing costs microseconds per call
                out = views["comb_out_rows"][T] = views["comb_out"][:T]
            out_ptr = self._comb_out_ptr[half]
        else:
            out, out_ptr = call.out.obj, call.out.ptr
        ready = call.ready
        # The kernel reads a null weights pointer as "the dispatch's weights"; combine-time weights of a rank
        # without tokens ([0, K]: no address) still take part in the push's rendezvous, so any non-null word
        # stands in for them (no token reads it).
        weights = 0 if call.weights is None else (call.weights.ptr or self._state_ptr)
        params = self._params.update(expert_out=call.expert_output.ptr, out=out_ptr, num_tokens=T, weights=weights,
                                     age=self.received - handle.seq, ready=0 if ready is None else ready.ptr,
                                     ready_target=call.ready_target)
        threads = self._threads
        blocks = self._grid(T, self.plan.combine_blocks)
        self.combines += 1
        if call.recv_hook:
            self.k["ll_combine_send"].launch(blocks, threads, params, stream=call.stream)
            self.pending["combine"] += 1
            done = [False]

            def recv():
                self.k["ll_combine_recv"].launch(blocks, threads, params, stream=call.stream)
                self.pending["combine"] -= 1
            return out, RecvHook(recv, done, "combine", self.waiting["combine"])
        self.k["ll_combine"].launch(blocks, threads, params, stream=call.stream)
        return out, None

    def row_sources(self, state: LLHandle, framework: str, stream):
        """ll_row_sources for the dispatch of ``state`` (one block, after the stream's earlier work)."""
        (info, info_ptr), (counts, counts_ptr) = arrays.empty_many(
            framework, [((self.L, self.capacity), "int32"), ((self.L, self.W), "int32")], stream)
        params = self._params.update(src_info=info_ptr, src_counts=counts_ptr, age=self.received - state.seq)
        self.k["ll_row_sources"].launch(1, 1024, params, smem=4 * self.L * self.W, stream=stream)
        return info, counts

    def signal_ready(self, signals, first: int, count: int, add: int, stream) -> None:
        if not self.ready:
            raise InvalidStateError("signal: the LL kernels load at the communicator's first call; call "
                                    "prepare() (collective) before signalling")
        s = arrays.resolve_stream(stream, signals.framework)
        params = structs.pack(structs.SIGNAL_PARAMS, counters=arrays.describe(signals.counters, "counters").ptr,
                              first=first, count=count, add=add)
        self.k["ll_signal_ready"].launch(-(-count // 256), 256, params, stream=s)

    def _grid(self, T: int, most: int) -> int:
        """Blocks for an op of T tokens: about one work item (token, rank, 2 KB chunk) per warp, at most the
        configured count: a few tokens need few blocks, and every block costs a fence and a signal."""
        return max(1, min(most, -(-max(T, 1) * self._items_per_token // self.plan.warps)))

    def close(self) -> None:
        super().close()
        if not self.ready:
            return
        self._views = {}
        for buf in self._bufs:
            buf.close()
        self._bufs = []
        self.err.close()
        self.input_err.close()
        self.ready = False
