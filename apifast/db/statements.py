"""Named SQL statements: each feature keeps one statement per file in its `sql/` folder.

`Queries("apifast.router").reserve_batch` is the text of `router/sql/reserve_batch.sql`; the
folder is read once, on first use.
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def _load_all(package: str) -> dict[str, str]:
    folder = resources.files(package).joinpath("sql")
    return {
        entry.name[:-4]: entry.read_text(encoding="utf-8")
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    }


class Queries:
    """Attribute access to a package's statements, failing loudly on a misspelled name."""

    def __init__(self, package: str) -> None:
        self._package = package

    def __getattr__(self, name: str) -> str:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return _load_all(self._package)[name]
        except KeyError:
            raise AttributeError(f"no SQL file {self._package}:sql/{name}.sql") from None
