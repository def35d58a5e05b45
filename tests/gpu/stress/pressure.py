"""Pressure run (not collected by pytest): ITERS dispatch/combine rounds at the world size of the launch
(mpirun -np W, EP_SHARED_GPU=1 on one GPU), changing routing, T (0 included), skew and drop every round,
uncached and cached HT dispatches mixed, and LL rounds in between; every output compared bit for bit with
the CPU backend over the same ranks. Prints one summary line on rank 0; exit code 1 on any mismatch.

    mpirun -np 4 -x EP_SHARED_GPU=1 python3 tests/gpu/stress/pressure.py [iters]
"""
from __future__ import annotations

import sys
import time

import numpy as np
from mpi4py import MPI

from ep import MoECommunicator, MoECommunicatorConfig
from ep import testing as T
from ep.reference import bf16_to_f32, f32_to_bf16


def main() -> int:
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    world = MPI.COMM_WORLD
    rank, W = world.rank, world.size
    import cupy
    seed = world.bcast(int(time.time()) if rank == 0 else None, root=0)
    ht = MoECommunicatorConfig(mode="ht", num_experts=8 * W, hidden_size=256, topk=4, max_tokens_per_rank=64,
                               num_sms=8, timeout_s=30, expert_alignment=4)
    ll = MoECommunicatorConfig(mode="ll", num_experts=8 * W, hidden_size=256, topk=4, max_tokens_per_rank=64,
                               num_sms=8, timeout_s=30)
    comms = {m: (MoECommunicator(c, world, backend="gpu"), MoECommunicator(c, world, backend="cpu"))
             for m, c in (("ht", ht), ("ll", ll))}
    rng = np.random.default_rng([seed, rank])
    bad, counts = [], {"ht uncached": 0, "ht cached": 0, "ll": 0}
    handle, ht_ids = None, None
    start = time.monotonic()
    for it in range(iters):
        mode = "ll" if it % 5 == 4 else "ht"
        gpu, ref = comms[mode]
        cfg = ht if mode == "ht" else ll
        cached = mode == "ht" and handle is not None and it % 3 == 1
        if cached:
            ids = ht_ids
        else:
            n = int(rng.choice([0, 1, 17, 64, int(rng.integers(0, 65))]))
            n = world.allgather(n)[rank]
            kind = ("uniform", "skewed")[it % 2]
            ids = T.routing(kind, rng, n, cfg.num_experts, cfg.topk, drop=float(rng.choice([0.0, 0.1, 0.5])))
        x = T.random_tokens(rng, ids.shape[0], cfg.hidden_size)
        w = T.random_weights(rng, ids.shape[0], cfg.topk)
        xd, idsd, wd = cupy.asarray(x), cupy.asarray(ids), cupy.asarray(w)
        if cached:
            out, h = gpu.dispatch(xd, idsd, wd, previous_handle=handle)
            counts["ht cached"] += 1
        else:
            out, h = gpu.dispatch(xd, idsd, wd)
            counts["ht uncached" if mode == "ht" else "ll"] += 1
        want, wh = ref.dispatch(x, ids, w)
        got = cupy.asnumpy(out.tokens)
        c = cupy.asnumpy(out.num_tokens_per_expert)
        if not np.array_equal(c, want.num_tokens_per_expert):
            bad.append(f"iter {it} {mode}: counts")
        elif mode == "ht" and not np.array_equal(got, want.tokens):
            bad.append(f"iter {it} ht: tokens")
        elif mode == "ll" and not all(np.array_equal(got[e, :k], want.tokens[e, :k]) for e, k in enumerate(c)):
            bad.append(f"iter {it} ll: tokens")
        y = f32_to_bf16(bf16_to_f32(want.tokens) * 0.5)
        comb = cupy.asnumpy(gpu.combine(cupy.asarray(y), h))
        if not np.array_equal(comb, ref.combine(y, wh)):
            bad.append(f"iter {it} {mode}: combine")
        if mode == "ht":
            handle, ht_ids = h, ids
    for gpu, ref in comms.values():
        gpu.close()
        ref.close()
    everyone = world.gather(bad, root=0)
    if rank == 0:
        problems = [f"rank {r}: {p}" for r, ps in enumerate(everyone) for p in ps]
        print(f"pressure W={W}: {iters} iterations ({counts}) in {time.monotonic() - start:.1f} s, seed {seed}: "
              f"{'every output bit-identical to the reference' if not problems else f'{len(problems)} MISMATCHES'}")
        for p in problems[:10]:
            print("  ", p)
    return 1 if world.allreduce(len(bad)) else 0


if __name__ == "__main__":
    sys.exit(main())
