"""The CPU backend: the whole MoECommunicator API on NumPy, ranks talking over MPI (or torch.distributed).

Each rank sends every destination the tokens routed to it (with their indices, ids and weights), builds
its output with :mod:`ep.reference`, and combine sends the bf16 partials back. Semantics and rounding are
exactly those of the GPU kernels, so model code can be prototyped and unit-tested without GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import arrays, reference, sizes
from .bootstrap import Group
from .config import DispatchLayout, DispatchOutput, MoECommunicatorConfig
from .envs import Snapshot
from .errors import InvalidStateError, PeerInputError


@dataclass
class CpuHandle:
    rows: list            # per source: int64 [n_s, K] row of each slot owned here, -1 otherwise
    recv_weights: list    # per source: float32 [n_s, K]
    sent_index: list      # per destination: token indices this rank sent there
    num_tokens: int
    tokens_shape: tuple
    topk_ids: np.ndarray
    seq: int


class CpuRuntime:
    def __init__(self, cfg: MoECommunicatorConfig, group: Group, knobs: Snapshot):
        self.cfg, self.group, self.knobs = cfg, group, knobs
        self.W, self.rank = group.size, group.rank
        self.L = cfg.num_experts // self.W
        self.seq = 0
        self.owned = None   # owned_output: the buffer every dispatch's tokens view (allocated at first use)

    def check_errors(self) -> None:
        pass

    def dispatch(self, x, topk_ids, weights, previous: CpuHandle | None, output_buffer, framework):
        cfg, W = self.cfg, self.W
        xn = arrays.to_numpy(x).astype(np.uint16, copy=False)
        ids = arrays.to_numpy(topk_ids).astype(np.int64)
        w = None if weights is None else arrays.to_numpy(weights).astype(np.float32)
        # Validate collectively so every rank raises together instead of one hanging in the exchange.
        problem = None
        try:
            reference.check_topk_ids(ids, cfg.num_experts)
            if previous is not None:
                if previous.num_tokens != ids.shape[0]:
                    raise ValueError(f"previous_handle was made for {previous.num_tokens} tokens, x has {ids.shape[0]}")
                if self.knobs.debug_checks and not np.array_equal(previous.topk_ids, ids):
                    raise ValueError("previous_handle: topk_ids differ from the routing the handle was made for")
        except ValueError as exc:
            problem = exc
        failed = self.group.allgather(problem is not None)
        if problem is not None:
            raise problem
        if any(failed):
            bad = [r for r, f in enumerate(failed) if f]
            raise PeerInputError(f"rank(s) {bad} passed invalid input to this dispatch; nothing was sent")
        slices = [reference.slice_for_rank(self.rank, d, xn, ids, w, cfg.num_experts, W) for d in range(W)]
        received = self.group.alltoall(slices)
        ll = cfg.mode == "ll"
        layout_kind = DispatchLayout.EXPERT_MAJOR if (ll or cfg.layout is DispatchLayout.EXPERT_MAJOR) else DispatchLayout.FLAT
        capacity = W * cfg.max_tokens_per_rank if ll else None
        res = reference.dispatch_receive(received, self.rank, cfg.num_experts, W, cfg.hidden_size,
                                         cfg.expert_alignment, layout_kind, capacity)
        tokens = res.tokens
        if ll and cfg.layout is DispatchLayout.FLAT:
            tokens = tokens.reshape(-1, cfg.hidden_size)
        if output_buffer is not None:
            target = arrays.to_numpy(output_buffer)
            target[...] = res.tokens.reshape(target.shape)
            tokens_out = output_buffer if cfg.layout is not DispatchLayout.FLAT else output_buffer.reshape(tokens.shape)
        elif cfg.owned_output:   # like the GPU: a view of one buffer, overwritten by the next dispatch
            if self.owned is None:
                self.owned = np.empty((sizes.owned_output_rows(cfg, W), cfg.hidden_size), np.uint16)
            view = self.owned[:tokens.shape[0]]
            view[...] = tokens
            tokens_out = arrays.from_numpy(view, framework, bf16=True, like=x)
        else:
            tokens_out = arrays.from_numpy(tokens, framework, bf16=True, like=x)
        self.seq += 1
        out = DispatchOutput(
            tokens=tokens_out,
            num_tokens_per_expert=arrays.from_numpy(res.counts.astype(np.int32), framework),
            num_tokens_per_expert_host=None if ll else [int(c) for c in res.counts],
            expert_offsets=arrays.from_numpy(res.offsets.astype(np.int64), framework),
            layout=cfg.layout)
        sent = [s.token_index for s in slices]
        handle = CpuHandle(res.rows, [sl.weights for sl in received], sent, ids.shape[0], tuple(tokens.shape), ids,
                           self.seq)
        return out, handle

    def combine(self, expert_output, handle: CpuHandle, out, framework):
        cfg = self.cfg
        if cfg.mode == "ll" and self.seq - handle.seq not in (0, 1):
            raise InvalidStateError(f"LL handle is {self.seq - handle.seq} dispatches old; LL keeps the last two dispatches only")
        y = arrays.to_numpy(expert_output).reshape(-1, cfg.hidden_size)
        partials = [reference.expert_partials(y, handle.rows[s], handle.recv_weights[s]) for s in range(self.W)]
        back = self.group.alltoall(partials)
        parts = [(handle.sent_index[d], back[d]) for d in range(self.W)]
        result = reference.combine_partials(handle.num_tokens, cfg.hidden_size, parts)
        if out is not None:
            arrays.to_numpy(out)[...] = result
            return out
        return arrays.from_numpy(result, framework, bf16=True, like=expert_output)

    def close(self) -> None:
        pass
