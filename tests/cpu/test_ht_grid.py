"""How the HT dispatch grid is split into sender and receiver blocks (ep/ht.py dispatch_senders)."""
import pytest

from ep import envs
from ep.errors import ConfigError
from ep.ht import dispatch_senders


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
