"""The README tells the truth about the settings and opens with the two set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

from broker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _config_table() -> str:
    start = README.index("## Configuration")
    return README[start : README.index("\n## ", start + 1)]


def test_every_setting_has_a_row_in_the_configuration_table() -> None:
    table = _config_table()
    missing = [
        f"V2G_{name.upper()}"
        for name in Settings.model_fields
        if f"`V2G_{name.upper()}`" not in table
    ]
    assert not missing, f"README's Configuration table lacks {missing}"


def test_the_configuration_table_names_no_variable_that_does_not_exist() -> None:
    named = set(re.findall(r"`V2G_([A-Z0-9_]+)`", _config_table()))
    unknown = sorted(v for v in named if v.lower() not in Settings.model_fields)
    assert not unknown, f"README documents variables that no setting reads: {unknown}"


def test_readme_opens_with_the_demo_and_the_test_command() -> None:
    first_block = README[README.index("```sh") : README.index("```", README.index("```sh") + 5)]
    assert "v2g demo" in first_block
    assert "bash scripts/test" in first_block
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
