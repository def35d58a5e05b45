"""A whole MoE layer with ep and torch, checked against a dense one-GPU computation of the same layer.

    mpirun -np 4 python examples/moe_layer.py [--mode ht|ll] [--tokens 512] [--hidden 2048]

Every rank holds the weights of all experts (small sizes, so the dense check can run everywhere) but only
applies its own local experts to the tokens dispatch gives it. The expert is one linear layer
``y = x @ W_e`` in bf16. The dense check computes, for this rank's own tokens, ``sum_k w[t,k] * x[t] @ W_k``
in fp32 and compares.
"""
from __future__ import annotations

import argparse
import sys

import torch
from mpi4py import MPI

from ep import DispatchLayout, MoECommunicator, MoECommunicatorConfig
from ep import testing


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ht", "ll"], default="ht")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    world = MPI.COMM_WORLD
    rank, W = world.rank, world.size
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda")
    E, H, K, T = args.experts, args.hidden, args.topk, args.tokens
    L = E // W

    # The same expert weights on every rank (seeded); tokens and routing differ per rank.
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    experts = (torch.randn(E, H, H, generator=gen) / H ** 0.5).to(dev, torch.bfloat16)
    rng = testing.seed_for(args.seed, rank)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(args.seed + 1 + rank)).to(dev, torch.bfloat16)
    topk_ids = torch.from_numpy(testing.uniform_routing(rng, T, E, K)).to(dev)
    weights = torch.softmax(torch.randn(T, K, device=dev), dim=-1).float()

    cfg = MoECommunicatorConfig(mode=args.mode, num_experts=E, hidden_size=H, topk=K, max_tokens_per_rank=T,
                                output_layout=DispatchLayout.FLAT if args.mode == "ht" else DispatchLayout.EXPERT_MAJOR)
    with MoECommunicator(cfg) as comm:
        out, handle = comm.dispatch(x, topk_ids, weights)
        # Expert MLP on the rows of each local expert.
        y = torch.empty_like(out.tokens)
        if args.mode == "ht":
            for e, count in enumerate(out.num_tokens_per_expert_host):
                first = int(out.expert_offsets[e])
                y[first:first + count] = out.tokens[first:first + count] @ experts[rank * L + e]
        else:
            y.zero_()
            counts = out.num_tokens_per_expert.tolist()   # a host sync, fine in an example
            for e, count in enumerate(counts):
                y[e, :count] = out.tokens[e, :count] @ experts[rank * L + e]
        combined = comm.combine(y, handle)
        torch.cuda.synchronize()

    # Dense reference of this rank's own tokens.
    dense = torch.zeros(T, H, device=dev, dtype=torch.float32)
    for k in range(K):
        ids = topk_ids[:, k]
        per_token = torch.einsum("th,thj->tj", x.float(), experts[ids].float())
        dense += weights[:, k:k + 1] * per_token.to(torch.bfloat16).float()
    err = ((combined.float() - dense).norm() / dense.norm()).item()
    errors = world.gather(err, root=0)
    if rank == 0:
        print(f"mode={args.mode} W={W} T={T} H={H} E={E} K={K}: relative error per rank "
              + ", ".join(f"{e:.2e}" for e in errors))
    ok = world.allreduce(int(err < 2e-2), op=MPI.MIN)
    if rank == 0:
        print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
