"""Symmetric buffers, peer writes over NVLink, the device barrier and its time-out, JIT warm start."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpu_cases import collective, multi_rank

pytestmark = pytest.mark.gpu

_PEER_WRITE = r"""
extern "C" __global__ void peer_write(const unsigned long long* peers, int rank, int world, int n) {
  // Rank r writes (r + 1) * 1000 + i into slot [r][i] of every peer's buffer.
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    for (int d = 0; d < world; ++d)
      reinterpret_cast<int*>(peers[d])[rank * n + i] = (rank + 1) * 1000 + i;
}
"""


@pytest.mark.mpi
def test_every_rank_reads_what_each_peer_wrote_into_its_buffer_after_the_barrier_eager_or_replayed(world):
    multi_rank(world)
    import cupy
    from ep import jit
    from ep.bootstrap import make_group
    from ep.peer_memory import ErrorRecord, SymmetricBuffer
    from ep.runtime_base import Barrier

    def body():
        group = make_group(world)
        W, n = world.size, 1024
        buf = SymmetricBuffer(group, W * n * 4, "test.data")
        sig = SymmetricBuffer(group, 4096, "test.sig")
        err = ErrorRecord()
        try:
            barrier = Barrier(jit.load(jit.KernelVariant.of("barrier.cu"), ["ep_barrier"])["ep_barrier"], sig, 0, err,
                              world.rank, W, int(10e9))
            kernel = cupy.RawKernel(_PEER_WRITE, "peer_write")
            stream = cupy.cuda.Stream(non_blocking=True)

            def step():
                barrier(stream)
                kernel((1,), (256,), (buf.table, np.int32(world.rank), np.int32(W), np.int32(n)), stream=stream)
                barrier(stream)

            with stream:    # the same step, captured once: its replays advance the device generation too
                stream.begin_capture()
                step()
                graph = stream.end_capture()
            for rep in range(6):
                if rep % 2:
                    graph.launch(stream)
                else:
                    step()
                stream.synchronize()
                assert not err.raised(), err.fields()
                got = cupy.asnumpy(cupy.ndarray((W, n), np.int32, cupy.cuda.MemoryPointer(
                    cupy.cuda.UnownedMemory(buf.ptr, W * n * 4, buf), 0)))
                want = (np.arange(W)[:, None] + 1) * 1000 + np.arange(n)[None, :]
                assert np.array_equal(got, want), f"rep {rep}"
                cupy.cuda.runtime.memset(buf.ptr, 0, W * n * 4)
                cupy.cuda.runtime.deviceSynchronize()
            assert int(barrier.generation.get()[0]) == 12   # eager and replayed barriers alike
            world.Barrier()
        finally:
            cupy.cuda.runtime.deviceSynchronize()
            world.Barrier()
            buf.close()
            sig.close()
            err.close()

    collective(world, body)


@pytest.mark.mpi
def test_barrier_times_out_naming_rank_peer_and_phase_when_a_peer_never_arrives(world):
    multi_rank(world)
    import cupy
    from ep import jit
    from ep.bootstrap import make_group
    from ep.peer_memory import ErrorRecord, SymmetricBuffer
    from ep.runtime_base import Barrier

    def body():
        group = make_group(world)
        sig = SymmetricBuffer(group, 4096, "test.sig")
        err = ErrorRecord()
        try:
            if world.rank == 0:   # the others never arrive
                barrier = Barrier(jit.load(jit.KernelVariant.of("barrier.cu"), ["ep_barrier"])["ep_barrier"], sig, 0,
                                  err, 0, world.size, int(0.3e9))
                barrier(cupy.cuda.get_current_stream())
                cupy.cuda.runtime.deviceSynchronize()
                assert err.raised()
                f = err.fields()
                assert f["phase"] == "barrier" and f["rank"] == 0 and 1 <= f["peer"] < world.size
                assert f["expected"] == 1 and f["observed"] == 0
                exc = err.as_timeout()
                assert exc.peer == f["peer"] and "barrier" in str(exc)
        finally:
            world.Barrier()
            sig.close()
            err.close()

    collective(world, body)


@pytest.mark.mpi
def test_dispatch_raises_a_timeout_instead_of_hanging_when_peers_do_not_call_it(world):
    multi_rank(world)
    import cupy
    from ep import EPTimeoutError, InvalidStateError, MoECommunicator, MoECommunicatorConfig

    def body():
        cfg = MoECommunicatorConfig(mode="ht", num_experts=4 * world.size, hidden_size=64, topk=2,
                                    max_tokens_per_rank=16, timeout_s=0.5)
        comm = MoECommunicator(cfg, world, backend="gpu")
        try:
            if world.rank == 0:   # the op gate (host) notices before any kernel waits
                x = cupy.zeros((4, 64), np.uint16)
                ids = cupy.zeros((4, 2), np.int64)
                with pytest.raises(EPTimeoutError, match=r"rank\(s\) \[1.*did not reach op 1") as info:
                    comm.dispatch(x, ids)
                assert info.value.phase == "op gate" and info.value.rank == 0 and info.value.peer == 1
                with pytest.raises(InvalidStateError):
                    comm.dispatch(x, ids)
        finally:
            comm.close()   # the gate is not a host collective of the group: close's barriers still pair

    collective(world, body)


def test_a_second_process_loads_every_kernel_from_the_disk_cache_without_compiling(tmp_path, world):
    if world.size > 1:
        pytest.skip("single-process test")
    script = textwrap.dedent("""
        import json, time
        from ep import envs, jit, tuning
        snap = envs.read()
        t0 = time.perf_counter(); compiled = []
        for v in tuning.all_variants():
            if "trap1" in v.name:
                continue
            path, fresh = jit.cached_cubin(v, jit.device_arch(), snap)
            compiled.append(fresh)
        kernels = jit.load(jit.KernelVariant.of("barrier.cu"), ["ep_barrier"], snap)
        print(json.dumps({"compiled": compiled, "seconds": time.perf_counter() - t0}))
    """)
    env = dict(os.environ, EP_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert all(runs[0]["compiled"]) and not any(runs[1]["compiled"])
    assert oct((tmp_path / "cache").stat().st_mode & 0o777) == oct(0o700)
    print(f"cold {runs[0]['seconds']:.2f} s, warm {runs[1]['seconds']:.3f} s")
