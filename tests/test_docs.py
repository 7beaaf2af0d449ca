"""The README documents every setting and every CLI command."""

from __future__ import annotations

import re
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


def _settings_rows() -> list[tuple[list[str], str]]:
    """The README's Settings table: (setting names, default cell) per row."""
    section = README.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `APIFAST_"):
            names_cell, default_cell = line.strip("|").split("|")[:2]
            names = re.findall(r"`APIFAST_([A-Z0-9_]+)`", names_cell)
            rows.append(([n.lower() for n in names], default_cell.strip()))
    return rows


def test_every_row_of_the_settings_table_is_a_setting_with_its_default():
    """Both ways: a row naming no setting (renamed, removed) is as wrong as a setting
    without a row; a literal default in the table is the one the code has."""
    fields = Settings.model_fields
    rows = _settings_rows()
    named = [name for names, _ in rows for name in names]
    assert not [n for n in named if n not in fields], "README rows naming no setting"
    assert not [n for n in fields if n not in named], "settings without a README row"
    for names, cell in rows:
        # The literals the cell starts with; a description ("(embedded in `dev`)",
        # "required ...", another setting's name) is not checked.
        lead = re.match(r"(`[^`]*`(?:, `[^`]*`)*)", cell)
        literals = re.findall(r"`([^`]*)`", lead[1]) if lead else []
        if len(literals) != len(names) or any("APIFAST_" in v for v in literals):
            continue
        for name, documented in zip(names, literals, strict=True):
            default = fields[name].default
            if isinstance(default, bool):
                shown = str(default).lower()
            elif isinstance(default, float) and default.is_integer():
                shown = str(int(default))
            else:
                shown = str(default)
            if name == "data_dir":
                shown = f"./{shown}"
            assert shown == documented, (
                f"APIFAST_{name.upper()}: README {documented!r}, code {shown!r}"
            )


def test_the_metrics_the_readme_names_are_the_ones_served():
    """APIFAST_METRICS_LISTEN's row names every series; each is one the metrics expose, and
    the other way round."""
    from prometheus_client import CollectorRegistry

    from apifast.metrics import Metrics

    (cell,) = [
        line for line in README.splitlines() if line.startswith("| `APIFAST_METRICS_LISTEN`")
    ]
    documented = set(re.findall(r"`(apifast_[a-z_]+)", cell))
    served = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        served.add(f"{family.name}_total" if family.type == "counter" else family.name)
    assert documented == served
