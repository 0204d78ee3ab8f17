"""The promises the repository makes to a new user."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, "the test command in .ci/run differs from the README's"


def test_sample_data_ships_with_licence():
    lic = (ROOT / "covidlib" / "sample_data" / "LICENSE.md").read_text()
    assert "CC BY-NC-SA 4.0" in lic and "Soares" in lic
