"""The one table of ep's knobs and the only reader of ``os.environ`` in the library.

Most knobs override a config field (``overrides`` names it: ``ht_tuning.dispatch_warps``, ``timeout_s``...):
unset, the config's value holds; set, it replaces that value in every communicator the process builds
(:func:`apply`), so a communicator's resolved tuning (``MoECommunicator.tuning``) is config + overrides.
The others select process-wide behaviour (backend, cache directory, logging, debug checks).
Values are parsed strictly; a bad value raises :class:`ConfigError` naming the knob. An ``EP_*`` variable
that is no knob gets a warning naming the closest one. The README's knob table is checked against
:data:`KNOBS` by a test.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class Knob:
    name: str
    type: type            # bool, int, float or str
    default: Any          # the value when unset; None for a knob that overrides a config field
    doc: str
    overrides: str | None = None   # dotted config field this knob replaces when set
    to_field: Callable[[Any], Any] | None = None   # knob value -> field value (None: the same)
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


def _zero_is_unset(value: int) -> int | None:
    return value or None


KNOBS: tuple[Knob, ...] = (
    # --- process-wide ---------------------------------------------------------------------------
    Knob("EP_BACKEND", str, "auto", "Backend: `gpu`, `cpu` (NumPy reference over MPI) or `auto` (gpu when CuPy sees a device).",
         choices=("auto", "gpu", "cpu")),
    Knob("EP_CACHE_DIR", str, "", "Directory of the on-disk kernel cache (default `~/.cache/ep/kernels`, created mode 0700)."),
    Knob("EP_DEBUG_CHECKS", bool, False, "Full checks: a cached dispatch compares its routing with the handle's (GPU: a device compare and a host wait); LL checks expert ids synchronously."),
    Knob("EP_DEBUG_TRAP", bool, False, "Kernels trap (abort the context) on a wait time-out instead of recording it and returning. Debug only."),
    Knob("EP_LOG_LEVEL", str, "WARNING", "Level of the `ep` logger.", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    # --- overrides of config fields ---------------------------------------------------------------
    Knob("EP_TIMEOUT_S", float, None, "Bound of every device and host wait in seconds; 0 = unset.", overrides="timeout_s",
         to_field=lambda v: v or None, lo=0.0, hi=86400.0),
    Knob("EP_SHARED_GPU", bool, None, "Several ranks may share one GPU (tests: correctness only, never speed).",
         overrides="shared_gpu"),
    Knob("EP_RANKS_PER_NODE", int, None, "Ranks per node (NVLink domain); fewer than the world size runs the internode path (CPU backend); 0 = unset (the ranks of a host).",
         overrides="ranks_per_node", to_field=_zero_is_unset, lo=0, hi=1024),
    Knob("EP_DISPATCH_NSM", int, None, "Blocks (SMs) of the dispatch data kernels; 0 = unset.",
         overrides="overlap.dispatch_num_sms", to_field=_zero_is_unset, lo=0, hi=1024),
    Knob("EP_COMBINE_NSM", int, None, "Blocks (SMs) of the combine data kernels; 0 = unset.",
         overrides="overlap.combine_num_sms", to_field=_zero_is_unset, lo=0, hi=1024),
    Knob("EP_DISPATCH_SENDERS", int, None, "HT dispatch blocks that send (the rest expand what arrives); 0 = a third of the grid, at least 1.",
         overrides="ht_tuning.dispatch_senders", to_field=_zero_is_unset, lo=0, hi=1024),
    Knob("EP_DISPATCH_WARPS", int, None, "Warps per HT dispatch block.", overrides="ht_tuning.dispatch_warps", lo=4, hi=32),
    Knob("EP_NCCLEP_TMA", bool, None, "HT dispatch senders move rows with TMA bulk copies (one load into shared memory, one store per destination); 0 = 16-byte warp stores.",
         overrides="ht_tuning.dispatch_copy", to_field=lambda v: "tma" if v else "warp"),
    Knob("EP_COMBINE_PUSH", bool, None, "HT combine: 1 = push (copy engines carry each peer's partials to the source, which sums locally; one more symmetric buffer of `W * max_tokens_per_rank` rows), 0 = pull (the source reads the partials from the peers).",
         overrides="ht_tuning.combine", to_field=lambda v: "push" if v else "pull"),
    Knob("EP_CMB_TMA_WARPS_WIDE", int, None, "Warps per block of the pull combine's gather while the grid has at most EP_CMB_TMA_WARPS_MAXCH blocks.",
         overrides="ht_tuning.gather_warps_wide", lo=1, hi=16),
    Knob("EP_CMB_TMA_WARPS_MAXCH", int, None, "Largest gather grid that still uses EP_CMB_TMA_WARPS_WIDE warps per block.",
         overrides="ht_tuning.gather_wide_max_blocks", lo=1, hi=1024),
    Knob("EP_CMB_TMA_WARPS_NARROW", int, None, "Warps per gather block above EP_CMB_TMA_WARPS_MAXCH blocks.",
         overrides="ht_tuning.gather_warps_narrow", lo=1, hi=16),
    Knob("EP_LL_WARPS", int, None, "Warps per LL block.", overrides="ll_tuning.warps", lo=4, hi=32),
)

KNOB_BY_NAME: Mapping[str, Knob] = MappingProxyType({k.name: k for k in KNOBS})
OVERRIDE_KNOBS: tuple[Knob, ...] = tuple(k for k in KNOBS if k.overrides)


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

    def overrides(self) -> dict[str, Any]:
        """{dotted config field: value} of the override knobs that are set."""
        out = {}
        for knob in OVERRIDE_KNOBS:
            value = self._values[knob.name]
            if value is None:
                continue
            value = knob.to_field(value) if knob.to_field else value
            if value is not None:
                out[knob.overrides] = value
        return out

    def with_values(self, **overrides: Any) -> "Snapshot":
        """A copy with some knobs replaced (keys are full knob names)."""
        merged = dict(self._values)
        for name, value in overrides.items():
            if name not in KNOB_BY_NAME:
                raise ConfigError(f"unknown knob {name}")
            merged[name] = value
        return Snapshot(merged)


# EP_* variables that are not knobs but are read by someone else on purpose (the test harnesses).
NOT_KNOBS = ("EP_TEST_SEED",)
_warned: set[str] = set()


def unknown_variables(env: Mapping[str, str]) -> dict[str, str | None]:
    """{EP_* variable that is no knob: the closest knob name, or None}."""
    out = {}
    for name in env:
        if name.startswith("EP_") and name not in KNOB_BY_NAME and name not in NOT_KNOBS:
            close = difflib.get_close_matches(name, list(KNOB_BY_NAME), n=1, cutoff=0.6)
            out[name] = close[0] if close else None
    return out


def read(environ: Mapping[str, str] | None = None) -> Snapshot:
    """Parse every knob from ``environ`` (default ``os.environ``) into a :class:`Snapshot`. Warns once per
    name about ``EP_*`` variables that are no knob (a typo would otherwise be ignored silently)."""
    env = os.environ if environ is None else environ
    values = {}
    for knob in KNOBS:
        raw = env.get(knob.name)
        values[knob.name] = knob.default if raw is None or raw == "" else knob.parse(raw)
    for name, close in unknown_variables(env).items():
        if name not in _warned:
            _warned.add(name)
            hint = f"; did you mean {close}?" if close else ""
            warnings.warn(f"{name} is not an ep knob and is ignored{hint}", RuntimeWarning, stacklevel=2)
    return Snapshot(values)


def apply(config, snapshot: Snapshot):
    """``config`` with every set override knob replacing its field (nested dataclasses replaced too).
    Raises ConfigError (naming the knob) when the result is not a valid config."""
    for dotted, value in snapshot.overrides().items():
        knob = next(k.name for k in OVERRIDE_KNOBS if k.overrides == dotted)
        try:
            config = _replace_path(config, dotted.split("."), value)
        except ConfigError as exc:
            raise ConfigError(f"{knob}: {exc}") from None
    return config


def _replace_path(obj, path: list[str], value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    inner = getattr(obj, path[0])
    return dataclasses.replace(obj, **{path[0]: _replace_path(inner, path[1:], value)})


def defaults() -> Snapshot:
    return Snapshot({k.name: k.default for k in KNOBS})


# Launcher facts. These are not knobs of ours: they are what mpirun/torchrun tell a process.
_WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")


def launcher_world_size() -> tuple[str, int] | None:
    """(variable, size) of the job as the launcher exported it, or None."""
    for var in _WORLD_SIZE_VARS:
        raw = os.environ.get(var)
        if raw is not None and raw.strip().isdigit():
            return var, int(raw)
    return None


def torch_distributed_ready() -> bool:
    """torch.distributed is imported and initialized (never imports torch)."""
    import sys
    dist = sys.modules.get("torch.distributed")
    try:
        return bool(dist is not None and dist.is_available() and dist.is_initialized())
    except Exception:
        return False


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
