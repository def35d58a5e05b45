"""The one table of ep's knobs and the only reader of ``os.environ`` in the library.

A knob is either a *runtime* knob (selects a path or a value in Python) or a *macro* knob (becomes a
``-D`` macro of the kernels that use it, so each value is its own compiled, cached variant).
Values are parsed strictly; a bad value raises :class:`ConfigError` naming the knob.
The README's knob table is checked against :data:`KNOBS` by a test.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from .errors import ConfigError

RUNTIME = "runtime"
MACRO = "macro"


@dataclass(frozen=True)
class Knob:
    name: str
    type: type            # bool, int, float or str
    default: Any
    doc: str
    kind: str = RUNTIME   # RUNTIME or MACRO
    lo: float | None = None     # inclusive range for int/float
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    multiple_of: int = 1        # ints: the value must be a multiple of this

    def parse(self, raw: str) -> Any:
        text = raw.strip()
        if self.type is bool:
            low = text.lower()
            if low in ("1", "true", "on", "yes"):
                return True
            if low in ("0", "false", "off", "no"):
                return False
            raise ConfigError(f"{self.name}={raw!r}: expected a boolean (1/0/true/false/on/off)")
        if self.type is int:
            try:
                value: Any = int(text, 0)
            except ValueError:
                raise ConfigError(f"{self.name}={raw!r}: expected an integer") from None
        elif self.type is float:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{self.name}={raw!r}: expected a number") from None
        else:
            value = text
            if self.choices is not None and value not in self.choices:
                raise ConfigError(f"{self.name}={raw!r}: expected one of {', '.join(self.choices)}")
            return value
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{self.name}={raw!r}: expected a finite number")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise ConfigError(f"{self.name}={raw!r}: out of range [{self.lo}, {self.hi}]")
        if self.type is int and value % self.multiple_of:
            raise ConfigError(f"{self.name}={raw!r}: must be a multiple of {self.multiple_of}")
        return value

    def macro_value(self, value: Any) -> str:
        """The text a macro knob's value becomes after ``-D<name>=``."""
        if self.type is bool:
            return "1" if value else "0"
        return str(value)


KNOBS: tuple[Knob, ...] = (
    # --- runtime knobs -------------------------------------------------------------------------
    Knob("EP_BACKEND", str, "auto", "Backend: `gpu`, `cpu` (NumPy reference over MPI) or `auto` (gpu when CuPy sees a device).",
         choices=("auto", "gpu", "cpu")),
    Knob("EP_CACHE_DIR", str, "", "Directory of the on-disk kernel cache (default `~/.cache/ep/kernels`, created mode 0700)."),
    Knob("EP_DISPATCH_NSM", int, 0, "Blocks of the dispatch data kernels; 0 = the config's value. Overrides `num_sms` and the overlap config.", lo=0, hi=1024),
    Knob("EP_COMBINE_NSM", int, 0, "Blocks of the combine data kernels; 0 = the config's value. Overrides `num_sms` and the overlap config.", lo=0, hi=1024),
    Knob("EP_DISPATCH_SENDERS", int, 0, "HT dispatch blocks that send (the rest expand what arrives); 0 = a third of the grid, at least 1.",
         lo=0, hi=1024),
    Knob("EP_TIMEOUT_S", float, 0.0, "Bound of every device and host wait in seconds; 0 = the config's `timeout_s`.", lo=0.0, hi=86400.0),
    Knob("EP_DEBUG_CHECKS", bool, False, "Full device checks: a cached dispatch compares its routing with the handle's; LL checks expert ids synchronously."),
    Knob("EP_LOG_LEVEL", str, "WARNING", "Level of the `ep` logger.", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    # --- macro knobs (each value is its own compiled variant) ------------------------------------
    Knob("EP_NCCLEP_TMA", bool, False, "HT dispatch senders move whole tokens with TMA bulk copies (G2S then S2G to each destination); 0 = warp 16-byte stores.",
         kind=MACRO),
    Knob("EP_DISPATCH_RECV_TMA", bool, False, "HT dispatch receivers expand each token with TMA: one bulk load into the warp's staging row, one bulk store per expert row; 0 = 16-byte warp copies.",
         kind=MACRO),
    Knob("EP_DISPATCH_WARPS", int, 24, "Warps per HT dispatch block (every block either sends or expands received tokens).",
         kind=MACRO, lo=4, hi=32),
    Knob("EP_COMBINE_PUSH", bool, True, "HT combine: each peer's partials are copied by the copy engines into the source's landing buffer (one more symmetric buffer of `W * max_tokens_per_rank` rows) while the next peer's are reduced, and the source sums locally; 0 = the source pulls the partials from the peers (the EP_CMB_TMA* knobs).", kind=MACRO),
    Knob("EP_CMB_TMA", bool, True, "HT combine gathers partials from peers through a TMA shared-memory pipeline; 0 = warp 16-byte loads.", kind=MACRO),
    Knob("EP_CMB_TMA_STAGES", int, 2, "Shared-memory stages of the HT combine TMA pipeline, per warp.", kind=MACRO, lo=1, hi=4),
    Knob("EP_CMB_TMA_WARPS_WIDE", int, 16, "Warps per HT combine block when the grid has at most EP_CMB_TMA_WARPS_MAXCH blocks.", kind=MACRO, lo=1, hi=32),
    Knob("EP_CMB_TMA_WARPS_MAXCH", int, 32, "Largest block count that still uses EP_CMB_TMA_WARPS_WIDE warps per block.", kind=MACRO, lo=1, hi=1024),
    Knob("EP_CMB_TMA_WARPS_NARROW", int, 4, "Warps per HT combine block above EP_CMB_TMA_WARPS_MAXCH blocks.", kind=MACRO, lo=1, hi=32),
    Knob("EP_LL_WARPS", int, 16, "Warps per LL dispatch/combine block.", kind=MACRO, lo=4, hi=32),
    Knob("EP_DEBUG_TRAP", bool, False, "Kernels trap (abort the context) on a wait time-out instead of recording it and returning. Debug only.",
         kind=MACRO),
)

KNOB_BY_NAME: Mapping[str, Knob] = MappingProxyType({k.name: k for k in KNOBS})
MACRO_KNOBS: tuple[Knob, ...] = tuple(k for k in KNOBS if k.kind == MACRO)


class Snapshot:
    """Knob values read once. Attribute access by knob name without the ``EP_`` prefix, lower case."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = dict(values)

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):          # copy/pickle probe dunders before __init__ ran
            raise AttributeError(attr)
        try:
            return self._values["EP_" + attr.upper()]
        except KeyError:
            raise AttributeError(attr) from None

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def macros(self) -> dict[str, Any]:
        return {k.name: self._values[k.name] for k in MACRO_KNOBS}

    def with_values(self, **overrides: Any) -> "Snapshot":
        """A copy with some knobs replaced (keys are full knob names)."""
        merged = dict(self._values)
        for name, value in overrides.items():
            if name not in KNOB_BY_NAME:
                raise ConfigError(f"unknown knob {name}")
            merged[name] = value
        return Snapshot(merged)


def read(environ: Mapping[str, str] | None = None) -> Snapshot:
    """Parse every knob from ``environ`` (default ``os.environ``) into a :class:`Snapshot`."""
    env = os.environ if environ is None else environ
    values = {}
    for knob in KNOBS:
        raw = env.get(knob.name)
        values[knob.name] = knob.default if raw is None or raw == "" else knob.parse(raw)
    return Snapshot(values)


def defaults() -> Snapshot:
    return Snapshot({k.name: k.default for k in KNOBS})


# Launcher facts. These are not knobs of ours: they are what mpirun/torchrun tell a process.
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                    "PMI_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK")


def launcher_local_rank() -> int | None:
    """The node-local rank the launcher exported, or None."""
    for var in _LOCAL_RANK_VARS:
        raw = os.environ.get(var)
        if raw is not None and raw.strip().isdigit():
            return int(raw)
    return None


def home_cache_dir() -> str:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ep", "kernels")
