"""The knob table of ep.envs: strict parsing, one snapshot, and no other reader of the environment."""
from __future__ import annotations

import copy
import re
import tokenize
from pathlib import Path

import pytest

import dataclasses
import warnings

from ep import ConfigError, MoECommunicatorConfig, envs
from ep.envs import KNOB_BY_NAME, KNOBS, OVERRIDE_KNOBS

EP_DIR = Path(envs.__file__).resolve().parent


def written(value) -> str:
    """A value as a user would write it in the environment."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


# ------------------------------------------------------------------------------------------- table
def test_knob_names_are_unique_and_prefixed():
    names = [k.name for k in KNOBS]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"EP_[A-Z0-9_]+", n) for n in names), names
    assert set(KNOB_BY_NAME) == set(names)


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: k.name)
def test_knob_is_well_formed(knob):
    assert knob.type in (bool, int, float, str)
    assert knob.doc.strip()
    if knob.overrides:
        assert knob.default is None, "an override knob is unset by default: the config's value holds"
    else:
        assert type(knob.default) is knob.type
    if knob.choices is not None:
        assert knob.type is str and knob.default in knob.choices
    if knob.lo is not None and knob.default is not None:
        assert knob.default >= knob.lo
    if knob.hi is not None and knob.default is not None:
        assert knob.default <= knob.hi


@pytest.mark.parametrize("knob", [k for k in KNOBS if not k.overrides], ids=lambda k: k.name)
def test_knob_parses_its_default(knob):
    assert knob.parse(written(knob.default)) == knob.default
    assert envs.read({knob.name: written(knob.default)})[knob.name] == knob.default


def _field(config, dotted: str):
    obj = config
    for part in dotted.split("."):
        names = {f.name for f in dataclasses.fields(obj)}
        assert part in names, f"{dotted}: {type(obj).__name__} has no field {part}"
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("knob", OVERRIDE_KNOBS, ids=lambda k: k.name)
def test_every_override_knob_names_a_config_field_and_sets_it(knob):
    cfg = MoECommunicatorConfig(num_experts=64, hidden_size=64, topk=2, max_tokens_per_rank=8)
    _field(cfg, knob.overrides)
    raw = "1" if knob.type is bool else "2.5" if knob.type is float else str(int(min(knob.hi, 12)))
    value = knob.parse(raw)
    want = knob.to_field(value) if knob.to_field else value
    assert _field(envs.apply(cfg, envs.read({knob.name: raw})), knob.overrides) == want


def test_tunables_have_no_second_env_table():
    """Every env override of a tunable lives in envs.KNOBS, next to the field it overrides."""
    overridden = {k.overrides for k in OVERRIDE_KNOBS}
    for field in ("ht_tuning.dispatch_senders", "ht_tuning.dispatch_warps", "ht_tuning.dispatch_copy",
                  "ht_tuning.combine", "ll_tuning.warps", "overlap.dispatch_num_sms", "timeout_s", "shared_gpu"):
        assert field in overridden, field


def test_unset_or_empty_knobs_take_their_defaults():
    expected = {k.name: k.default for k in KNOBS}
    assert envs.read({}).as_dict() == expected
    assert envs.read({k.name: "" for k in KNOBS}).as_dict() == expected
    assert envs.defaults().as_dict() == expected
    assert envs.read({}).overrides() == {}


def test_an_unknown_ep_variable_warns_naming_the_closest_knob():
    with pytest.warns(RuntimeWarning, match="EP_DISPATCH_WRAPS is not an ep knob.*did you mean EP_DISPATCH_WARPS"):
        envs.read({"EP_DISPATCH_WRAPS": "8"})
    with pytest.warns(RuntimeWarning, match="EP_ZZZZ_QQQQ is not an ep knob and is ignored$"):
        envs.read({"EP_ZZZZ_QQQQ": "1"})


def test_the_unknown_variable_warning_comes_once_per_name():
    envs._warned.discard("EP_DEBUG_CHEKS")
    with pytest.warns(RuntimeWarning):
        envs.read({"EP_DEBUG_CHEKS": "1"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        envs.read({"EP_DEBUG_CHEKS": "1"})


def test_variables_of_the_test_harness_are_not_reported():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        envs.read({"EP_TEST_SEED": "1"})


# ------------------------------------------------------------------------------------------- bools
BOOL_KNOBS = [k for k in KNOBS if k.type is bool]


@pytest.mark.parametrize("knob", BOOL_KNOBS, ids=lambda k: k.name)
@pytest.mark.parametrize("raw, expected", [
    ("1", True), ("0", False), ("true", True), ("false", False), ("on", True), ("off", False),
    ("yes", True), ("no", False), ("TRUE", True), ("False", False), ("On", True), ("OFF", False),
    ("YES", True), ("No", False), (" 1 ", True), ("\tfalse\n", False)])
def test_bool_knobs_parse_strictly(knob, raw, expected):
    assert knob.parse(raw) is expected
    assert envs.read({knob.name: raw})[knob.name] is expected


@pytest.mark.parametrize("knob", BOOL_KNOBS, ids=lambda k: k.name)
@pytest.mark.parametrize("raw", ["2", "-1", "10", "y", "n", "t", "enable", "truee", "0x1", "1.0"])
def test_bool_knobs_reject_anything_else_naming_the_knob(knob, raw):
    with pytest.raises(ConfigError, match=rf"^{knob.name}={re.escape(repr(raw))}: expected a boolean"):
        knob.parse(raw)
    with pytest.raises(ConfigError, match=knob.name):
        envs.read({knob.name: raw})


# -------------------------------------------------------------------------------------------- ints
INT_KNOBS = [k for k in KNOBS if k.type is int]


@pytest.mark.parametrize("knob", INT_KNOBS, ids=lambda k: k.name)
def test_int_knobs_accept_their_range_ends(knob):
    assert knob.lo is not None and knob.hi is not None, "every int knob is range-checked"
    assert knob.parse(str(int(knob.lo))) == knob.lo
    assert knob.parse(str(int(knob.hi))) == knob.hi
    assert knob.parse(f" {int(knob.lo)} ") == knob.lo


@pytest.mark.parametrize("knob", INT_KNOBS, ids=lambda k: k.name)
def test_int_knobs_reject_values_out_of_range(knob):
    for value in (int(knob.lo) - 1, int(knob.hi) + 1):
        with pytest.raises(ConfigError, match=rf"^{knob.name}='{value}': out of range \[{knob.lo}, {knob.hi}\]"):
            knob.parse(str(value))


@pytest.mark.parametrize("knob", INT_KNOBS, ids=lambda k: k.name)
@pytest.mark.parametrize("raw", ["abc", "4.0", "4e1", "true", "1 2"])
def test_int_knobs_reject_non_integers(knob, raw):
    with pytest.raises(ConfigError, match=rf"^{knob.name}={re.escape(repr(raw))}: expected an integer"):
        knob.parse(raw)


def test_int_values_land_in_the_snapshot_as_ints():
    snap = envs.read({"EP_DISPATCH_NSM": "20", "EP_LL_WARPS": "8"})
    assert snap.overrides() == {"overlap.dispatch_num_sms": 20, "ll_tuning.warps": 8}
    assert snap.dispatch_nsm == 20 and type(snap.dispatch_nsm) is int
    assert snap.ll_warps == 8


# ------------------------------------------------------------------------------------------ floats
def test_float_knob_parses_and_is_range_checked():
    knob = KNOB_BY_NAME["EP_TIMEOUT_S"]
    assert knob.parse("2.5") == 2.5
    assert knob.parse("0") == 0.0
    for raw in ("-1", "1e9"):
        with pytest.raises(ConfigError, match=rf"^EP_TIMEOUT_S='{raw}': out of range"):
            knob.parse(raw)
    for raw in ("inf", "-inf"):
        with pytest.raises(ConfigError, match=rf"^EP_TIMEOUT_S='{raw}': expected a finite number"):
            knob.parse(raw)
    with pytest.raises(ConfigError, match=r"^EP_TIMEOUT_S='soon': expected a number"):
        knob.parse("soon")


def test_float_knob_rejects_nan():
    with pytest.raises(ConfigError, match="EP_TIMEOUT_S"):
        KNOB_BY_NAME["EP_TIMEOUT_S"].parse("nan")


# ----------------------------------------------------------------------------------------- choices
CHOICE_KNOBS = [k for k in KNOBS if k.choices is not None]


@pytest.mark.parametrize("knob", CHOICE_KNOBS, ids=lambda k: k.name)
def test_choice_knobs_accept_each_choice(knob):
    for choice in knob.choices:
        assert knob.parse(choice) == choice
        assert knob.parse(f" {choice} ") == choice


@pytest.mark.parametrize("knob", CHOICE_KNOBS, ids=lambda k: k.name)
def test_choice_knobs_reject_other_values_naming_the_knob(knob):
    with pytest.raises(ConfigError, match=rf"^{knob.name}='bogus': expected one of {', '.join(knob.choices)}"):
        knob.parse("bogus")


def test_backend_and_log_level_choices():
    assert KNOB_BY_NAME["EP_BACKEND"].choices == ("auto", "gpu", "cpu")
    assert set(KNOB_BY_NAME["EP_LOG_LEVEL"].choices) == {"DEBUG", "INFO", "WARNING", "ERROR"}


def test_free_text_knob_is_kept_stripped():
    assert envs.read({"EP_CACHE_DIR": " /tmp/ep cache "}).cache_dir == "/tmp/ep cache"


# ---------------------------------------------------------------------------------------- snapshot
def test_read_takes_a_mapping_and_ignores_the_process_environment(monkeypatch):
    monkeypatch.setenv("EP_LOG_LEVEL", "not-a-level")
    monkeypatch.setenv("EP_DISPATCH_WARPS", "8")
    snap = envs.read({"EP_DISPATCH_WARPS": "12", "EP_DEBUG_CHECKS": "on", "EP_BACKEND": "cpu"})
    assert snap["EP_DISPATCH_WARPS"] == 12
    assert snap.debug_checks is True
    assert snap.backend == "cpu"
    assert snap.log_level == "WARNING"


def test_read_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("EP_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("EP_COMBINE_PUSH", "off")
    snap = envs.read()
    assert snap.log_level == "DEBUG"
    assert snap.combine_push is False
    monkeypatch.setenv("EP_LOG_LEVEL", "INFO")
    assert snap.log_level == "DEBUG", "a snapshot does not follow later changes of the environment"


def test_read_raises_naming_a_bad_knob(monkeypatch):
    monkeypatch.setenv("EP_LL_WARPS", "3")
    with pytest.raises(ConfigError, match="EP_LL_WARPS"):
        envs.read()


def test_snapshot_ignores_names_that_are_not_knobs():
    with pytest.warns(RuntimeWarning):
        assert envs.read({"EP_NOT_A_KNOB": "x", "PATH": "/bin"}).as_dict() == envs.defaults().as_dict()


def test_snapshot_attribute_and_item_access():
    snap = envs.read({"EP_COMBINE_NSM": "7"})
    assert snap.combine_nsm == snap["EP_COMBINE_NSM"] == 7
    with pytest.raises(AttributeError):
        snap.no_such_knob
    with pytest.raises(KeyError):
        snap["EP_NO_SUCH_KNOB"]


def test_snapshot_as_dict_is_a_copy():
    snap = envs.defaults()
    d = snap.as_dict()
    d["EP_LL_WARPS"] = 99
    assert snap.ll_warps is None


def test_with_values_replaces_knobs_in_a_copy():
    base = envs.defaults()
    changed = base.with_values(EP_LL_WARPS=8, EP_DEBUG_TRAP=True)
    assert (changed.ll_warps, changed.debug_trap) == (8, True)
    assert (base.ll_warps, base.debug_trap) == (None, False)
    with pytest.raises(ConfigError, match="unknown knob EP_NOPE"):
        base.with_values(EP_NOPE=1)


def test_snapshot_can_be_copied():
    snap = envs.read({"EP_LL_WARPS": "8"})
    assert copy.copy(snap).as_dict() == snap.as_dict()


# ------------------------------------------------------------------------ the only environment reader
ENV_READ = re.compile(r"os\.environ|getenv|from\s+os\s+import[^\n]*\benviron\b")
# Files allowed to touch os.environ, relative to ep/. ep/bench/procenv.py is the benchmark's stated exception
# (its docstring: launcher variables and NCCL_NVLS_ENABLE, which a command-line tool must read/set); it is not
# part of the library that models import. Any other file is a finding.
ALLOWED = {"envs.py", "bench/procenv.py"}


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of a Python file with comments and string literals (docstrings) blanked out, so
    that prose about the rule is not mistaken for a use."""
    kept: dict[int, list[str]] = {}
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING, tokenize.ENCODING) or not tok.string.strip():
                continue
            kept.setdefault(tok.start[0], []).append(tok.string)
    return [(n, " ".join(parts).replace(" . ", ".")) for n, parts in sorted(kept.items())]


def test_no_module_but_envs_reads_the_environment():
    sources = sorted(EP_DIR.rglob("*.py"))
    assert EP_DIR / "envs.py" in sources and len(sources) > 5
    assert any(ENV_READ.search(code) for _, code in code_lines(EP_DIR / "envs.py")), "the check sees envs.py's reads"
    offenders = []
    for path in sources:
        if path.relative_to(EP_DIR).as_posix() in ALLOWED:
            continue
        for lineno, line in code_lines(path):
            if ENV_READ.search(line):
                offenders.append(f"{path.relative_to(EP_DIR.parent)}:{lineno}: {line}")
    assert not offenders, "only ep/envs.py may read the environment:\n" + "\n".join(offenders)


def test_the_library_outside_the_benchmark_never_imports_its_environment_module():
    for path in sorted(EP_DIR.rglob("*.py")):
        if "bench" not in path.relative_to(EP_DIR).parts:
            assert not any("procenv" in line for _, line in code_lines(path)), path


def test_the_env_read_pattern_catches_the_usual_spellings(tmp_path):
    uses = ["x = os.environ['A']", "v = os.getenv('A')", "from os import environ", "from os import path, environ",
            "v = getenv('A')", "os . environ . get ( 'A' )", "env = dict(os.environ)"]
    prose = ['"""A configuration value or an environment knob is invalid."""', "# the rule: only envs reads os.environ",
             "s = 'os.environ'"]
    for i, line in enumerate(uses + prose):
        path = tmp_path / f"m{i}.py"
        path.write_text(line + "\n")
        found = any(ENV_READ.search(code) for _, code in code_lines(path))
        assert found == (line in uses), line
