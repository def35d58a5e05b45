"""How the HT grids are shaped: sender and receiver blocks of the dispatch, shared memory of the combine
gather (ep/ht.py dispatch_senders, combine_smem)."""
import pytest

from ep import envs
from ep.errors import ConfigError
from ep import sizes
from ep.ht import combine_smem, dispatch_senders


def test_a_third_of_the_blocks_send_by_default_and_at_least_one():
    knobs = envs.defaults()
    assert dispatch_senders(knobs, 24) == 8
    assert dispatch_senders(knobs, 32) == 10
    assert dispatch_senders(knobs, 2) == 1
    assert dispatch_senders(knobs, 4) == 1


def test_the_knob_sets_the_sender_count_when_it_leaves_a_receiver():
    knobs = envs.read({"EP_DISPATCH_SENDERS": "6"})
    assert dispatch_senders(knobs, 24) == 6
    assert dispatch_senders(knobs, 7) == 6
    with pytest.raises(ConfigError, match="no receiver block"):
        dispatch_senders(knobs, 6)


def test_a_one_block_grid_is_refused_because_both_roles_need_a_block():
    with pytest.raises(ConfigError, match="at least 2 blocks"):
        dispatch_senders(envs.defaults(), 1)


def test_the_gather_takes_a_ring_plus_one_own_partial_stage_of_shared_memory_per_warp():
    knobs = envs.defaults()
    assert combine_smem(knobs, 16) == 16 * (knobs["EP_CMB_TMA_STAGES"] + 1) * sizes.COMBINE_SEG_BYTES
    assert combine_smem(envs.read({"EP_CMB_TMA": "0"}), 16) == 0


def test_rings_that_do_not_fit_in_shared_memory_are_refused_naming_the_knobs():
    knobs = envs.read({"EP_CMB_TMA_STAGES": "4"})
    assert combine_smem(knobs, 8) == 8 * 5 * sizes.COMBINE_SEG_BYTES   # 160 KB fits
    with pytest.raises(ConfigError, match="EP_CMB_TMA_STAGES=4"):
        combine_smem(knobs, 16)                                        # 320 KB does not
