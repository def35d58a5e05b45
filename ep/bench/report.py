"""Rows, the table printed on rank 0, the JSON document and the optional plot.

Across ranks, an op's headline time is the slowest rank's median ("median" column); "rank-min" is the
fastest rank's median; "min"/"max" are over every rank and iteration. GB/s = the mean bytes per rank
(workload.py says what counts) / the headline time; ops that move the data twice (dispatch+combine)
count it twice.
"""
from __future__ import annotations

import json
import math
from typing import Any

from .workload import mean_bytes


def gbps(nbytes: float, us: float) -> float | None:
    if not us or us <= 0 or math.isnan(us):
        return None
    return nbytes / (us * 1e3)     # bytes / (us * 1e-6) / 1e9


def op_row(name: str, impl: str, stats: dict, logical: list[int] | None, physical: list[int] | None, sms: Any,
           factor: int = 1, note: str | None = None) -> dict:
    """One table/JSON row. ``stats`` comes from timing.gather_stats; byte lists are per rank."""
    t = stats["median"]
    return {
        "op": name, "impl": impl,
        "us": {k: stats[k] for k in ("median", "median_min_rank", "min", "max")},
        "per_rank": stats["ranks"],
        "logical_bytes_per_rank": logical, "physical_bytes_per_rank": physical,
        "logical_gbps": None if logical is None else gbps(factor * mean_bytes(logical), t),
        "physical_gbps": None if physical is None else gbps(factor * mean_bytes(physical), t),
        "bytes_factor": factor, "sms": sms, "note": note,
    }


def find(rows: list[dict], op: str) -> dict | None:
    for row in rows:
        if row["op"] == op:
            return row
    return None


def ratio(name: str, num: dict | None, den: dict | None, meaning: str) -> dict | None:
    """Time ratio num/den of two rows' headline medians."""
    if num is None or den is None or not den["us"]["median"]:
        return None
    return {"name": name, "numerator": num["op"], "denominator": den["op"],
            "value": num["us"]["median"] / den["us"]["median"], "meaning": meaning}


def ratios(rows: list[dict], base: dict) -> list[dict]:
    """Time ratios: ep / link ceiling (1.0 = at the ceiling) and NCCL / ep (> 1: ep is faster)."""
    out = []
    ceil = base.get("ceiling", {}).get("best")
    for op in ("dispatch", "cached dispatch", "combine"):
        out.append(ratio(f"ep {op} / ceiling", find(rows, f"ep {op}"), ceil,
                         f"ep {op} takes this many times the link ceiling's time; 1.0 = at the ceiling"))
    for op in ("dispatch", "combine", "dispatch+combine"):
        out.append(ratio(f"nccl {op} / ep {op}", find(rows, f"nccl {op}"), find(rows, f"ep {op}"),
                         "NCCL all-to-all dispatcher time over ep's; > 1: ep is faster"))
    return [r for r in out if r is not None]


# ------------------------------------------------------------------------------------------- table
def _num(v, fmt: str) -> str:
    if v is None:
        return "-"
    return format(v, fmt) if abs(v) >= 1 or v == 0 else format(v, ".3g")


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


HEADER = (f"{'op':38s} {'median':>9s} {'rank-min':>9s} {'min':>9s} {'max':>9s} {'logical':>9s} {'physical':>9s}"
          f" {'SMs':>7s}")
UNITS = f"{'':38s} {'us':>9s} {'us':>9s} {'us':>9s} {'us':>9s} {'GB/s':>9s} {'GB/s':>9s} {'':>7s}"


def format_row(row: dict) -> str:
    us = row["us"]
    line = (f"{row['op'][:38]:38s} {us['median']:9.1f} {us['median_min_rank']:9.1f} {us['min']:9.1f} {us['max']:9.1f}"
            f" {_num(row['logical_gbps'], '9.1f'):>9s} {_num(row['physical_gbps'], '9.1f'):>9s}"
            f" {str(row['sms'] if row['sms'] is not None else '-'):>7s}")
    if row.get("note"):
        line += f"  {row['note']}"
    return line


def format_case(case: dict, world: int) -> str:
    s = case["shape"]
    vol = case["bytes"]
    head = (f"{s['mode'].upper()}  T={s['tokens']} H={s['hidden']} E={s['experts']} K={s['topk']}  W={world}"
            f"  SMs={case['sms']['dispatch']}/{case['sms']['combine']}  routing={case['routing']} drop={case['drop']} seed={case['seed']}")
    if s["mode"] == "ht" and s.get("layout", "flat") != "flat":
        head += f"  layout={s['layout']}" + (" worst_case" if s.get("worst_case") else "")
    if s.get("dtype", "bf16") != "bf16":
        head += f"  dtype={s['dtype']} (payload + scales)"
    if case["config"].get("owned_output"):
        head += "  owned_output"
    if case.get("sweep"):
        head += f"  [sweep {case['sweep']['name']}={case['sweep']['value']}]"
    lines = [head,
             f"  bytes per rank (mean): logical {_size(mean_bytes(vol['logical_bytes_per_rank']))}, physical (NVLink) "
             f"{_size(mean_bytes(vol['physical_bytes_per_rank']))}; combine moves the same; times: "
             f"{case['timing']['method']}",
             HEADER, UNITS]
    for row in case["rows"]:
        lines.append(format_row(row))
    for name, base in case["baselines"].items():
        if "skipped" in base:
            lines.append(f"{name}: skipped ({base['skipped']})")
        elif base.get("winner"):
            tried = len(base.get("methods", []))
            lines.append(f"{name}: best of {tried} variants = {base['winner']}"
                         + ("  (measured in an earlier case)" if base.get("reused_from_earlier_case") else ""))
        elif base.get("impl"):
            lines.append(f"{name}: {base['impl']}"
                         + ("  (measured in an earlier case)" if base.get("reused_from_earlier_case") else ""))
    for note in case.get("skipped", []):
        lines.append(f"skipped: {note}")
    for r in case["ratios"]:
        lines.append(f"ratio {r['name']:34s} {r['value']:7.2f}x  ({r['meaning']})")
    val = case.get("validation")
    if val and val.get("checked"):
        lines.append("validation: " + ("every output matches ep.reference bit for bit" if not val["problems"]
                                       else f"{len(val['problems'])} MISMATCH(ES), see above / JSON"))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- JSON
def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):   # NumPy scalars
        return obj.item()
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(_jsonable(doc), f, indent=1)
        f.write("\n")


# -------------------------------------------------------------------------------------------- plot
def plot_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def _plot_rows(case: dict) -> list[tuple[str, float, bool]]:
    """(label, physical GB/s, is_baseline) of the top-level ops of a case, the ceiling as its best method."""
    out = []
    for row in case["rows"]:
        if row["op"].startswith(" ") or row["impl"] == "ceiling" or row["physical_gbps"] is None:
            continue
        out.append((f"{case['shape']['mode']}: {row['op']}", row["physical_gbps"], row["impl"] != "ep"))
    best = case["baselines"].get("ceiling", {}).get("best")
    if best is not None and best["physical_gbps"] is not None:
        out.append((f"{case['shape']['mode']}: link ceiling (best method)", best["physical_gbps"], True))
    return out


def plot(path: str, doc: dict) -> None:
    """NVLink (physical) GB/s of every top-level op against the swept value, one line per mode and op
    (baselines dashed); without a sweep, one bar per op. Physical bytes make the ceiling comparable."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = doc["cases"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    sweep = bool(doc["args"].get("sweep")) and bool(cases)
    if sweep:
        series: dict[str, tuple[list, list, bool]] = {}
        for case in cases:
            for label, value, baseline in _plot_rows(case):
                xs, ys, _ = series.setdefault(label, ([], [], baseline))
                xs.append(case["sweep"]["value"])
                ys.append(value)
        for label, (xs, ys, baseline) in sorted(series.items()):
            ax.plot(xs, ys, marker="o", linestyle="--" if baseline else "-", label=label)
        ax.set_xlabel(cases[0]["sweep"]["name"])
        ax.set_ylabel("NVLink (physical) GB/s")
        ax.legend(fontsize=7, loc="best")
    else:
        bars = [(label, value) for case in cases for label, value, _ in _plot_rows(case)]
        ax.barh([b[0] for b in bars], [b[1] for b in bars])
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("NVLink (physical) GB/s")
    env = doc["environment"]
    ax.set_title(f"ep.bench, W={env['world_size']}, {env.get('gpu_name') or 'CPU backend'}", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
