"""`apifast admin set-password`: reads stdin, stores a scrypt hash, signs every session out."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg

from apifast.admin.passwords import check_strength, hash_password, verify_password
from tests.harness import SECRET
from tests.services import run_async


def run_cli(database_url: str, tmp_path: Path, stdin: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APIFAST_DATABASE_URL": database_url, "APIFAST_SECRET_KEY": SECRET,
           "APIFAST_DATA_DIR": str(tmp_path)}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "apifast.cli", "admin", "set-password"],
        input=stdin, capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip


async def _fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


def test_set_password_from_stdin(database_factory: Callable[[str], str], tmp_path: Path):
    dsn = database_factory("admin_cli")
    done = run_cli(dsn, tmp_path, "a long enough passphrase\n")
    assert done.returncode == 0, done.stderr
    (row,) = run_async(_fetch(dsn, "SELECT hash FROM admin_password"))
    assert row["hash"].startswith("scrypt$15$8$1$")
    assert "a long enough passphrase" not in row["hash"]
    assert verify_password("a long enough passphrase", row["hash"])
    assert not verify_password("a long enough passphrasE", row["hash"])
    audit = run_async(_fetch(dsn, "SELECT action, target FROM admin_audit"))
    assert [(r["action"], r["target"]) for r in audit] == [("password_set", "cli")]
    short = run_cli(dsn, tmp_path, "short\n")
    assert short.returncode == 2 and "at least 12" in short.stderr


def test_password_hashing():
    hashed = hash_password("correct horse battery staple")
    assert hashed != hash_password("correct horse battery staple")  # salted
    assert verify_password("correct horse battery staple", hashed)
    assert not verify_password("wrong", hashed)
    assert not verify_password("anything", None)
    assert not verify_password("anything", "md5$garbage")
    check_strength("x" * 12)
