"""`apifast admin set-password`: store the admin panel's password (scrypt hash) in Postgres.

The password is read from stdin: typed twice at a terminal, or the first line of piped input
(`printf '%s\\n' "$PASSWORD" | apifast admin set-password`). Setting it signs out every admin
session, and the change is written to the audit trail.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from typing import Any, TextIO

import asyncpg

from apifast.db import Queries
from apifast.settings import Settings

Q = Queries("apifast.admin")


def read_password(stdin: TextIO | None = None) -> str:
    stream = stdin if stdin is not None else sys.stdin
    if stream.isatty():
        first = getpass.getpass("New admin password: ")
        if getpass.getpass("Repeat it: ") != first:
            raise ValueError("the two passwords differ")
        return first
    return stream.readline().rstrip("\r\n")


async def store_password(dsn: str, hashed: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(Q.admin_password_set, hashed)
            await conn.execute(Q.admin_sessions_delete_all)
            await conn.execute(Q.admin_audit_insert, None, "password_set", "cli", "{}")
    finally:
        await conn.close()


def cmd_admin_set_password(settings: Settings, args: argparse.Namespace) -> int:
    from apifast.admin.passwords import PasswordError, check_strength, hash_password

    try:
        password = read_password()
        check_strength(password)
    except (ValueError, PasswordError) as exc:
        print(f"apifast: {exc}", file=sys.stderr)
        return 2
    from apifast.cli.common import database_settings
    from apifast.server.migrations import migrate_database

    hashed = hash_password(password)
    # Like `keys create`: APIFAST_DATABASE_URL, else a running `apifast dev`, else the
    # embedded PostgreSQL under the data dir.
    with database_settings(settings) as resolved:
        asyncio.run(migrate_database(resolved.database_url))
        asyncio.run(store_password(resolved.database_url, hashed))
    print("admin password set; every admin session was signed out", file=sys.stderr)
    return 0


def add_admin_parser(sub: Any) -> None:
    """Add `apifast admin set-password` to the CLI's subcommands."""
    admin = sub.add_parser("admin", help="manage the admin panel").add_subparsers(
        dest="admin_command", required=True
    )
    admin.add_parser(
        "set-password",
        help="read the admin password from stdin and store its scrypt hash (signs out sessions)",
    )
