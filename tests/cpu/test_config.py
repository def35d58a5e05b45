"""The public configuration types: what a valid config is, and the exact error each invalid value raises."""
from __future__ import annotations

import dataclasses

import pytest

from ep import CommOverlapConfig, ConfigError, DispatchLayout, MoECommunicatorConfig, QuantScales
from ep.config import MAX_LOCAL_EXPERTS, MAX_TOPK, MAX_WORLD_SIZE

VALID = dict(num_experts=16, hidden_size=64, topk=4, max_tokens_per_rank=32)


def make(**overrides) -> MoECommunicatorConfig:
    return MoECommunicatorConfig(**{**VALID, **overrides})


def test_a_valid_config_keeps_its_values_and_defaults():
    cfg = make()
    assert (cfg.mode, cfg.num_experts, cfg.hidden_size, cfg.topk, cfg.max_tokens_per_rank) == ("ht", 16, 64, 4, 32)
    assert (cfg.num_sms, cfg.expert_alignment, cfg.dtype, cfg.timeout_s) == (None, 1, "bfloat16", 60.0)
    assert cfg.output_layout is None
    assert cfg.overlap == CommOverlapConfig()


def test_the_default_sm_count_is_24_for_ht_and_every_sm_for_ll():
    assert make(mode="ht").sms_for(132) == 24
    assert make(mode="ll").sms_for(132) == 132 and make(mode="ll").sms_for(78) == 78
    assert make(mode="ll", num_sms=16).sms_for(132) == 16 and make(mode="ht", num_sms=16).sms_for(132) == 16


# ------------------------------------------------------------------------------------- world size
@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_check_world_accepts_experts_divisible_by_world(world):
    make(num_experts=16).check_world(world)


@pytest.mark.parametrize("experts, world", [(16, 3), (6, 4), (1, 2), (10, 32)])
def test_check_world_rejects_experts_not_divisible_by_world(experts, world):
    cfg = make(num_experts=experts, topk=1)
    message = rf"num_experts \({experts}\) must be divisible by the world size \({world}\)"
    with pytest.raises(ConfigError, match=message):
        cfg.check_world(world)


@pytest.mark.parametrize("world", [0, -1, MAX_WORLD_SIZE + 1])
def test_check_world_rejects_world_sizes_out_of_range(world):
    with pytest.raises(ConfigError, match=rf"world size must be in \[1, {MAX_WORLD_SIZE}\], got {world}"):
        make(num_experts=64).check_world(world)


def test_check_world_limits_local_experts():
    make(num_experts=MAX_LOCAL_EXPERTS).check_world(1)
    with pytest.raises(ConfigError, match=f"at most {MAX_LOCAL_EXPERTS} experts per rank, got {2 * MAX_LOCAL_EXPERTS}"):
        make(num_experts=2 * MAX_LOCAL_EXPERTS).check_world(1)


# ---------------------------------------------------------------------------------- field checks
@pytest.mark.parametrize("hidden", [8, 16, 7168])
def test_hidden_size_multiple_of_8_is_accepted(hidden):
    assert make(hidden_size=hidden).hidden_size == hidden


@pytest.mark.parametrize("hidden", [4, 12, 7170])
def test_hidden_size_not_multiple_of_8_is_rejected(hidden):
    with pytest.raises(ConfigError, match=rf"hidden_size must be a multiple of 8 \(16-byte rows\), got {hidden}"):
        make(hidden_size=hidden)


def test_topk_equal_to_num_experts_is_accepted():
    assert make(num_experts=4, topk=4).topk == 4


def test_topk_above_num_experts_is_rejected():
    with pytest.raises(ConfigError, match=r"topk \(5\) must be <= num_experts \(4\)"):
        make(num_experts=4, topk=5)


def test_topk_above_max_topk_is_rejected():
    make(num_experts=64, topk=MAX_TOPK)
    with pytest.raises(ConfigError, match=f"topk must be <= {MAX_TOPK}, got {MAX_TOPK + 1}"):
        make(num_experts=64, topk=MAX_TOPK + 1)


def test_max_tokens_per_rank_is_bounded():
    make(max_tokens_per_rank=1 << 24)
    with pytest.raises(ConfigError, match=f"max_tokens_per_rank must be <= {1 << 24}"):
        make(max_tokens_per_rank=(1 << 24) + 1)


INT_FIELDS = ["num_experts", "hidden_size", "topk", "max_tokens_per_rank", "num_sms", "expert_alignment"]  # num_sms: or None


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", [0, -8, 8.0, "8", None])
def test_int_fields_must_be_positive_ints(name, value):
    if name == "num_sms" and value is None:
        assert make(num_sms=None).num_sms is None   # None: the mode's default
        return
    with pytest.raises(ConfigError, match=rf"^{name} must be a positive int, got {value!r}$"):
        make(**{name: value})


@pytest.mark.parametrize("name", INT_FIELDS)
def test_bools_are_not_accepted_as_ints(name):
    with pytest.raises(ConfigError, match=rf"^{name} must be a positive int, got True$"):
        make(**{name: True})


@pytest.mark.parametrize("mode", ["HT", "low_latency", "", None])
def test_mode_must_be_ht_or_ll(mode):
    with pytest.raises(ConfigError, match=rf"mode must be 'ht' or 'll', got {mode!r}"):
        make(mode=mode)


@pytest.mark.parametrize("dtype", ["float16", "bf16", "fp8"])
def test_dtype_must_be_bfloat16(dtype):
    with pytest.raises(ConfigError, match=f"dtype must be 'bfloat16', got '{dtype}'"):
        make(dtype=dtype)


@pytest.mark.parametrize("timeout", [0, 0.0, -1.0, float("nan"), "60", None])
def test_timeout_must_be_a_positive_number(timeout):
    with pytest.raises(ConfigError, match="timeout_s must be a finite number of seconds > 0"):
        make(timeout_s=timeout)


@pytest.mark.parametrize("timeout", [1, 0.001, 3600.0])
def test_positive_timeouts_are_accepted(timeout):
    assert make(timeout_s=timeout).timeout_s == timeout


def test_timeout_rejects_bools():
    with pytest.raises(ConfigError):
        make(timeout_s=True)


def test_timeout_rejects_infinity():
    with pytest.raises(ConfigError):
        make(timeout_s=float("inf"))


def test_ll_rejects_expert_alignment():
    make(mode="ll", expert_alignment=1)
    with pytest.raises(ConfigError, match=r"expert_alignment applies to mode='ht' only"):
        make(mode="ll", expert_alignment=4)


def test_ht_accepts_expert_alignment():
    assert make(mode="ht", expert_alignment=128).expert_alignment == 128


@pytest.mark.parametrize("layout", ["flat", 0, "EXPERT_MAJOR"])
def test_output_layout_must_be_a_dispatch_layout(layout):
    with pytest.raises(ConfigError, match="output_layout must be a DispatchLayout or None"):
        make(output_layout=layout)


def test_overlap_must_be_a_comm_overlap_config():
    with pytest.raises(ConfigError, match="overlap must be a CommOverlapConfig"):
        make(overlap={"dispatch_num_sms": 4})


def test_owned_output_is_an_ht_flat_option():
    assert make(mode="ht", owned_output=True).owned_output is True
    assert make(mode="ht").owned_output is False
    with pytest.raises(ConfigError, match=r"^owned_output must be a bool, got 1$"):
        make(mode="ht", owned_output=1)
    with pytest.raises(ConfigError, match=r"owned_output applies to mode='ht' \(LL outputs are communicator-owned"):
        make(mode="ll", owned_output=True)
    with pytest.raises(ConfigError, match="owned_output needs the FLAT layout"):
        make(mode="ht", owned_output=True, output_layout=DispatchLayout.EXPERT_MAJOR)


def test_ht_dispatch_needs_two_blocks_because_senders_and_receivers_are_separate_blocks():
    with pytest.raises(ConfigError, match="at least 2 SMs"):
        make(mode="ht", num_sms=1)
    with pytest.raises(ConfigError, match="at least 2 SMs"):
        make(mode="ht", overlap=CommOverlapConfig(dispatch_num_sms=1))
    assert make(mode="ht", num_sms=1, overlap=CommOverlapConfig(dispatch_num_sms=2)).num_sms == 1
    assert make(mode="ll", num_sms=1).num_sms == 1


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("mode, expected", [("ht", DispatchLayout.FLAT), ("ll", DispatchLayout.EXPERT_MAJOR)])
def test_layout_defaults_per_mode(mode, expected):
    assert make(mode=mode).layout is expected


@pytest.mark.parametrize("mode", ["ht", "ll"])
@pytest.mark.parametrize("layout", [DispatchLayout.FLAT, DispatchLayout.EXPERT_MAJOR])
def test_explicit_layout_wins_over_the_mode_default(mode, layout):
    assert make(mode=mode, output_layout=layout).layout is layout


def test_token_major_is_an_ht_layout():
    assert make(mode="ht", output_layout=DispatchLayout.TOKEN_MAJOR).layout is DispatchLayout.TOKEN_MAJOR
    with pytest.raises(ConfigError, match="TOKEN_MAJOR applies to mode='ht'"):
        make(mode="ll", output_layout=DispatchLayout.TOKEN_MAJOR)
    with pytest.raises(ConfigError, match="owned_output needs the FLAT layout"):
        make(mode="ht", output_layout=DispatchLayout.TOKEN_MAJOR, owned_output=True)


def test_scale_layout_is_row_or_mn_major():
    assert make().scale_layout == "row_major" and make(scale_layout="mn_major").scale_layout == "mn_major"
    with pytest.raises(ConfigError, match="scale_layout must be"):
        make(scale_layout="k_major")


def test_dispatch_layout_values():
    assert {layout.name: layout.value for layout in DispatchLayout} == {
        "FLAT": "flat", "EXPERT_MAJOR": "expert_major", "TOKEN_MAJOR": "token_major"}
    assert DispatchLayout("flat") is DispatchLayout.FLAT
    assert DispatchLayout("expert_major") is DispatchLayout.EXPERT_MAJOR


# ------------------------------------------------------------------------------ frozen, keyword-only
def test_config_is_frozen():
    cfg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.topk = 2


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        MoECommunicatorConfig("ht", 16, 64, 4, 32)


def test_configs_compare_and_hash_by_value():
    assert make() == make()
    assert hash(make()) == hash(make())
    assert make() != make(topk=2)
    assert repr(make()) == repr(make())     # the communicator compares ranks' configs through repr


def test_overlap_and_scales_are_frozen_and_keyword_only():
    overlap = CommOverlapConfig(dispatch_num_sms=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        overlap.dispatch_num_sms = 4
    with pytest.raises(TypeError):
        CommOverlapConfig(8, 8)
    scales = QuantScales(scales=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scales.block_size = 64
    with pytest.raises(TypeError):
        QuantScales(None, 128)


# ------------------------------------------------------------------------------- CommOverlapConfig
def test_overlap_defaults_to_the_config_num_sms():
    assert CommOverlapConfig() == CommOverlapConfig(dispatch_num_sms=None, combine_num_sms=None)


def test_overlap_accepts_positive_ints():
    overlap = CommOverlapConfig(dispatch_num_sms=20, combine_num_sms=4)
    assert (overlap.dispatch_num_sms, overlap.combine_num_sms) == (20, 4)
    assert make(overlap=overlap).overlap is overlap


@pytest.mark.parametrize("name", ["dispatch_num_sms", "combine_num_sms"])
@pytest.mark.parametrize("value", [0, -1, 2.0, "8"])
def test_overlap_rejects_non_positive_or_non_int(name, value):
    with pytest.raises(ConfigError, match=rf"CommOverlapConfig.{name} must be a positive int or None, got {value!r}"):
        CommOverlapConfig(**{name: value})


@pytest.mark.parametrize("name", ["dispatch_num_sms", "combine_num_sms"])
def test_overlap_rejects_bools(name):
    with pytest.raises(ConfigError):
        CommOverlapConfig(**{name: True})


# ------------------------------------------------------------------------------------- QuantScales
def test_quant_scales_defaults_to_blocks_of_128():
    assert QuantScales(scales="anything").block_size == 128


@pytest.mark.parametrize("block", [0, -128, 128.0, True, "128"])
def test_quant_scales_block_size_must_be_a_positive_int(block):
    with pytest.raises(ConfigError, match=rf"QuantScales.block_size must be a positive int, got {block!r}"):
        QuantScales(scales=None, block_size=block)


def test_config_errors_are_value_errors_and_ep_errors():
    from ep import EPError
    with pytest.raises(ValueError):
        make(hidden_size=12)
    with pytest.raises(EPError):
        make(hidden_size=12)
