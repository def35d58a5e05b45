"""Where an eager call's host time goes (one GPU, W=1): cProfile over N eager LL dispatch+combine and HT
cached dispatch+combine calls, the GPU synchronized before each, then the top entries by own time.

    python3 tools/host_profile.py [N]
"""
from __future__ import annotations

import cProfile
import pstats
import sys

import numpy as np


def main() -> int:
    import cupy

    from ep import MoECommunicator, MoECommunicatorConfig
    from ep import testing as T
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    rng = np.random.default_rng(0)
    stream = cupy.cuda.Stream(non_blocking=True)
    for mode, tokens in (("ll", 128), ("ht", 512)):
        cfg = MoECommunicatorConfig(mode=mode, num_experts=256, hidden_size=7168, topk=8, max_tokens_per_rank=tokens)
        with MoECommunicator(cfg, backend="gpu") as comm:
            x = cupy.asarray(T.random_tokens(rng, tokens, 7168))
            ids = cupy.asarray(T.uniform_routing(rng, tokens, 256, 8))
            out, h = comm.dispatch(x, ids, stream=stream)
            comm.combine(out.tokens, h, stream=stream)
            prof = cProfile.Profile()
            for _ in range(n):
                stream.synchronize()
                prof.enable()
                if mode == "ll":
                    out, h = comm.dispatch(x, ids, stream=stream)
                    comm.combine(out.tokens, h, stream=stream)
                else:
                    out, h2 = comm.dispatch(x, ids, previous_handle=h, stream=stream)
                    comm.combine(out.tokens, h2, stream=stream)
                prof.disable()
            stream.synchronize()
            print(f"===== {mode}: {n} x (dispatch + combine), host time by function (own time first) =====")
            st = pstats.Stats(prof)
            st.sort_stats("tottime").print_stats(14)
    return 0


if __name__ == "__main__":
    sys.exit(main())
