"""Loads every `queries/*.sql` file once; `Queries().reserve` is the text of reserve.sql."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def _load_all() -> dict[str, str]:
    folder = resources.files("apifast.db").joinpath("queries")
    return {
        entry.name[:-4]: entry.read_text(encoding="utf-8")
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    }


class Queries:
    """Attribute access to named statements, failing loudly on a misspelled name."""

    def __getattr__(self, name: str) -> str:
        try:
            return _load_all()[name]
        except KeyError:
            raise AttributeError(f"no SQL file queries/{name}.sql") from None
