"""ep.bench: ``python -m ep.bench``, the benchmark of ep's dispatch and combine (HT and LL) against the
link ceiling and an NCCL all-to-all dispatcher, on every local GPU (one process per GPU, launched by
mpirun or torchrun), or on the CPU backend for a smoke run.

Modules: cli (arguments, cases, output), workload (inputs, byte counts), timing (flush, barriers, events),
ep_runs (ep through the public MoECommunicator API), baselines / ceiling / nccl_a2a (GPU-only baselines),
copy_params (mirror of ep/bench/cuda/bench_copy.cu's params), validate (--validate), report (table, JSON, plot),
gpu (GPU-only helpers), procenv (the launcher's and NCCL's environment).

NOTE: the rule "only ep/envs.py reads os.environ" has one stated exception here: ep/bench/procenv.py reads
the launcher's variables (torchrun's RANK/WORLD_SIZE/LOCAL_RANK) and sets NCCL_NVLS_ENABLE=0 and the
torch.distributed rendezvous variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) when unset. ep's own
knobs are still read only through ep.envs. The benchmark is a command, not library code.
"""
from .cli import main

__all__ = ["main"]
