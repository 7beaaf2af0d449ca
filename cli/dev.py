"""`apifast dev`: the router and the meter in one process on embedded engines.

One process, because a chdb path can be opened by one process only.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from pathlib import Path

from apifast.settings import Settings

log = logging.getLogger("apifast.dev")


def run_dev(settings: Settings) -> int:
    from apifast.catalog.toml import CatalogError
    from apifast.embedded import EmbeddedError, embedded_stack
    from apifast.server.app import create_app
    from apifast.server.migrations import migrate_database
    from apifast.server.serve import run_uvicorn

    try:
        with embedded_stack(settings) as resolved:
            applied = asyncio.run(migrate_database(resolved.database_url))
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            try:
                app = create_app(resolved, run_meter=True)
            except CatalogError as exc:
                print(f"apifast: {exc}", file=sys.stderr)
                return 2
            announce(resolved)
            run_uvicorn(app, resolved)
    except EmbeddedError as exc:
        print(f"apifast: {exc}", file=sys.stderr)
        return 1
    return 0


def announce(settings: Settings) -> None:
    """Where the dev stack serves and what to try: a banner for a terminal, or one log
    line when the logs are JSON (a collector reading them takes every line as JSON)."""
    url = f"http://{settings.host}:{settings.port}"
    models = (
        "the offline demo model 'apifast-demo'"
        if settings.models_file is None
        else f"the models in {settings.models_file}"
    )
    new_key = f"{apifast_command()} keys create --credit 5.00"
    if settings.log_format == "json":
        log.info("ApiFast dev stack on %s serving %s; data: %s; new key: %s; try: curl "
                 "%s/v1/models", url, models, settings.data_dir, new_key, url)  # fmt: skip
        return
    print(
        f"ApiFast dev stack on {url} serving {models}.\n"
        f"  data:     {settings.data_dir}\n"
        f"  new key:  {new_key}\n"
        f"  try:      curl {url}/v1/models",
        file=sys.stderr,
        flush=True,
    )


def apifast_command() -> str:
    """How the user's shell reaches this `apifast`: `apifast` when it is on PATH, else its
    path in the venv (`.venv/bin/apifast` for `scripts/dev`, whose venv is not activated)."""
    here = Path(sys.executable).parent / "apifast"
    found = shutil.which("apifast")
    if not here.exists() or (found is not None and Path(found).resolve() == here.resolve()):
        return "apifast"
    try:
        return str(here.relative_to(Path.cwd()))  # has a slash, so the shell runs it as a path
    except ValueError:
        return str(here)
