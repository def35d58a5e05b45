"""Compile every kernel variant ep can select, for given GPU architectures, through NVRTC (no GPU needed).

    python -m ep.compile_check [--arch sm_90 --arch sm_100] [--list]
"""
from __future__ import annotations

import argparse
from typing import Sequence

from . import jit, tuning


def variants() -> list[jit.KernelVariant]:
    """The product's variants (every one the tuning can select) and the benchmark's."""
    return tuning.all_variants() + jit.bench_variants()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ep.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", default=None, help="e.g. sm_90 (repeatable)")
    parser.add_argument("--list", action="store_true", help="only list the variants")
    args = parser.parse_args(argv)
    if args.list:
        for v in variants():
            print(v.name)
        return 0
    for name, arch, size in jit.compile_all(args.arch or ["sm_90", "sm_100"], variants()):
        print(f"{arch:7s} {name:60s} {size:8d} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
