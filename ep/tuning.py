"""Tuning as a value: the config (with its env overrides applied) resolved once into what runs.

:func:`resolve` turns an effective :class:`MoECommunicatorConfig` and a world size into a frozen
:class:`Tuning`: the grid, warps and shared memory of every kernel launch, the combine kind, the kernel
variants (keyed only by the macros their source reads), the device bytes the buffers take. The runtimes,
``MoECommunicator.required_bytes``, the benchmark and ``repr(comm)`` all read this one object; nothing
else turns config fields or knobs into launch geometry.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, fields

from . import constants, envs, jit, sizes
from .config import HtTuning, LLTuning, MoECommunicatorConfig
from .errors import ConfigError

log = logging.getLogger("ep.tuning")


@dataclass(frozen=True)
class KernelSet:
    """One variant and the entry points the runtime loads from it."""

    variant: jit.KernelVariant
    entries: tuple[str, ...]


@dataclass(frozen=True)
class HtPlan:
    dispatch_blocks: int
    dispatch_senders: int        # blocks [0, senders) send, the others expand
    dispatch_warps: int          # warps per dispatch block
    dispatch_copy: str           # "warp" or "tma" (what the senders use)
    dispatch_send_warps: int     # warps of a sender block that send (TMA: one staging row each)
    dispatch_smem: int           # dynamic shared memory of the dispatch kernel (TMA staging rows)
    combine: str                 # "push" or "pull"
    combine_blocks: int
    reduce_warps: int            # warps per block of the reduce and of the push sum
    gather_warps: int            # warps per block of the pull gather (0 with push)


@dataclass(frozen=True)
class LLPlan:
    dispatch_blocks: int
    combine_blocks: int
    warps: int
    dispatch_smem: int           # the routing bitmap's dynamic shared memory
    cols_per_tile: int           # expert columns per bitmap tile


@dataclass(frozen=True)
class Tuning:
    """Everything a communicator's launches need, resolved once (``MoECommunicator.tuning``)."""

    mode: str
    world: int
    timeout_s: float
    shared_gpu: bool
    debug_checks: bool
    trap: bool
    ht: HtPlan | None
    ll: LLPlan | None
    kernels: tuple[KernelSet, ...]
    buffer_bytes: int            # device bytes of the communicator's buffers (symmetric and owned)

    @property
    def timeout_ns(self) -> int:
        return int(self.timeout_s * 1e9)

    def describe(self) -> str:
        plan = self.ht if self.mode == "ht" else self.ll
        parts = [f"{f.name}={getattr(plan, f.name)}" for f in fields(plan)]
        return f"{self.mode}: " + ", ".join(parts)


def block_count(requested: int, sms: int | None, what: str) -> int:
    """A data kernel's grid must be co-resident (receivers spin on senders of other blocks)."""
    if sms is not None and requested > sms:
        raise ConfigError(f"{what}: {requested} blocks requested but the GPU has {sms} SMs (the grid must be "
                          "co-resident)")
    return requested


def dispatch_senders(t: HtTuning, blocks: int) -> int:
    """Sender blocks of the HT dispatch grid: the configured count, else a third of the grid (at least 1):
    the receivers' local expansion moves about three times the senders' NVLink bytes."""
    if blocks < 2:
        raise ConfigError(f"HT dispatch needs at least 2 blocks (senders and receivers), got {blocks}")
    senders = t.dispatch_senders or max(1, blocks // 3)
    if senders >= blocks:
        raise ConfigError(f"HtTuning.dispatch_senders={senders} leaves no receiver block in a grid of {blocks} "
                          "(EP_DISPATCH_SENDERS overrides it)")
    return senders


def dispatch_static_smem(warps: int) -> int:
    """Upper bound of ht_dispatch's static shared memory: per warp an mbarrier and a metadata record, plus
    the chunk counter (cuda_src/ht_dispatch.cu)."""
    return warps * (8 + constants.META_BYTES_MAX) + 128


def tma_send_warps(warps: int, row_bytes: int) -> int:
    """Sender warps that fit one staging row each next to the static shared memory (0: none fits)."""
    rows = (constants.SMEM_LIMIT - dispatch_static_smem(warps)) // row_bytes
    return max(0, min(warps, rows))


def gather_warps(t: HtTuning, blocks: int) -> int:
    return t.gather_warps_wide if blocks <= t.gather_wide_max_blocks else t.gather_warps_narrow


def _ht_plan(cfg: MoECommunicatorConfig, sms: int | None) -> tuple[HtPlan, dict]:
    t = cfg.ht_tuning
    d_blocks = block_count(cfg.overlap.dispatch_num_sms or cfg.sms_for(sms), sms, "dispatch")
    c_blocks = block_count(cfg.overlap.combine_num_sms or cfg.sms_for(sms), sms, "combine")
    senders = dispatch_senders(t, d_blocks)
    copy = t.dispatch_copy
    send_warps = t.dispatch_warps
    smem = 0
    if copy == "tma":
        send_warps = tma_send_warps(t.dispatch_warps, sizes.row_bytes(cfg))
        if send_warps < 1:
            log.warning("HT dispatch TMA: a %d-byte staging row does not fit in shared memory; using warp copies",
                        sizes.row_bytes(cfg))
            copy, send_warps = "warp", t.dispatch_warps
        else:
            smem = send_warps * sizes.row_bytes(cfg)
    # TOKEN_MAJOR's partials are the caller's rows, which peers cannot read: they are pushed.
    combine = "push" if cfg.layout.value == "token_major" else t.combine
    plan = HtPlan(dispatch_blocks=d_blocks, dispatch_senders=senders, dispatch_warps=t.dispatch_warps,
                  dispatch_copy=copy, dispatch_send_warps=send_warps, dispatch_smem=smem, combine=combine,
                  combine_blocks=c_blocks, reduce_warps=constants.COMBINE_REDUCE_WARPS,
                  gather_warps=gather_warps(t, c_blocks) if combine == "pull" else 0)
    macros = {"ht_dispatch.cu": {"EP_NCCLEP_TMA": copy == "tma", "EP_DISPATCH_WARPS": t.dispatch_warps}}
    return plan, macros


def _ll_plan(cfg: MoECommunicatorConfig, sms: int | None) -> tuple[LLPlan, dict]:
    t = cfg.ll_tuning
    cols, smem = sizes.ll_route_smem(cfg, constants.SMEM_LIMIT - LL_STATIC_SMEM)
    if cols < 1:
        raise ConfigError(f"LL dispatch: the routing of max_tokens_per_rank={cfg.max_tokens_per_rank} x topk={cfg.topk} "
                          f"over {cfg.num_experts} experts needs {smem} bytes of shared memory, more than "
                          f"{constants.SMEM_LIMIT - LL_STATIC_SMEM}; lower max_tokens_per_rank")
    plan = LLPlan(dispatch_blocks=block_count(cfg.overlap.dispatch_num_sms or cfg.sms_for(sms), sms, "LL dispatch"),
                  combine_blocks=block_count(cfg.overlap.combine_num_sms or cfg.sms_for(sms), sms, "LL combine"),
                  warps=t.warps, dispatch_smem=smem, cols_per_tile=cols)
    return plan, {"ll_dispatch.cu": {"EP_LL_WARPS": t.warps}, "ll_combine.cu": {"EP_LL_WARPS": t.warps}}


LL_STATIC_SMEM = 1024   # bound of the LL kernels' static shared memory (the runtime checks it)

# Entry points each mode loads, per source file.
HT_ENTRIES = {
    "barrier.cu": ("ep_barrier",),
    "ht_layout.cu": ("ht_route_count", "ht_route_exchange", "ht_route_positions"),
    "ht_dispatch.cu": ("ht_dispatch",),
    "ht_combine.cu": ("ht_combine_reduce", "ht_combine_gather", "ht_combine_sum", "ht_token_major_push"),
}
LL_PAYLOADS = ("bf16", "fp8", "fp8_pow2", "fp8_ue8m0")   # cuda_src/common/fp8.cuh Fp8Mode, in order
LL_ENTRIES = {
    "ll_dispatch.cu": tuple(f"ll_dispatch{half}_{m}" for m in LL_PAYLOADS for half in ("", "_send", "_recv")),
    "ll_combine.cu": ("ll_combine", "ll_combine_send", "ll_combine_recv", "ll_signal_ready", "ll_row_sources"),
}


def resolve(cfg: MoECommunicatorConfig, world: int, knobs: envs.Snapshot | None = None,
            sms: int | None = None) -> Tuning:
    """The tuning of a communicator of ``cfg`` (env overrides already applied: :func:`effective_config`) at
    ``world`` ranks; ``sms``: the GPU's SM count (None: not checked, e.g. on the CPU backend)."""
    knobs = knobs if knobs is not None else envs.defaults()
    cfg.check_world(world)
    trap = bool(knobs.debug_trap)
    if cfg.mode == "ht":
        ht, macros = _ht_plan(cfg, sms)
        ll = None
        entries = HT_ENTRIES
        nbytes = sizes.ht_layout(cfg, world, ht.combine == "push").total
    else:
        ll, macros = _ll_plan(cfg, sms)
        ht = None
        entries = LL_ENTRIES
        nbytes = sizes.ll_layout(cfg, world).total
    kernels = tuple(KernelSet(jit.KernelVariant.of(src, EP_DEBUG_TRAP=trap, **macros.get(src, {})), names)
                    for src, names in entries.items())
    return Tuning(mode=cfg.mode, world=world, timeout_s=float(cfg.timeout_s), shared_gpu=cfg.shared_gpu,
                  debug_checks=bool(knobs.debug_checks), trap=trap, ht=ht, ll=ll, kernels=kernels,
                  buffer_bytes=nbytes)


def effective_config(cfg: MoECommunicatorConfig, knobs: envs.Snapshot) -> MoECommunicatorConfig:
    """``cfg`` with the set env overrides applied (ep.envs.apply)."""
    return envs.apply(cfg, knobs)


def default_macros() -> dict:
    """Macro values of the default config: the integers all_variants compiles at."""
    ht, ll = HtTuning(), LLTuning()
    return {"EP_NCCLEP_TMA": ht.dispatch_copy == "tma", "EP_DISPATCH_WARPS": ht.dispatch_warps,
            "EP_LL_WARPS": ll.warps, "EP_DEBUG_TRAP": False}


def all_variants() -> list[jit.KernelVariant]:
    """Every product variant the tuning can select: each boolean macro both ways, integer macros at the
    values of the config's defaults (default_macros)."""
    defaults = default_macros()
    out = []
    for source, names in jit.SOURCES.items():
        names = names + jit.COMMON_MACROS
        bools = [n for n in names if jit.MACROS[n][0] is bool]
        for flags in itertools.product((False, True), repeat=len(bools)):
            values = {n: defaults[n] for n in names}
            values.update(zip(bools, flags))
            out.append(jit.KernelVariant.of(source, **values))
    return out
