"""Harness of the multi-rank tests of the CPU backend.

Every rank runs the same pytest session::

    EP_BACKEND=cpu mpiexec -n N python -m pytest tests/mpi -q -p no:cacheprovider

so every test is collective and runs in the same order on every rank. The harness guarantees:

- One rank's failure fails every rank instead of hanging the others. Each test body's outcome is shared
  (``pytest_pyfunc_call`` below), and a test shares the outcome of its local checks before its next
  collective call with ``with mpi.checking("what"):``. Every rank then raises, with the tracebacks of the
  ranks that failed; only rank 0 prints a report (the others' outcomes are the same by construction).
- Fresh random inputs every run: rank 0 draws a session seed and broadcasts it; each test and rank derive
  their generators from (session seed, test id, rank). The seed is printed in the header and in every
  failure; ``EP_TEST_SEED=<seed>`` repeats a run's inputs.
- A test stuck in a collective (a rank that raised where the others did not) dumps every rank's stack and
  exits after ``STUCK_AFTER_S`` seconds, so mpiexec ends the job instead of hanging CI.
- Ranks that collected different tests stop before running any.

Collectives of the harness go over a duplicate of COMM_WORLD, so they can never be matched with the
collectives of the library under test.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import secrets
import sys
import threading
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest

try:
    from mpi4py import MPI
except ImportError:       # the directory is skipped (see pytest_collection_modifyitems)
    MPI = None

HERE = Path(__file__).resolve().parent
SEED_VAR = "EP_TEST_SEED"
# A test of this suite takes well under a second per rank; 3 minutes means a rank waits for a peer that left.
STUCK_AFTER_S = 180


def _ours(item) -> bool:
    return HERE in Path(item.path).resolve().parents


def _format(error: BaseException) -> str:
    """The traceback of ``error`` from the first frame that is not pytest's, pluggy's or this harness'."""
    tb = error.__traceback__
    while tb is not None and _harness_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb or error.__traceback__))


def _harness_frame(filename: str) -> bool:
    return filename == __file__ or f"{os.sep}_pytest{os.sep}" in filename or f"{os.sep}pluggy{os.sep}" in filename


class SharedFailure(AssertionError):
    """Raised on every rank when at least one rank failed; carries every failing rank's traceback."""


class Ranks:
    """The world of one pytest session: rank, size, seeds, and outcome sharing."""

    Failure = SharedFailure

    def __init__(self, harness, session_seed: int):
        self.harness = harness                 # a Dup of COMM_WORLD, for the harness only
        self.rank = harness.Get_rank()
        self.size = harness.Get_size()
        self.session_seed = session_seed
        self.nodeid = ""

    # ------------------------------------------------------------------------------------ seeds
    @property
    def test_key(self) -> int:
        return zlib.crc32(self.nodeid.encode())

    def seed_text(self) -> str:
        return (f"session seed {self.session_seed} (repeat with {SEED_VAR}={self.session_seed}), "
                f"test {self.nodeid!r} key {self.test_key}, {self.size} ranks")

    def rng(self, call: int = 0, rank: int | None = None) -> np.random.Generator:
        """This rank's generator for this test (``call`` numbers independent streams within one test)."""
        rank = self.rank if rank is None else rank
        return np.random.default_rng([self.session_seed, self.test_key, rank, call])

    # -------------------------------------------------------------------------------- collectives
    def allgather(self, obj):
        return self.harness.allgather(obj)

    def share(self, error: BaseException | None, what: str) -> None:
        """Collective: every rank raises if any rank's ``error`` is not None (skips must agree)."""
        if isinstance(error, SharedFailure):
            kind, text = "shared", str(error)
        elif isinstance(error, pytest.skip.Exception):
            kind, text = "skipped", str(error)
        elif error is not None:
            kind, text = "failed", _format(error)
        else:
            kind, text = "passed", ""
        outcomes = self.allgather((kind, text))
        kinds = {k for k, _ in outcomes}
        if kinds == {"passed"}:
            return
        if kinds == {"skipped"}:
            raise error
        if kinds == {"shared"}:
            raise error                          # an inner `checking` already told every rank
        failed = [(r, t) for r, (k, t) in enumerate(outcomes) if k in ("failed", "shared")]
        if not failed:
            failed = [(r, f"{k}: {t}") for r, (k, t) in enumerate(outcomes)]
            header = "ranks disagree on skipping"
        else:
            header = f"rank(s) {[r for r, _ in failed]} failed"
        body = "\n".join(f"----- rank {r} -----\n{t}" for r, t in failed)
        raise SharedFailure(f"{header} in {what}; {self.seed_text()}\n{body}") from None

    @contextlib.contextmanager
    def checking(self, what: str):
        """Run local checks; before anyone moves on to the next collective, every rank learns whether
        any rank failed them, and then every rank raises."""
        error = None
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:       # AssertionError, pytest.raises' Failed, anything the check hit
            error = exc
        self.share(error, what)

    def raises(self, expected, fn, *args, match: str | None = None, what: str = "", **kwargs):
        """Collective ``pytest.raises``: ``expected`` may differ per rank (pass this rank's type)."""
        with self.checking(what or f"expecting {getattr(expected, '__name__', expected)}"):
            with pytest.raises(expected, match=match) as info:
                fn(*args, **kwargs)
        return info.value


@pytest.fixture
def communicators():
    """Build communicators through this fixture; they are closed (collectively) after the test."""
    made = []

    def make(cfg, **kwargs):
        from ep import MoECommunicator
        comm = MoECommunicator(cfg, backend="cpu", **kwargs)
        made.append(comm)
        return comm

    yield make
    for comm in made:
        comm.close()


_RANKS: Ranks | None = None


@pytest.hookimpl(trylast=True)     # after the terminal reporter is registered
def pytest_configure(config):
    global _RANKS
    if MPI is None or _RANKS is not None:
        return
    harness = MPI.COMM_WORLD.Dup()
    seed = None
    if harness.Get_rank() == 0:
        raw = os.environ.get(SEED_VAR, "").strip()
        seed = int(raw) if raw else secrets.randbits(63)
    _RANKS = Ranks(harness, harness.bcast(seed, root=0))
    if _RANKS.rank != 0:
        # Outcomes are shared, so every rank's report is rank 0's: print one report, not N interleaved ones.
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)


def pytest_report_header(config):
    if _RANKS is not None:
        return [f"ep mpi tests: {_RANKS.size} rank(s), session seed {_RANKS.session_seed} "
                f"(repeat with {SEED_VAR}={_RANKS.session_seed})"]
    return []


def pytest_collection_modifyitems(config, items):
    if MPI is None:
        skip = pytest.mark.skip(reason="mpi4py is not installed")
        for item in items:
            if _ours(item):
                item.add_marker(skip)


def pytest_collection_finish(session):
    if _RANKS is None:
        return
    mine = ([item.nodeid for item in session.items], session.testsfailed)
    everyone = _RANKS.allgather(mine)
    if any(other != everyone[0] for other in everyone) or any(failed for _, failed in everyone):
        problems = [f"rank {r}: {len(ids)} tests, {failed} collection errors"
                    for r, (ids, failed) in enumerate(everyone)]
        if _RANKS.rank != 0:
            print(f"[rank {_RANKS.rank}] collection: {problems[_RANKS.rank]}", file=sys.stderr)
        raise session.Interrupted("ranks collected different tests or failed to collect: " + "; ".join(problems))


def _abort_stuck_job(item) -> None:
    """Timer thread: the test is stuck in a collective. Show where every thread of this rank is, end the job."""
    capman = item.config.pluginmanager.getplugin("capturemanager")
    try:
        if capman is not None:
            capman.suspend_global_capture(in_=False)    # write to the real stderr, not pytest's capture file
    except Exception:
        pass
    sys.stderr.write(f"\n[rank {_RANKS.rank}] {item.nodeid} has waited {STUCK_AFTER_S} s, most likely in a collective "
                     f"that another rank left; aborting the job. {_RANKS.seed_text()}\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(3)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if _RANKS is None or not _ours(item):
        return (yield)
    _RANKS.nodeid = item.nodeid
    timer = threading.Timer(STUCK_AFTER_S, _abort_stuck_job, args=(item,))
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    if _RANKS is None or not _ours(pyfuncitem):
        return (yield)
    error = None
    try:
        result = yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        error = exc
    _RANKS.share(error, "the test body")
    return result


@pytest.fixture(scope="session")
def comm_world():
    """mpi4py's COMM_WORLD (what the communicators under test use by default)."""
    if MPI is None:
        pytest.skip("mpi4py is not installed")
    return MPI.COMM_WORLD


@pytest.fixture
def mpi(comm_world) -> Ranks:
    """Rank, size, per-test seeds and collective checks of this session."""
    assert _RANKS is not None
    return _RANKS
