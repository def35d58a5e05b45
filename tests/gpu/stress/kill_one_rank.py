"""Fault injection (not collected by pytest): W processes on torch.distributed (gloo, so that one rank's death
does not end the job as mpirun would), each looping dispatch/combine (HT, or LL with --ll); the driver
SIGKILLs rank VICTIM mid-loop and checks that every other rank raises EPTimeoutError naming it within
timeout_s + 5 s and exits. Prints one summary line; exit code 1 when a rank misbehaves.

    python3 tests/gpu/stress/kill_one_rank.py [--world 4] [--victim 2] [--timeout 3] [--ll]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time


def child(rank: int, world: int, port: int, timeout: float, mode: str) -> None:
    import cupy
    import numpy as np
    import torch.distributed as dist

    from ep import EPTimeoutError, MoECommunicator, MoECommunicatorConfig
    from ep import testing as T
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = MoECommunicatorConfig(mode=mode, num_experts=8 * world, hidden_size=512, topk=4, max_tokens_per_rank=64,
                                num_sms=8, timeout_s=timeout, shared_gpu=True)
    comm = MoECommunicator(cfg)        # group=None: torch.distributed's world
    rng = np.random.default_rng(rank)
    ids = cupy.asarray(T.uniform_routing(rng, 64, cfg.num_experts, cfg.topk))
    x = cupy.asarray(T.random_tokens(rng, 64, cfg.hidden_size))
    print(json.dumps({"rank": rank, "ready": True}), flush=True)
    it = 0
    try:
        while True:
            out, h = comm.dispatch(x, ids)
            comm.combine(out.tokens, h)
            comm.synchronize()
            it += 1
    except EPTimeoutError as exc:
        print(json.dumps({"rank": rank, "error": "EPTimeoutError", "peer": exc.peer, "phase": exc.phase,
                          "iterations": it, "message": str(exc)[:200], "t": time.time()}), flush=True)
        os._exit(0)
    except BaseException as exc:   # anything else is a finding
        print(json.dumps({"rank": rank, "error": type(exc).__name__, "message": str(exc)[:300], "t": time.time()}),
              flush=True)
        os._exit(3)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--victim", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--ll", action="store_true")
    p.add_argument("--child", type=int, default=-1)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    mode = "ll" if a.ll else "ht"
    if a.child >= 0:
        child(a.child, a.world, a.port, a.timeout, mode)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", EP_SHARED_GPU="1")
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE"):
        env.pop(var, None)
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(r), "--world", str(a.world), "--port", str(port),
                               "--timeout", str(a.timeout)] + (["--ll"] if a.ll else []), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(a.world)]
    for pr in procs:
        line = pr.stdout.readline()
        if '"ready"' not in line:
            print("child failed to start:", line, pr.stderr.read()[-2000:])
            return 1
    time.sleep(2.0)                       # the loop runs on every rank
    killed_at = time.time()
    procs[a.victim].send_signal(signal.SIGKILL)
    results, ok = [], True
    for r, pr in enumerate(procs):
        if r == a.victim:
            pr.wait()
            continue
        try:
            out, err = pr.communicate(timeout=a.timeout * 2 + 20)
        except subprocess.TimeoutExpired:
            pr.kill()
            results.append(f"rank {r}: HUNG")
            ok = False
            continue
        rec = json.loads(out.strip().splitlines()[-1])
        took = rec.get("t", time.time()) - killed_at
        good = rec.get("error") == "EPTimeoutError" and rec.get("peer") == a.victim and took <= a.timeout + 5
        ok &= good
        results.append(f"rank {r}: {rec.get('error')} naming rank {rec.get('peer')} in phase '{rec.get('phase')}' "
                       f"{took:.2f} s after the kill ({rec.get('iterations')} iterations){'' if good else ' FAIL'}")
    print(f"fault injection {mode} W={a.world}, rank {a.victim} SIGKILLed, timeout_s={a.timeout}: "
          f"{'OK' if ok else 'FAILED'}")
    for line in results:
        print("  " + line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
