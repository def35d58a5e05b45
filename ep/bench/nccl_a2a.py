"""Baseline 2: the NCCL all-to-all token dispatcher that MoE users build today (the shape of Megatron-LM's
alltoall token dispatcher), on the same routing and shapes as ep's HT run.

dispatch  permute   one row per (token, destination rank), grouped by destination then token index
                    (index_select), plus the routing metadata (expert ids, weights) of each row;
          counts    all_to_all_single of the per-destination counts, then a host sync for the splits;
          tokens    all_to_all_single of the rows (and of their metadata);
          group     rows per (token, local expert), grouped by local expert, then source rank, then token
                    (index_select): the same order as ep's FLAT output.
combine   unpermute each (token, local expert) row times its weight, scatter_add_ into its (token, rank)
                    row: one partial per (token, rank), the same bytes as the dispatch;
          tokens    all_to_all_single back;
          scatter   scatter_add_ of the partials into [T, H].
It multiplies and scatter-adds in bf16, as Megatron's unpermute does (faster than fp32 scatter_add_ or
index_add_ at the HT shape). Through torch.distributed (NCCL backend), as users build it; without torch the
baseline is skipped. NCCL_NVLS_ENABLE=0 is set before NCCL starts unless the caller chose a value.
"""
from __future__ import annotations

import socket

import numpy as np

from . import procenv
from .workload import Shape

DISPATCH_STAGES = ("permute", "counts", "tokens", "group")
COMBINE_STAGES = ("unpermute", "tokens", "scatter")


def torch_usable() -> bool:
    try:
        import torch
        import torch.distributed as dist
        return bool(torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available())
    except Exception:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_torch_process_group(ctx) -> bool:
    """Initialize torch.distributed (NCCL) from the MPI ranks unless it already is (torchrun).
    Returns True when this call created it (the caller destroys it at the end)."""
    import torch
    import torch.distributed as dist
    if dist.is_initialized():
        return False
    group = ctx.group
    procenv.nccl_setup()
    port = group.allgather(_free_port() if group.rank == 0 else None)[0]
    procenv.setdefault("MASTER_ADDR", "127.0.0.1")
    procenv.setdefault("MASTER_PORT", str(port))
    procenv.setdefault("RANK", str(group.rank))
    procenv.setdefault("WORLD_SIZE", str(group.size))
    torch.cuda.set_device(ctx.device)
    dist.init_process_group("nccl", init_method="env://", rank=group.rank, world_size=group.size,
                            device_id=torch.device("cuda", ctx.device))
    return True


class TorchA2A:
    """The dispatcher in torch ops, collectives through torch.distributed on the default (NCCL) group."""

    label = "torch.distributed all_to_all_single (NCCL)"

    def __init__(self, ctx, shape: Shape, dev_inputs):
        import torch
        import torch.distributed as dist
        self.torch, self.dist = torch, dist
        self.ctx, self.shape = ctx, shape
        self.W, self.rank = ctx.group.size, ctx.group.rank
        self.L = shape.experts // self.W
        self.dev = torch.device("cuda", ctx.device)
        self.ts = torch.cuda.ExternalStream(int(ctx.stream.ptr), device=self.dev)   # the bench stream
        x, ids, w = dev_inputs[:3]
        self.x = torch.from_dlpack(x.view(np.int16)).view(torch.bfloat16)
        self.ids = torch.from_dlpack(ids)
        self.w = torch.from_dlpack(w)

    def dispatch(self, mark):
        torch, dist = self.torch, self.dist
        T, K, H, W, L = self.shape.tokens, self.shape.topk, self.shape.hidden, self.W, self.L
        with torch.cuda.stream(self.ts):
            m = [mark()]
            dest = torch.where(self.ids >= 0, torch.div(self.ids, L, rounding_mode="floor"), W)
            routed = torch.zeros((T, W + 1), dtype=torch.bool, device=self.dev)
            routed.scatter_(1, dest, True)
            routed = routed[:, :W]
            t_idx = routed.t().nonzero()[:, 1]            # (destination, token) order
            in_splits = routed.sum(0)
            meta = torch.cat([self.ids.to(torch.int32), self.w.view(torch.int32)], dim=1)
            x_perm = self.x.index_select(0, t_idx)
            meta_perm = meta.index_select(0, t_idx)
            m.append(mark())
            out_splits = torch.empty_like(in_splits)
            dist.all_to_all_single(out_splits, in_splits)
            in_list, out_list = in_splits.tolist(), out_splits.tolist()
            m.append(mark())
            n = sum(out_list)
            recv = self.x.new_empty((n, H))
            dist.all_to_all_single(recv, x_perm, out_list, in_list)
            recv_meta = meta.new_empty((n, 2 * K))
            dist.all_to_all_single(recv_meta, meta_perm, out_list, in_list)
            m.append(mark())
            r_ids = recv_meta[:, :K]
            r_w = recv_meta[:, K:].contiguous().view(torch.float32)
            local = r_ids - self.rank * L
            hit = (r_ids >= 0) & (local >= 0) & (local < L)
            col = torch.where(hit, local, L).long()
            onehot = torch.zeros((n, L + 1), dtype=torch.bool, device=self.dev).scatter_(1, col, True)[:, :L]
            wsum = torch.zeros((n, L + 1), dtype=torch.float32, device=self.dev)
            wsum = wsum.scatter_add_(1, col, torch.where(hit, r_w, 0.0))[:, :L]
            e_idx, r_idx = onehot.t().nonzero(as_tuple=True)   # (local expert, source, token) order
            tokens = recv.index_select(0, r_idx)
            row_w = wsum[r_idx, e_idx]
            counts = onehot.sum(0)
            m.append(mark())
        state = {"t_idx": t_idx, "in": in_list, "out": out_list, "r_idx": r_idx, "row_w": row_w, "n": n,
                 "tokens": tokens, "counts": counts}
        return m, state

    def combine(self, state, y, mark):
        torch, dist = self.torch, self.dist
        T, H = self.shape.tokens, self.shape.hidden
        with torch.cuda.stream(self.ts):
            m = [mark()]
            part = torch.zeros((state["n"], H), dtype=y.dtype, device=self.dev)
            part.scatter_add_(0, state["r_idx"][:, None].expand(-1, H), y * state["row_w"][:, None].to(y.dtype))
            m.append(mark())
            back = part.new_empty((sum(state["in"]), H))
            dist.all_to_all_single(back, part, state["in"], state["out"])
            m.append(mark())
            out = torch.zeros((T, H), dtype=y.dtype, device=self.dev)
            out.scatter_add_(0, state["t_idx"][:, None].expand(-1, H), back)
            m.append(mark())
        return m, out

    def host_tokens(self, state) -> tuple[np.ndarray, np.ndarray]:
        t = state["tokens"].view(self.torch.int16).cpu().numpy().view(np.uint16)
        return t, state["counts"].cpu().numpy()

    def close(self) -> None:
        pass
