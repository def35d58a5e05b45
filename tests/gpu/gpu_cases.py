"""Shared pieces of the GPU tests: inputs on the device, the CPU-backend reference, comparisons."""
from __future__ import annotations

import traceback

import pytest

import numpy as np

from ep import DispatchLayout, HtTuning, MoECommunicator, MoECommunicatorConfig
from ep import testing as T
from ep.reference import bf16_to_f32, f32_to_bf16


# The HT tunings every GPU run covers: the defaults and each alternative the config can select.
HT_TUNINGS = {"default": HtTuning(), "tma_senders": HtTuning(dispatch_copy="tma"),
              "pull_combine": HtTuning(combine="pull"), "pull_narrow_gather": HtTuning(combine="pull", gather_warps_wide=4)}


def build(world, mode: str, E, H: int, K: int, T_max: int, layout: str, alignment: int = 1, owned: bool = False,
          ht_tuning: HtTuning | None = None, num_sms: int = 16, **config):
    """A GPU communicator and its reference (the CPU backend over the same ranks) for one config.
    E == "W" means one expert per rank; owned: MoECommunicatorConfig.owned_output; layout: a DispatchLayout
    value ("flat", "expert_major", "token_major"); config: further MoECommunicatorConfig fields."""
    E = world.size if E == "W" else E
    cfg = MoECommunicatorConfig(mode=mode, num_experts=E, hidden_size=H, topk=K, max_tokens_per_rank=T_max,
                                expert_alignment=alignment, output_layout=DispatchLayout(layout), num_sms=num_sms,
                                timeout_s=20, owned_output=owned, ht_tuning=ht_tuning or HtTuning(), **config)
    return cfg, MoECommunicator(cfg, world, backend="gpu"), MoECommunicator(cfg, world, backend="cpu")


def to_device(framework: str, x: np.ndarray, ids: np.ndarray, w: np.ndarray | None, ids_dtype=np.int64):
    import cupy
    if framework == "torch":
        import torch
        xt = torch.from_numpy(x.view(np.int16)).cuda().view(torch.bfloat16)
        it = torch.from_numpy(ids.astype(ids_dtype)).cuda()
        wt = None if w is None else torch.from_numpy(w).cuda()
        return xt, it, wt
    return cupy.asarray(x), cupy.asarray(ids.astype(ids_dtype)), None if w is None else cupy.asarray(w)


def to_numpy(arr) -> np.ndarray:
    import cupy
    if type(arr).__module__.startswith("torch"):
        import torch
        if arr.dtype == torch.bfloat16:
            arr = arr.view(torch.int16)
        return arr.cpu().numpy().view(np.uint16) if arr.dtype == torch.int16 else arr.cpu().numpy()
    return cupy.asnumpy(arr)


def make_inputs(seed: int, rank: int, call: int, num_tokens: int, cfg: MoECommunicatorConfig, kind: str, drop: float,
                weights: bool, duplicates: bool = False):
    rng = T.seed_for(seed, rank, call)
    x = T.random_tokens(rng, num_tokens, cfg.hidden_size)
    ids = T.routing(kind, rng, num_tokens, cfg.num_experts, cfg.topk, drop)
    if duplicates and cfg.topk > 1 and num_tokens:
        rows = rng.random(num_tokens) < 0.25
        ids[rows, 1] = ids[rows, 0]      # an expert named twice by one token: one row, both weights
    w = T.random_weights(rng, num_tokens, cfg.topk) if weights else None
    return x, ids, w


def expert_scale(cfg: MoECommunicatorConfig, world: int) -> np.ndarray:
    """A per-local-expert power of two: the 'MLP' y = x * scale[e] is exact in bf16."""
    L = cfg.num_experts // world
    return np.array([2.0 ** ((e % 3) - 1) for e in range(L)], np.float32)


def mlp_numpy(tokens: np.ndarray, offsets: np.ndarray, scale: np.ndarray, layout: DispatchLayout) -> np.ndarray:
    f = bf16_to_f32(tokens).copy()
    if layout is DispatchLayout.EXPERT_MAJOR and f.ndim == 3:
        f *= scale[:, None, None]
    else:
        for e in range(len(scale)):
            f[offsets[e]:offsets[e + 1]] *= scale[e]
    return f32_to_bf16(f)


def valid_rows_equal(got: np.ndarray, want: np.ndarray, counts, cap: int, hidden: int) -> bool:
    g = got.reshape(-1, cap, hidden)
    w = want.reshape(-1, cap, hidden)
    return all(np.array_equal(g[e, :c], w[e, :c]) for e, c in enumerate(counts))


def collective(world, body, *args, **kwargs):
    """Run ``body``; if it fails on any rank, raise on every rank with the failing ranks' messages."""
    error = None
    result = None
    try:
        result = body(*args, **kwargs)
    except BaseException as exc:   # noqa: BLE001 - re-raised below on every rank
        error = f"rank {world.rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    errors = world.allgather(error)
    failed = [e for e in errors if e is not None]
    if failed:
        raise AssertionError("failed on some rank(s):\n" + "\n".join(failed))
    return result


def multi_rank(world):
    if world.size < 2:
        pytest.skip("multi-rank test: run under mpirun -np >= 2")
