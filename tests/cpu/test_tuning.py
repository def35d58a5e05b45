"""Tuning as a value: config + env overrides resolve once into the launch geometry, the kernel variants and
the buffer bytes (ep/tuning.py), and nothing else turns knobs into geometry."""
import dataclasses

import pytest

from ep import CommOverlapConfig, ConfigError, HtTuning, LLTuning, MoECommunicator, MoECommunicatorConfig, envs
from ep import constants, jit, sizes, tuning


def make(**kw):
    base = dict(mode="ht", num_experts=64, hidden_size=7168, topk=8, max_tokens_per_rank=256)
    base.update(kw)
    return MoECommunicatorConfig(**base)


def resolved(cfg, world=4, env=None, sms=None):
    knobs = envs.read(env or {})
    return tuning.resolve(tuning.effective_config(cfg, knobs), world, knobs, sms)


# ----------------------------------------------------------------------------------- HT geometry
def test_a_third_of_the_dispatch_blocks_send_by_default_and_at_least_one():
    for blocks, senders in [(24, 8), (32, 10), (2, 1), (4, 1)]:
        assert resolved(make(num_sms=blocks)).ht.dispatch_senders == senders


def test_the_sender_count_is_a_config_field_with_its_env_override():
    assert resolved(make(ht_tuning=HtTuning(dispatch_senders=6))).ht.dispatch_senders == 6
    assert resolved(make(), env={"EP_DISPATCH_SENDERS": "5"}).ht.dispatch_senders == 5
    assert resolved(make(ht_tuning=HtTuning(dispatch_senders=6)), env={"EP_DISPATCH_SENDERS": "0"}).ht.dispatch_senders == 6


def test_a_sender_count_that_leaves_no_receiver_is_refused_naming_the_field_and_the_knob():
    with pytest.raises(ConfigError, match="dispatch_senders=6 leaves no receiver.*EP_DISPATCH_SENDERS"):
        resolved(make(num_sms=6, ht_tuning=HtTuning(dispatch_senders=6)))


def test_block_counts_come_from_the_overlap_config_then_num_sms_and_env_overrides_both():
    t = resolved(make(num_sms=20, overlap=CommOverlapConfig(combine_num_sms=12)))
    assert (t.ht.dispatch_blocks, t.ht.combine_blocks) == (20, 12)
    t = resolved(make(num_sms=20), env={"EP_DISPATCH_NSM": "16", "EP_COMBINE_NSM": "8"})
    assert (t.ht.dispatch_blocks, t.ht.combine_blocks) == (16, 8)


def test_grids_larger_than_the_gpu_are_refused_because_they_must_be_co_resident():
    assert resolved(make(num_sms=132), sms=132).ht.dispatch_blocks == 132
    with pytest.raises(ConfigError, match="133 blocks requested but the GPU has 132 SMs"):
        resolved(make(num_sms=133), sms=132)


def test_tma_senders_get_one_staging_row_each_and_the_kernel_its_shared_memory():
    t = resolved(make(ht_tuning=HtTuning(dispatch_copy="tma")))
    rows = (constants.SMEM_LIMIT - tuning.dispatch_static_smem(24)) // (7168 * 2)
    assert t.ht.dispatch_copy == "tma" and t.ht.dispatch_send_warps == min(24, rows) == 15
    assert t.ht.dispatch_smem == 15 * 7168 * 2
    plain = resolved(make())
    assert (plain.ht.dispatch_copy, plain.ht.dispatch_send_warps, plain.ht.dispatch_smem) == ("warp", 24, 0)


def test_the_seed_knob_ep_ncclep_tma_overrides_the_copy_policy():
    assert resolved(make(), env={"EP_NCCLEP_TMA": "1"}).ht.dispatch_copy == "tma"
    assert resolved(make(ht_tuning=HtTuning(dispatch_copy="tma")), env={"EP_NCCLEP_TMA": "0"}).ht.dispatch_copy == "warp"


def test_rows_too_wide_for_a_staging_row_fall_back_to_warp_stores():
    t = resolved(make(hidden_size=120_000, max_tokens_per_rank=4, ht_tuning=HtTuning(dispatch_copy="tma")))
    assert (t.ht.dispatch_copy, t.ht.dispatch_smem) == ("warp", 0)


def test_the_pull_gather_width_follows_its_grid_and_push_has_none():
    assert resolved(make()).ht.gather_warps == 0
    pull = HtTuning(combine="pull")
    assert resolved(make(num_sms=24, ht_tuning=pull)).ht.gather_warps == 16
    assert resolved(make(num_sms=40, ht_tuning=pull)).ht.gather_warps == 4
    env = {"EP_COMBINE_PUSH": "0", "EP_CMB_TMA_WARPS_WIDE": "8", "EP_CMB_TMA_WARPS_MAXCH": "16"}
    assert resolved(make(num_sms=16), env=env).ht.gather_warps == 8
    assert resolved(make(num_sms=20), env=env).ht.gather_warps == 4


# --------------------------------------------------------------------------------------- variants
def variants(t):
    return {ks.variant.source: ks.variant for ks in t.kernels}


def test_a_variant_carries_only_the_macros_its_source_reads():
    t = resolved(make())
    v = variants(t)
    assert set(v) == {"barrier.cu", "ht_layout.cu", "ht_dispatch.cu", "ht_combine.cu"}
    assert dict(v["ht_dispatch.cu"].macros) == {"EP_NCCLEP_TMA": "0", "EP_DISPATCH_WARPS": "24", "EP_DEBUG_TRAP": "0"}
    assert dict(v["ht_combine.cu"].macros) == {"EP_DEBUG_TRAP": "0"}


def test_host_only_tunables_build_no_other_binary():
    base = variants(resolved(make()))
    for cfg in (make(ht_tuning=HtTuning(combine="pull")), make(ht_tuning=HtTuning(gather_warps_wide=8)),
                make(ht_tuning=HtTuning(dispatch_senders=4)), make(num_sms=16)):
        assert variants(resolved(cfg)) == base, cfg


def test_tunables_a_kernel_reads_build_their_own_binary():
    base = variants(resolved(make()))
    tma = variants(resolved(make(ht_tuning=HtTuning(dispatch_copy="tma"))))
    warps = variants(resolved(make(ht_tuning=HtTuning(dispatch_warps=16))))
    assert tma["ht_dispatch.cu"] != base["ht_dispatch.cu"] and tma["ht_combine.cu"] == base["ht_combine.cu"]
    assert warps["ht_dispatch.cu"].name == "ht_dispatch_tma0_w16"
    trap = variants(resolved(make(), env={"EP_DEBUG_TRAP": "1"}))
    assert all(dict(v.macros)["EP_DEBUG_TRAP"] == "1" for v in trap.values())


def test_ll_resolves_its_own_plan_and_variants():
    t = resolved(make(mode="ll", num_sms=32, ll_tuning=LLTuning(warps=8)))
    assert t.ht is None and (t.ll.dispatch_blocks, t.ll.combine_blocks, t.ll.warps) == (32, 32, 8)
    assert {k.variant.name for k in t.kernels} == {"ll_dispatch_w8", "ll_combine_w8"}
    assert resolved(make(mode="ll"), env={"EP_LL_WARPS": "4"}).ll.warps == 4


def test_every_selectable_variant_is_in_the_compile_check():
    compiled = set(tuning.all_variants())
    for cfg in (make(), make(ht_tuning=HtTuning(dispatch_copy="tma")), make(mode="ll")):
        for env in ({}, {"EP_DEBUG_TRAP": "1"}):
            assert set(variants(resolved(cfg, env=env)).values()) <= compiled, (cfg, env)


def test_benchmark_kernels_are_outside_the_product_digest():
    product = {p.name for p in jit.source_dir().rglob("*.cu")}
    assert "bench_copy.cu" not in product
    assert jit.KernelVariant.of("bench_copy.cu").bench
    assert all(not v.bench for v in tuning.all_variants())


# ------------------------------------------------------------------------------------------ bytes
def test_buffer_bytes_follow_the_combine_kind():
    push, pull = resolved(make()), resolved(make(ht_tuning=HtTuning(combine="pull")))
    assert push.buffer_bytes == sizes.ht_layout(make(), 4, True).total
    assert push.buffer_bytes - pull.buffer_bytes == 4 * 256 * 7168 * 2   # the landing buffer


def test_required_bytes_resolves_like_a_communicator_env_overrides_included(monkeypatch):
    cfg = make()
    monkeypatch.delenv("EP_COMBINE_PUSH", raising=False)
    push = MoECommunicator.required_bytes(cfg, 4)
    monkeypatch.setenv("EP_COMBINE_PUSH", "0")
    assert MoECommunicator.required_bytes(cfg, 4) == push - 4 * 256 * 7168 * 2
    assert MoECommunicator.required_bytes(dataclasses.replace(cfg, ht_tuning=HtTuning(combine="pull")), 4) \
        == push - 4 * 256 * 7168 * 2


def test_required_bytes_checks_the_world_size():
    with pytest.raises(ConfigError, match="divisible"):
        MoECommunicator.required_bytes(make(num_experts=6, topk=2), 4)


# ---------------------------------------------------------------------------------- env overrides
def test_override_knobs_replace_the_field_they_name():
    knobs = envs.read({"EP_DISPATCH_WARPS": "16", "EP_TIMEOUT_S": "3", "EP_SHARED_GPU": "1", "EP_LL_WARPS": "8"})
    eff = tuning.effective_config(make(), knobs)
    assert (eff.ht_tuning.dispatch_warps, eff.timeout_s, eff.shared_gpu, eff.ll_tuning.warps) == (16, 3.0, True, 8)


def test_unset_or_zero_overrides_keep_the_config():
    cfg = make(timeout_s=5.0, overlap=CommOverlapConfig(dispatch_num_sms=12))
    eff = tuning.effective_config(cfg, envs.read({"EP_TIMEOUT_S": "0", "EP_DISPATCH_NSM": "0"}))
    assert eff == cfg


def test_an_override_that_makes_the_config_invalid_names_the_knob():
    with pytest.raises(ConfigError, match="EP_DISPATCH_NSM.*at least 2 SMs"):
        tuning.effective_config(make(), envs.read({"EP_DISPATCH_NSM": "1"}))


def test_describe_lists_the_resolved_plan():
    text = resolved(make()).describe()
    assert text.startswith("ht: dispatch_blocks=24, dispatch_senders=8") and "combine=push" in text
