"""LL mode on GPUs: one kernel per op, no host synchronization, no allocation after the first call.

Built lazily by :meth:`LLRuntime.prepare` (collective), which the communicator calls on the first LL use:
a process that only uses HT never compiles or allocates any of this. Device sequence numbers (in
``state``) select the buffer parity, so a CUDA graph of dispatch -> MLP -> combine replays correctly.

Lifetime rules that follow from double buffering (documented in the README):
- the communicator-owned dispatch output and combine output are valid until the next dispatch/combine;
- a handle can be combined while at most one newer dispatch has run (age 0 or 1).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from . import arrays, sizes, structs, validation
from .bootstrap import Group
from .calls import CombineCall, DispatchCall
from .config import DispatchLayout, DispatchOutput, MoECommunicatorConfig
from .errors import InvalidStateError
from .peer_memory import ErrorRecord, SymmetricBuffer
from .runtime_base import GpuRuntime, load_kernels, ptr
from .tuning import Tuning

log = logging.getLogger("ep.ll")


@dataclass
class LLHandle:
    seq: int             # host-side dispatch count when this dispatch was issued
    num_tokens: int
    tokens_shape: tuple


class LLRuntime(GpuRuntime):
    def __init__(self, cfg: MoECommunicatorConfig, group: Group, tuning: Tuning):
        self.cfg, self.group, self.tuning = cfg, group, tuning
        self.plan = tuning.ll
        self.W, self.rank = group.size, group.rank
        self.L = cfg.num_experts // self.W
        self.capacity = self.W * cfg.max_tokens_per_rank
        self.ready = False
        self.seq = 0
        self.open_gate(tuning.timeout_s)

    def prepare(self) -> None:
        """Compile the LL kernels and allocate the LL buffers (collective; idempotent)."""
        if self.ready:
            return
        import cupy
        cfg, W, L = self.cfg, self.W, self.L
        lay = self.layout = sizes.ll_layout(cfg, W)
        self.row_bytes = sizes.row_bytes(cfg)
        self.meta_stride = sizes.meta_stride(cfg.topk)
        self.timeout_ns = self.tuning.timeout_ns
        self._bufs = []
        try:
            self.recv = self._sym(lay.recv_bytes, "ll.recv")
            self.meta = self._sym(lay.meta_bytes, "ll.meta")
            self.comb = self._sym(lay.comb_bytes, "ll.comb")
            self.sig = self._sym(lay.sig_bytes, "ll.sig")
            self.err = ErrorRecord()
            self.input_err = ErrorRecord()
            self.out = cupy.empty((L, self.capacity, cfg.hidden_size), np.uint16)
            self.counts = cupy.zeros(L, np.int32)
            self.offsets = cupy.arange(L + 1, dtype=np.int64) * self.capacity
            self.comb_out = cupy.empty((cfg.max_tokens_per_rank, cfg.hidden_size), np.uint16)
            self.state = cupy.zeros(4, np.uint32)
            self.rows_local = cupy.zeros(2 * W * cfg.max_tokens_per_rank * cfg.topk, np.int32)
            self.send_mask = cupy.zeros(2 * cfg.max_tokens_per_rank, np.uint32)
            self.k = load_kernels(self.group, self.tuning.kernels)
        except BaseException:
            for buf in self._bufs:
                buf.close()
            raise
        self._torch_views = {}
        cupy.cuda.runtime.deviceSynchronize()
        self.group.barrier("ll prepare")
        self.ready = True

    def _sym(self, nbytes: int, name: str) -> SymmetricBuffer:
        buf = SymmetricBuffer(self.group, nbytes, name)
        self._bufs.append(buf)
        return buf

    def owned_views(self, framework: str) -> dict:
        """The owned outputs as the caller's framework; converted once (never during graph capture)."""
        if framework not in self._torch_views:
            flat_shape = (self.L * self.capacity, self.cfg.hidden_size)
            self._torch_views[framework] = {
                "out": arrays.to_framework(self.out, framework, bf16=True),
                "out_flat": arrays.to_framework(self.out.reshape(flat_shape), framework, bf16=True),
                "counts": arrays.to_framework(self.counts, framework),
                "offsets": arrays.to_framework(self.offsets, framework),
                "comb_out": arrays.to_framework(self.comb_out, framework, bf16=True),
            }
        return self._torch_views[framework]

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

    def check_handle(self, state: "LLHandle") -> None:
        age = self.seq - state.seq
        if age not in (0, 1):
            raise InvalidStateError(f"LL handle is {age} dispatches old; LL keeps the last two dispatches only")

    def same_routing(self, state, topk_ids) -> bool:
        return True   # LL has no cached dispatch

    def _params(self, **kw) -> np.ndarray:
        cfg = self.cfg
        base = dict(x=0, topk_ids=0, weights=0, expert_out=0, out=0, counts_out=ptr(self.counts),
                    recv_peers=ptr(self.recv.table), meta_peers=ptr(self.meta.table), comb_peers=ptr(self.comb.table),
                    sig_peers=ptr(self.sig.table), state=ptr(self.state), rows_local=ptr(self.rows_local),
                    send_mask=ptr(self.send_mask), err=self.err.ptr, input_err=self.input_err.ptr,
                    timeout_ns=self.timeout_ns, disp_cnt_offset=self.layout.disp_cnt_offset,
                    comb_cnt_offset=self.layout.comb_cnt_offset, ntok_offset=self.layout.ntok_offset, rank=self.rank,
                    world=self.W, num_tokens=0, topk=cfg.topk, num_experts=cfg.num_experts, local_experts=self.L,
                    row_bytes=self.row_bytes, max_tokens=cfg.max_tokens_per_rank, meta_stride=self.meta_stride,
                    ids_64=0, age=0, capacity=self.capacity)
        base.update(kw)
        return structs.pack(structs.LL_PARAMS, **base)

    def dispatch(self, call: DispatchCall):
        self.prepare()
        cfg = self.cfg
        T, framework = call.num_tokens, call.framework
        x_info, ids_info, w_info, out_info = call.x, call.topk_ids, call.weights, call.output_buffer
        views = self.owned_views(framework)
        out_ptr = out_info.ptr if out_info is not None else ptr(self.out)
        params = self._params(x=x_info.ptr, topk_ids=ids_info.ptr, weights=0 if w_info is None else w_info.ptr,
                              out=out_ptr, num_tokens=T, ids_64=int(ids_info.dtype == "int64"))
        self.k["ll_dispatch"].launch(self.plan.dispatch_blocks, self.plan.warps * 32, params, stream=call.stream)
        self.seq += 1
        if out_info is not None:
            tokens = out_info.obj
            if cfg.layout is DispatchLayout.FLAT:
                tokens = tokens.reshape(self.L * self.capacity, cfg.hidden_size)
        else:
            tokens = views["out_flat"] if cfg.layout is DispatchLayout.FLAT else views["out"]
        out = DispatchOutput(tokens=tokens, num_tokens_per_expert=views["counts"], num_tokens_per_expert_host=None,
                             expert_offsets=views["offsets"], layout=cfg.layout)
        return out, LLHandle(self.seq, T, tuple(int(s) for s in tokens.shape))

    def combine(self, call: CombineCall):
        handle: LLHandle = call.state
        age = self.seq - handle.seq
        T = handle.num_tokens
        if call.out is None:
            out = self.owned_views(call.framework)["comb_out"][:T]
            out_ptr = ptr(self.comb_out)
        else:
            out, out_ptr = call.out.obj, call.out.ptr
        params = self._params(expert_out=call.expert_output.ptr, out=out_ptr, num_tokens=T, age=age)
        self.k["ll_combine"].launch(self.plan.combine_blocks, self.plan.warps * 32, params, stream=call.stream)
        return out

    def close(self) -> None:
        super().close()
        if not self.ready:
            return
        for buf in self._bufs:
            buf.close()
        self._bufs = []
        self.err.close()
        self.input_err.close()
        self.ready = False
