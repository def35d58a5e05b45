"""GPU tests: skipped without a CUDA device. Multi-rank tests (marked ``mpi``) run under
``mpirun -np W python -m pytest tests/gpu`` (``make test-gpu``); every rank runs the same session. With
``EP_SHARED_GPU=1`` there may be more ranks than GPUs: ranks share GPUs round-robin (correctness only).

A failure on one rank must fail every rank instead of leaving the others in a collective: test bodies
run through :func:`collective`, which shares a failure flag (and the failing rank's message) before the
test returns. Inputs are fresh random data every run; the session seed is printed on failure.
"""
from __future__ import annotations

import faulthandler
import os
import secrets
import sys

import pytest

# A GPU test takes seconds; one stuck this long waits for a peer that left: dump every thread's stack.
STUCK_AFTER_S = 120


def _gpu_count() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


GPUS = _gpu_count()


HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if GPUS == 0:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run with make test-gpu)")
        for item in items:
            if str(item.fspath).startswith(HERE):   # only this directory's tests
                item.add_marker(skip)


def shared_gpus() -> bool:
    from ep import envs
    return bool(envs.read().shared_gpu)


@pytest.fixture(scope="session")
def world():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.size > GPUS and not shared_gpus():
        pytest.skip(f"{comm.size} ranks but {GPUS} GPUs (EP_SHARED_GPU=1 lets ranks share GPUs)")
    import cupy
    cupy.cuda.Device(comm.rank % GPUS).use()
    return comm


@pytest.fixture(scope="session")
def session_seed(world):
    seed = world.bcast(secrets.randbits(31) if world.rank == 0 else None, root=0)
    return seed




@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(STUCK_AFTER_S, exit=False, file=sys.stderr)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()
