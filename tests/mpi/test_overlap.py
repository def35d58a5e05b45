"""Overlap APIs on the CPU backend: async ops and their events, the readiness signals of an overlapped LL
combine, and their misuse. Same harness as test_cpu_backend (collective tests, fresh inputs every run)."""
from __future__ import annotations

import numpy as np
import pytest

from ep import CommEvent, CommOverlapConfig, InvalidStateError, OverlapSignals, PeerInputError

from test_cpu_backend import (check_combine, check_dispatch, draw_inputs, expected_combine, expected_dispatch,
                              good_call, make_config, mlp, small, token_counts)

MODES = ["ht", "ll"]


def ll_overlap_config(world: int):
    """LL with a combine SM budget: a signalled combine must leave the MLP its SMs."""
    return make_config("ll", world=world, t_max=8, overlap=CommOverlapConfig(combine_num_sms=8))


@pytest.mark.parametrize("mode", MODES)
def test_async_ops_give_the_plain_results_and_complete_events(mpi, communicators, mode):
    W, r = mpi.size, mpi.rank
    comm = communicators(make_config(mode, world=W, t_max=8))
    cfg = comm.config
    event = None
    for call in range(3):   # the second call waits on the first's event
        inp = draw_inputs(mpi, cfg, token_counts(W, 8, call)[r], call=call)
        prev = None if call != 1 else event
        out, handle, event = comm.dispatch_async(inp.x, inp.ids, inp.w, previous_event=prev)
        assert isinstance(event, CommEvent) and event.query()
        event.current_stream_wait()
        refs = expected_dispatch(cfg, W, inp)
        with mpi.checking("async dispatch"):
            check_dispatch(out, refs[r], cfg, W)
        y = mlp(out.tokens, out.expert_offsets, r, comm.num_local_experts)
        got, event = comm.combine_async(y, handle, previous_event=event)
        event.synchronize()
        with mpi.checking("async combine"):
            check_combine(got, expected_combine(cfg, W, r, refs, inp), inp.x.shape[0], cfg.hidden_size)


def test_a_previous_event_that_is_not_an_event_raises_on_every_rank(mpi, communicators):
    comm = communicators(small("ht", mpi.size))
    inp = draw_inputs(mpi, comm.config, 4)
    mine = mpi.rank == 0
    expected = TypeError if mine else PeerInputError
    mpi.raises(expected, comm.dispatch_async, inp.x, inp.ids, inp.w, previous_event="ev" if mine else None,
               match="previous_event: the CPU backend takes an ep.CommEvent" if mine else "previous_event")
    good_call(mpi, comm)


def _ll_round(mpi, comm, call: int):
    W, r, cfg = mpi.size, mpi.rank, comm.config
    inp = draw_inputs(mpi, cfg, token_counts(W, cfg.max_tokens_per_rank, call)[r], call=call)
    out, handle = comm.dispatch(inp.x, inp.ids, inp.w)
    refs = expected_dispatch(cfg, W, inp)
    y = mlp(np.asarray(out.tokens), out.expert_offsets, r, comm.num_local_experts)
    return inp, refs, y, handle


@pytest.mark.parametrize("target", [1, 3])
def test_an_overlapped_combine_gives_the_plain_result_and_leaves_the_counters_ready(mpi, communicators, target):
    W, r = mpi.size, mpi.rank
    comm = communicators(ll_overlap_config(W))
    signals = comm.create_overlap_config(target=target)
    assert isinstance(signals, OverlapSignals) and signals.counters.shape == (comm.num_local_experts,)
    assert not signals.counters.any()
    for call in range(2):   # the same signals serve the next combine
        inp, refs, y, handle = _ll_round(mpi, comm, call)
        for _ in range(target):
            signals.signal(0)                               # expert by expert, as an MLP finishes them
            signals.signal(1, count=comm.num_local_experts - 1)
        got = comm.combine(y, handle, overlap=signals)
        with mpi.checking("overlapped combine"):
            check_combine(got, expected_combine(comm.config, W, r, refs, inp), inp.x.shape[0], 64)
            assert not signals.counters.any(), "the combine takes its target off every counter"


def test_an_unsignalled_expert_raises_on_every_rank_and_nothing_moves(mpi, communicators):
    W, r = mpi.size, mpi.rank
    comm = communicators(ll_overlap_config(W))
    signals = comm.create_overlap_config(target=2)
    inp, refs, y, handle = _ll_round(mpi, comm, 0)
    signals.signal(add=2)
    if r == 0:
        signals.counters[1] = 1           # rank 0's MLP forgot half of expert 1's signals
    mine = r == 0
    mpi.raises(InvalidStateError if mine else PeerInputError, comm.combine, y, handle, overlap=signals,
               match="local expert 1's counter is 1, below its target 2" if mine else "overlap")
    with mpi.checking("counters untouched by the refused combine"):
        assert list(signals.counters) == ([2, 1] if mine else [2, 2]) + [2] * (comm.num_local_experts - 2)
    signals.signal(1, add=1) if mine else None
    got = comm.combine(y, handle, overlap=signals)
    with mpi.checking("the combine after the refusal"):
        check_combine(got, expected_combine(comm.config, W, r, refs, inp), inp.x.shape[0], 64)


def test_overlap_config_misuse_raises_clearly(mpi, communicators):
    W = mpi.size
    ll = communicators(ll_overlap_config(W))
    other = communicators(ll_overlap_config(W))
    ht = communicators(small("ht", W))
    with mpi.checking("local argument checks"):
        with pytest.raises(ValueError, match="mode='ll'"):
            ht.create_overlap_config()
        with pytest.raises(ValueError, match="target must be an int"):
            ll.create_overlap_config(target=0)
        signals = ll.create_overlap_config()
        with pytest.raises(ValueError, match=r"experts \[3, 5\) outside \[0, 4\)"):
            signals.signal(3, count=2)
        with pytest.raises(ValueError, match="add must be"):
            signals.signal(0, add=0)
    inp, refs, y, handle = _ll_round(mpi, ll, 0)
    signals.signal()
    mpi.raises(InvalidStateError, ll.combine, y, handle, overlap=other.create_overlap_config(),
               match="signals belong to another communicator")
    mpi.raises(TypeError, ll.combine, y, handle, overlap=object(), match="overlap must be an ep.OverlapSignals")
    got = ll.combine(y, handle, overlap=signals)
    with mpi.checking("combine after the misuse"):
        check_combine(got, expected_combine(ll.config, W, mpi.rank, refs, inp), inp.x.shape[0], 64)


def test_a_signalled_combine_needs_an_sm_budget_and_a_hook_releases_the_counters(mpi, communicators):
    W, r = mpi.size, mpi.rank
    plain = communicators(make_config("ll", world=W, t_max=8))
    inp, refs, y, handle = _ll_round(mpi, plain, 0)
    signals = plain.create_overlap_config()
    signals.signal()
    mpi.raises(ValueError, plain.combine, y, handle, overlap=signals, match="set CommOverlapConfig\\(combine_num_sms")
    comm = communicators(ll_overlap_config(W))
    inp, refs, y, handle = _ll_round(mpi, comm, 1)
    signals = comm.create_overlap_config()
    signals.signal()
    got, hook = comm.combine(y, handle, overlap=signals, return_recv_hook=True)
    with mpi.checking("counters held until the receive half"):
        assert list(signals.counters) == [1] * comm.num_local_experts
    hook()
    with mpi.checking("hooked overlapped combine"):
        assert not signals.counters.any()
        check_combine(got, expected_combine(comm.config, W, r, refs, inp), inp.x.shape[0], 64)
