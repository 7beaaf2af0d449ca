"""What the embedded engines share: process identity, file locks, atomic writes, the data
dir and the errors they raise."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
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
def flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_data_dir(data_dir: Path) -> Path:
    data_dir = data_dir.expanduser().resolve()
    if not data_dir.exists():
        # It holds the secret key and the databases: private to us (root mode adds o+x later).
        data_dir.mkdir(parents=True, mode=0o700)
    return data_dir


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def exit_with_parent_hook() -> Callable[[], None] | None:
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
