"""--validate: the timed outputs, checked once and bit for bit against ep.reference.

Every rank gathers every rank's inputs, computes the reference with reference.dispatch_world /
combine_world (the expert MLP is the identity: the expert output of rank d is its dispatch output), and
compares its own outputs. LL outputs have a fixed capacity: only rows [0, count_e) of expert e are compared.
"""
from __future__ import annotations

import numpy as np

from .. import reference
from ..config import DispatchLayout
from .workload import Inputs, Shape


def reference_outputs(group, shape: Shape, inputs: Inputs, cast=None):
    """(this rank's ReceivedLayout, this rank's combine output uint16 [T, H]). Collective. With an LL ``cast``
    (ep.Fp8Cast) the tokens are the cast rows and the combine's expert output is zeros (ep_runs._bf16_like)."""
    everyone = group.allgather((inputs.x, inputs.topk_ids, inputs.weights,
                                None if inputs.scales is None else np.ascontiguousarray(inputs.scales)),
                               "bench reference")
    xs = [e[0] for e in everyone]
    ids = [e[1] for e in everyone]
    ws = [e[2] for e in everyone]
    scales = None if inputs.scales is None else [e[3] for e in everyone]
    W = group.size
    ll = shape.mode == "ll"
    layout = DispatchLayout.EXPERT_MAJOR if ll else DispatchLayout(shape.layout)
    capacity = W * shape.tokens if ll else None
    if cast is not None:
        cast_rows = [reference.fp8_cast(x, round_scale=cast.round_scale, ue8m0=cast.ue8m0) for x in xs]
        layouts = reference.dispatch_world([c[0] for c in cast_rows], ids, ws, shape.experts, shape.hidden, 1, layout,
                                           capacity, scales=[c[1] for c in cast_rows])
        return layouts[group.rank], np.zeros((shape.tokens, shape.hidden), np.uint16)
    if scales is not None:   # a payload dispatch; the combine's expert output is bf16 zeros (ep_runs._bf16_like)
        layouts = reference.dispatch_world(xs, ids, ws, shape.experts, shape.hidden, 1, layout, capacity, scales=scales)
        return layouts[group.rank], np.zeros((shape.tokens, shape.hidden), np.uint16)
    layouts = reference.dispatch_world(xs, ids, ws, shape.experts, shape.hidden, 1, layout, capacity)
    if layout is DispatchLayout.TOKEN_MAJOR:   # the caller's rows summed per source token (no weights)
        combined = reference.combine_token_major_world([lay.tokens for lay in layouts], layouts, ids, shape.experts,
                                                       shape.hidden)
        return layouts[group.rank], combined[group.rank][0]
    combined = reference.combine_world([lay.tokens for lay in layouts], layouts, ids, ws, shape.experts, shape.hidden)
    return layouts[group.rank], combined[group.rank]


def flat_reference(group, shape: Shape, inputs: Inputs):
    """This rank's FLAT ReceivedLayout (the NCCL baseline's row order, whatever layout ep ran). Collective."""
    everyone = group.allgather((inputs.x, inputs.topk_ids, inputs.weights), "bench flat reference")
    return reference.dispatch_world([e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone],
                                    shape.experts, shape.hidden)[group.rank]


def first_difference(name: str, got: np.ndarray, want: np.ndarray) -> str | None:
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        return f"{name}: shape {got.shape}, expected {want.shape}"
    if got.dtype.kind != want.dtype.kind or got.dtype.itemsize != want.dtype.itemsize:
        got = got.astype(want.dtype)
    diff = np.argwhere(got != want)
    if len(diff) == 0:
        return None
    where = tuple(int(i) for i in diff[0])
    text = (f"{name}: {len(diff)} of {want.size} elements differ; first at {where}: got {int(got[where])}, "
            f"expected {int(want[where])}")
    if got.ndim == 2 and _same_rows(got, want):
        text += " (the same rows, in another order)"
    return text


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two [n, H] arrays hold the same multiset of rows (a diagnosis of an ordering bug)."""
    if a.shape != b.shape or a.size == 0:
        return False
    row = np.dtype((np.void, a.shape[1] * a.dtype.itemsize))
    return bool(np.array_equal(np.sort(np.ascontiguousarray(a).view(row).ravel()),
                               np.sort(np.ascontiguousarray(b).view(row).ravel())))


def _counts(name: str, got, ref) -> str | None:
    return first_difference(name, np.asarray(got).astype(np.int64), ref.counts.astype(np.int64))


def _ll_rows(name: str, got: np.ndarray, ref) -> str | None:
    """Rows [0, count_e) of every local expert of an EXPERT_MAJOR [L, cap, H] output."""
    return _ll_valid(name, got, ref.tokens, ref.counts)


def _ll_valid(name: str, got: np.ndarray, want: np.ndarray, counts: np.ndarray) -> str | None:
    """Rows [0, count_e) of every local expert of an EXPERT_MAJOR [L, cap, C] array (tokens or scales)."""
    L, cap, C = want.shape
    got = np.asarray(got)
    if got.ndim == 2:
        got = got.reshape(L, -1, C)
    if got.shape[0] != L or got.shape[2] != C or got.shape[1] < int(counts.max(initial=0)):
        return f"{name}: shape {got.shape}, expected [{L}, >= {int(counts.max(initial=0))}, {C}]"
    for e in range(L):
        n = int(counts[e])
        problem = first_difference(f"{name} (local expert {e}, valid rows)", got[e, :n], want[e, :n])
        if problem:
            return problem
    return None


def check_ep(snaps: dict, ref, ref_combine: np.ndarray, mode: str) -> list[str]:
    """Compare every snapshot ep_runs took (dispatch tokens/counts, combine outputs) with the reference. A
    worst-case TOKEN_MAJOR output has more rows than were received: only the received ones are compared."""
    problems = []
    n = ref.tokens.shape[0]
    for key, got in snaps.items():
        got = np.asarray(got)
        if ref.layout is DispatchLayout.TOKEN_MAJOR and got.ndim == 2 and got.shape[0] > n and "combine" not in key:
            got = got[:n]
        if key.endswith("counts"):
            problem = _counts(f"ep {key}", got, ref)
        elif key.endswith("scales"):
            problem = (_ll_valid(f"ep {key}", got, ref.scales, ref.counts) if mode == "ll"
                       else first_difference(f"ep {key}", got, ref.scales))
        elif "combine" in key:
            problem = first_difference(f"ep {key}", got, ref_combine)
        elif mode == "ll":
            problem = _ll_rows(f"ep {key} tokens", got, ref)
        else:
            problem = first_difference(f"ep {key} tokens", got, ref.tokens)
        if problem:
            problems.append(problem)
    return problems


def check_nccl(snaps: dict, ref) -> list[str]:
    """The NCCL baseline's grouped rows follow the same order (expert, source rank, token): equal to the
    reference FLAT tokens. Its combine sums in another order, so only its dispatch is compared."""
    problems = []
    if "nccl dispatch" in snaps:
        problem = first_difference("nccl baseline dispatch rows", snaps["nccl dispatch"], ref.tokens)
        if problem:
            problems.append(problem)
    if "nccl counts" in snaps:
        problem = _counts("nccl baseline counts", snaps["nccl counts"], ref)
        if problem:
            problems.append(problem)
    return problems
