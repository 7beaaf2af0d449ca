"""The README documents every setting and every CLI command."""

from __future__ import annotations

from pathlib import Path

from apifast.cli.main import COMMANDS
from apifast.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    missing = [f"APIFAST_{name.upper()}" for name in Settings.model_fields
               if f"APIFAST_{name.upper()}" not in README]  # fmt: skip
    assert not missing, f"README.md does not document {missing}"


def test_every_command_is_in_the_readme():
    for command, sub in COMMANDS:
        assert f"apifast {command}{' ' + sub if sub else ''}" in README
