"""The README stays true to the code: its knob table is ep.envs.KNOBS, and the set-up commands it names exist.

Regenerate the README's knob table after editing ep/envs.py:  python tests/cpu/test_readme.py --write
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":      # run as a script: make the checkout importable
    sys.path.insert(0, str(ROOT))

from ep.envs import KNOBS  # noqa: E402

README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
BEGIN = "<!-- knobs:begin -->"
END = "<!-- knobs:end -->"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(value) -> str:
    """A knob's default as it would be written in the environment."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if value == "":
        return "(empty)"
    return f"`{value}`"


def render_knob_table(knobs=KNOBS) -> str:
    """The markdown table of every knob, one row each, in table order."""
    lines = ["| knob | type | default | overrides | meaning |", "| --- | --- | --- | --- | --- |"]
    for knob in knobs:
        field = f"`{knob.overrides}`" if knob.overrides else "-"
        lines.append(f"| `{knob.name}` | {knob.type.__name__} | {_default(knob.default)} | {field} | "
                     f"{_cell(knob.doc)} |")
    return "\n".join(lines)


def readme_knob_table(text: str) -> str:
    """The lines between the knob markers of the README, blank lines dropped."""
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"README.md needs one {BEGIN} and one {END}"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    return "\n".join(line.rstrip() for line in block.splitlines() if line.strip())


def _names(text: str, command: str) -> bool:
    """Whether ``command`` occurs as a whole command (``make test`` does not match ``make test-gpu``)."""
    return re.search(re.escape(command) + r"(?![\w-])", text) is not None


def write_readme() -> None:
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{render_knob_table()}\n{END}{tail}")


def test_readme_knob_table_is_rendered_from_envs_knobs():
    assert readme_knob_table(README.read_text()) == render_knob_table(), \
        "README.md's knob table differs from ep.envs.KNOBS; run: python tests/cpu/test_readme.py --write"


def test_readme_names_the_setup_commands():
    text = README.read_text()
    for command in ("make bench", "make test", "make test-gpu"):
        assert _names(text, command), f"README.md does not mention `{command}`"


def test_ci_script_runs_make_test_and_is_executable():
    assert _names(CI_RUN.read_text(), "make test")
    assert os.access(CI_RUN, os.X_OK), f"{CI_RUN} is not executable"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_readme()
        print(f"wrote the knob table of {README}")
    else:
        print(render_knob_table())
