"""An error that only one rank sees must raise on every rank, never leave the other ranks waiting.

These cases cannot run inside the multi-rank suite (tests/mpi): when the property does not hold, the other
ranks block forever in a collective. So each case is a small 2-rank job under the venv's ``mpiexec``, with a
time limit; all jobs start together, so the suite waits for the time limit at most once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("mpi4py")

ROOT = Path(__file__).resolve().parents[2]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
RANKS = 2
# Two ranks start, import numpy and ep, and finish in about 2 s on a loaded 2-core machine.
LIMIT_S = 20

PRELUDE = """\
import json, os
import numpy as np
from mpi4py import MPI
from ep import MoECommunicator, MoECommunicatorConfig, testing
rank, W = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
rng = np.random.default_rng(rank)
x = testing.random_tokens(rng, 4, 16)
ids = testing.uniform_routing(rng, 4, 4 * W, 2)


def config(**kw):
    return MoECommunicatorConfig(**{**dict(num_experts=4 * W, hidden_size=16, topk=2, max_tokens_per_rank=8), **kw})


def report(outcome):
    with open(f"{result}.rank{rank}.json", "w") as f:     # one file per rank: their stdout lines interleave
        json.dump(outcome, f)


comm = None
try:
{body}
    report("ok")
except Exception as exc:
    report(type(exc).__name__)
if comm is not None:
    comm.close()
"""

# name -> (body run by every rank, outcome expected per rank, xfail reason or None)
JOBS = {
    "bad_expert_id_on_rank_0": (
        """
        comm = MoECommunicator(config(), backend="cpu")
        if rank == 0:
            ids[1, 0] = 4 * W
        comm.dispatch(x, ids)
        """, ["ValueError", "PeerInputError"], None),
    "config_not_fitting_the_world_on_rank_0": (
        """
        comm = MoECommunicator(config(num_experts=4 * W + (1 if rank == 0 else 0)), backend="cpu")
        """, ["ConfigError", "ConfigError"], None),
    "bad_knob_on_rank_0": (
        """
        if rank == 0:
            os.environ["EP_LL_WARPS"] = "3"
        comm = MoECommunicator(config(mode="ll"), backend="cpu")
        """, ["ConfigError", "ConfigError"], None),
    "bad_x_dtype_on_rank_0": (
        """
        comm = MoECommunicator(config(), backend="cpu")
        comm.dispatch(x.astype(np.float32) if rank == 0 else x, ids)
        """, ["TypeError", "PeerInputError"], None),
    "bad_expert_output_shape_on_rank_0": (
        """
        comm = MoECommunicator(config(), backend="cpu")
        out, handle = comm.dispatch(x, ids)
        y = out.tokens[:-1] if rank == 0 else out.tokens
        comm.combine(y, handle)
        """, ["ValueError", "PeerInputError"], None),
}


def run_jobs(names, directory: Path, env: dict) -> dict:
    """Start the jobs together; name -> (hit the time limit, per-rank outcome or None, output)."""
    procs = {}
    for name in names:
        body = JOBS[name][0]
        script = directory / f"{name}.py"
        text = PRELUDE.replace("{body}", textwrap.indent(textwrap.dedent(body).strip(), "    "))
        script.write_text(text.replace("{result}", str(directory / name)))
        procs[name] = subprocess.Popen([str(MPIEXEC), "-n", str(RANKS), sys.executable, str(script)], env=env,
                                       cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True)
    results = {}
    deadline = time.monotonic() + LIMIT_S
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)     # the job's own session: mpiexec and its ranks
            output, _ = proc.communicate()
            timed_out = True
        per_rank = []
        for r in range(RANKS):
            path = directory / f"{name}.rank{r}.json"
            per_rank.append(json.loads(path.read_text()) if path.is_file() else None)
        results[name] = (timed_out, per_rank, output)
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    if not MPIEXEC.is_file():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    env = {**os.environ, "EP_BACKEND": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("EP_LL_WARPS", None)
    directory = tmp_path_factory.mktemp("jobs")
    # NOTE: jobs known to hang spin at full CPU (MPI busy-polls) until the time limit; run the others first so
    # that they never compete with them for the cores.
    expected_to_finish = [name for name, (_, _, reason) in JOBS.items() if reason is None]
    known_to_hang = [name for name, (_, _, reason) in JOBS.items() if reason is not None]
    return {**run_jobs(expected_to_finish, directory, env), **run_jobs(known_to_hang, directory, env)}


@pytest.mark.parametrize("name", [
    # raises=AssertionError: only the property failing is expected, never the harness of this file.
    pytest.param(name, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)) if reason else name
    for name, (_, _, reason) in JOBS.items()])
def test_an_error_on_one_rank_raises_on_every_rank(outcomes, name):
    timed_out, per_rank, output = outcomes[name]
    expected = JOBS[name][1]
    assert not timed_out, (f"{name}: the job was still running after {LIMIT_S} s; per rank: {per_rank} "
                           f"(None: still waiting), expected {expected}; output:\n{output}")
    assert per_rank == expected, f"{name}: output:\n{output}"
