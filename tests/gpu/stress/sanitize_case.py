"""A small HT + LL round at the world size of the launch, for compute-sanitizer (not collected by pytest):

    mpirun -np 2 -x EP_SHARED_GPU=1 compute-sanitizer --tool memcheck python3 tests/gpu/stress/sanitize_case.py
"""
from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

from ep import Fp8Cast, HtTuning, MoECommunicator, MoECommunicatorConfig
from ep import testing as T


def main() -> int:
    import cupy
    world = MPI.COMM_WORLD
    W = world.size
    rng = np.random.default_rng(world.rank)
    for mode, tuning in (("ht", HtTuning()), ("ht", HtTuning(combine="pull", dispatch_copy="tma")), ("ll", HtTuning())):
        cfg = MoECommunicatorConfig(mode=mode, num_experts=4 * W, hidden_size=512, topk=2, max_tokens_per_rank=16,
                                    num_sms=4, timeout_s=120, ht_tuning=tuning)
        with MoECommunicator(cfg, world, backend="gpu") as comm:
            for call in range(2):
                n = 16 - world.rank - call
                x = cupy.asarray(T.random_tokens(rng, n, 512))
                ids = cupy.asarray(T.uniform_routing(rng, n, cfg.num_experts, 2))
                out, h = comm.dispatch(x, ids)
                comm.combine(out.tokens if mode == "ht" else out.tokens, h)
                if mode == "ht" and call == 1:
                    out, h = comm.dispatch(x, ids, previous_handle=h)
                    comm.combine(out.tokens, h)
                if mode == "ll":
                    o8, h8 = comm.dispatch(x, ids, cast=Fp8Cast(ue8m0=False))
                    comm.combine(cupy.zeros(o8.tokens.shape, np.uint16), h8)
            comm.synchronize()
    if world.rank == 0:
        print(f"sanitize case W={W}: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
