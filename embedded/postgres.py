"""The embedded PostgreSQL from the `pgserver` wheel, shared between processes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from apifast.embedded.processes import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    EmbeddedError,
    ProcessId,
    ensure_data_dir,
    flock,
    tail,
    write_atomic,
)

log = logging.getLogger(__name__)

PG_SUPERUSER = "postgres"
_PG_DIR = "postgres"
_PG_SYSTEM_USER = "pgserver"
_PG_SOCKET = ".s.PGSQL.5432"
# sun_path is 104 bytes on macOS and 108 on Linux, terminating NUL included.
_MAX_SOCKET_PATH = 100


# --- PostgreSQL --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SystemUser:
    uid: int
    gid: int
    name: str


def _pg_bin() -> Path:
    # Located, not imported: importing pgserver sets up its own server machinery.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the `pgserver` package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _pg_system_user(pgdata: Path) -> _SystemUser | None:
    """Who runs PostgreSQL: None for "us", or an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return None
    if pgdata.exists() and pgdata.stat().st_uid != 0:
        st = pgdata.stat()
        try:
            return _SystemUser(st.st_uid, st.st_gid, pwd.getpwuid(st.st_uid).pw_name)
        except KeyError:
            return _SystemUser(st.st_uid, st.st_gid, str(st.st_uid))
    try:
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        try:
            useradd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
            subprocess.run([*useradd, _PG_SYSTEM_USER], check=True, capture_output=True, timeout=30)
            entry = pwd.getpwnam(_PG_SYSTEM_USER)
            log.info("created system user %r to run the embedded PostgreSQL", _PG_SYSTEM_USER)
        except (OSError, subprocess.SubprocessError, KeyError):
            entry = pwd.getpwnam("nobody")
    return _SystemUser(entry.pw_uid, entry.pw_gid, entry.pw_name)


def _ensure_traversable(path: Path) -> None:
    """Give "others" search permission on every ancestor of `path` that lacks it (root mode)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.warning("adding o+x to %s so the PostgreSQL user can reach its data", parent)
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _chown_tree(path: Path, user: _SystemUser) -> None:
    os.chown(path, user.uid, user.gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), user.uid, user.gid)


def _run_pg(exe: str, args: list[str], user: _SystemUser | None, *, log_file: Path | None) -> None:
    cmd = [str(_pg_bin() / exe), *args]
    privileges: dict[str, Any] = {}
    if user is not None:
        privileges = {"user": user.uid, "group": user.gid, "extra_groups": []}
    # PG* variables of the caller (PGDATA, PGHOST, ...) must not redirect our tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # A file, not a pipe: the postmaster started by pg_ctl could otherwise inherit the pipe and
    # keep us waiting for EOF.
    with tempfile.TemporaryFile() as out:
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=env,
                timeout=START_TIMEOUT_S + 30,
                check=False,
                **privileges,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedError(
                f"{exe} timed out; log:\n{tail(log_file) if log_file else ''}"
            ) from exc
        if result.returncode != 0:
            out.seek(0)
            output = out.read().decode(errors="replace").strip()
            server_log = f"\nserver log {log_file}:\n{tail(log_file)}" if log_file else ""
            raise EmbeddedError(
                f"{exe} {args[0]} failed ({result.returncode}):\n{output}{server_log}"
            )


def _postmaster(pgdata: Path) -> tuple[int, Path] | None:
    """(pid, socket dir) of a ready server on `pgdata`, or None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(lines) < 8 or lines[7].strip() != "ready" or not lines[4].strip():
        return None
    pid, port, socket_dir = int(lines[0]), lines[3].strip(), Path(lines[4].strip())
    if not ProcessId(pid).alive() or not (socket_dir / f".s.PGSQL.{port}").exists():
        return None
    return pid, socket_dir


def _socket_dir(pgdata: Path, user: _SystemUser | None) -> Path:
    if len(str(pgdata / _PG_SOCKET)) <= _MAX_SOCKET_PATH:
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"apifast-pg-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    owner = user.uid if user else os.geteuid()
    if short.stat().st_uid not in (owner, os.geteuid()):
        raise EmbeddedError(f"{short} belongs to another user; remove it")
    if user is not None:
        os.chown(short, user.uid, user.gid)
    short.chmod(0o700)  # the socket trusts whoever can reach it
    return short


def _initdb(pgdata: Path, user: _SystemUser | None, *, durable: bool) -> None:
    if pgdata.exists():
        if any(pgdata.iterdir()):
            raise EmbeddedError(f"{pgdata} exists but holds no database cluster; move it away")
        pgdata.rmdir()
    # Build in a side directory and rename, so an interrupted initdb never leaves a half cluster.
    building = pgdata.with_name(pgdata.name + ".initdb")
    if building.exists():
        shutil.rmtree(building)
    building.mkdir(mode=0o700)
    if user is not None:
        os.chown(building, user.uid, user.gid)
    log.info("creating the PostgreSQL cluster in %s", pgdata)
    args = ["-D", str(building), f"--username={PG_SUPERUSER}", "--auth=trust"]
    args += ["--encoding=UTF8", "--locale=C"]
    if not durable:
        args.append("--no-sync")
    _run_pg("initdb", args, user, log_file=None)
    building.rename(pgdata)


class EmbeddedPostgres:
    """A handle on the server of <data_dir>/postgres; `close()` it once when done.

    Handles are counted across processes; the last one closed stops the server, whichever
    process started it.
    """

    def __init__(self, data_dir: Path, socket_dir: Path, token: str, *, started: bool) -> None:
        self.data_dir = data_dir
        self.pgdata = data_dir / _PG_DIR
        self.socket_dir = socket_dir
        self.started = started
        self._token = token
        self._closed = False

    @property
    def dsn(self) -> str:
        return self.url()

    def url(self, database: str = "postgres") -> str:
        """An asyncpg/libpq URL for `database`, reaching the server through its Unix socket."""
        return (
            f"postgresql://{PG_SUPERUSER}@/{quote(database, safe='')}"
            f"?host={quote(str(self.socket_dir), safe='/')}"
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with flock(self.data_dir / "postgres.lock"):
            holders = [h for h in _read_holders(self.data_dir) if h["token"] != self._token]
            _write_holders(self.data_dir, holders)
            if holders or _postmaster(self.pgdata) is None:
                return
            log.info("stopping the embedded PostgreSQL")
            user = _pg_system_user(self.pgdata)
            try:
                _run_pg(
                    "pg_ctl",
                    [
                        "stop",
                        "-D",
                        str(self.pgdata),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        str(STOP_TIMEOUT_S),
                    ],
                    user,
                    log_file=self.pgdata / "postgres.log",
                )
            except EmbeddedError as exc:
                log.warning("could not stop the embedded PostgreSQL: %s", exc)

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_holders(data_dir: Path) -> list[dict[str, Any]]:
    """Live handle holders; entries of processes that died are dropped."""
    try:
        raw = json.loads((data_dir / "postgres.users.json").read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [
        h for h in raw if isinstance(h, dict) and ProcessId(int(h["pid"]), str(h["start"])).alive()
    ]


def _write_holders(data_dir: Path, holders: list[dict[str, Any]]) -> None:
    write_atomic(data_dir / "postgres.users.json", json.dumps(holders))


def start_postgres(data_dir: Path, *, durable: bool = True) -> EmbeddedPostgres:
    """Start (or join) the PostgreSQL of <data_dir>/postgres, creating the cluster the first time.

    `durable=False` trades crash safety for speed (no fsync); use it only for throw-away data.
    """
    data_dir = ensure_data_dir(data_dir)
    pgdata = data_dir / _PG_DIR
    log_file = pgdata / "postgres.log"
    with flock(data_dir / "postgres.lock"):
        user = _pg_system_user(pgdata)
        if user is not None:
            _ensure_traversable(pgdata)
            _ensure_traversable(_pg_bin() / "postgres")
            if pgdata.exists() and pgdata.stat().st_uid == 0:
                _chown_tree(pgdata, user)
        if not (pgdata / "PG_VERSION").exists():
            _initdb(pgdata, user, durable=durable)
        holders = _read_holders(data_dir)
        running = _postmaster(pgdata)
        started = running is None
        if running is None:
            socket_dir = _socket_dir(pgdata, user)
            options = ["-h", "''", "-k", shlex.quote(str(socket_dir))]
            if not durable:
                for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
                    options += ["-c", setting]
            log.info("starting the embedded PostgreSQL (%s)", pgdata)
            start = ["start", "-D", str(pgdata), "-w", "-t", str(START_TIMEOUT_S)]
            start += ["-l", str(log_file), "-o", " ".join(options)]
            _run_pg("pg_ctl", start, user, log_file=log_file)
            running = _postmaster(pgdata)
            if running is None:
                raise EmbeddedError(
                    f"PostgreSQL did not come up; log {log_file}:\n{tail(log_file)}"
                )
        me = ProcessId.current()
        token = secrets.token_hex(8)
        _write_holders(data_dir, [*holders, {"pid": me.pid, "start": me.start, "token": token}])
    return EmbeddedPostgres(data_dir, running[1], token, started=started)
