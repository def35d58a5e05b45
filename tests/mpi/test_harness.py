"""The multi-rank harness itself (conftest.py): failures and seeds are shared by every rank."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mpi4py")


def test_every_rank_has_the_same_session_seed(mpi):
    assert len(set(mpi.allgather(mpi.session_seed))) == 1


def test_generators_differ_between_ranks_and_streams(mpi):
    draws = mpi.allgather(mpi.rng().integers(0, 2 ** 62, size=4).tolist())
    assert len({tuple(d) for d in draws}) == mpi.size
    assert mpi.rng(call=1).integers(0, 2 ** 62) != mpi.rng(call=0).integers(0, 2 ** 62)
    assert np.array_equal(mpi.rng(rank=0).integers(0, 2 ** 62, size=4), draws[0]), "any rank can redraw another's"


def test_one_rank_failing_a_check_fails_every_rank(mpi):
    last = mpi.size - 1
    with pytest.raises(mpi.Failure) as info:
        with mpi.checking("a deliberate failure"):
            assert mpi.rank != last, "deliberate"
    text = str(info.value)
    assert f"rank(s) [{last}] failed in a deliberate failure" in text
    assert "AssertionError: deliberate" in text
    assert f"EP_TEST_SEED={mpi.session_seed}" in text, "the seed is printed with every failure"


def test_passing_checks_raise_nothing(mpi):
    with mpi.checking("nothing wrong"):
        assert True


def test_raises_takes_a_per_rank_exception_type(mpi):
    expected = KeyError if mpi.rank % 2 else IndexError

    def fail():
        raise expected("per rank")

    assert isinstance(mpi.raises(expected, fail, match="per rank"), expected)
    with pytest.raises(mpi.Failure, match="DID NOT RAISE"):
        mpi.raises(ValueError, lambda: None)
