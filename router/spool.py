"""A local durable spool for usage events that could not be published (NATS unreachable).

Files are JSON-lines segments named `spool-<pid>-<ns>.jsonl` in one directory that several
router processes may share. A process appends only to its own *active* segment, which it
holds under an exclusive `flock` for as long as it writes to it; every append is fsynced
before it returns. To replay, a process first *seals* its active segment (releases it), then
claims segments one at a time by taking their lock without blocking: a live writer's segment
is skipped, and a segment left by a crashed process (the kernel dropped its lock) is adopted.
A claimed segment is deleted only after every line in it was acknowledged by the stream.

Replaying an event twice is harmless: the stream deduplicates on `Nats-Msg-Id` and the meter
on the generation id. The limit is soft: appends never fail for being over it (dropping a
billed event is worse than a slightly larger file); `full` tells the router to stop taking
paid requests.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("apifast.spool")

_PATTERN = "spool-*.jsonl"


class SpoolFull(RuntimeError):
    """Kept for callers that check for it; the spool itself no longer raises it."""


class Segment:
    """A spool file locked by this process for replay; `lines()` then `delete()` or `release()`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def lines(self) -> list[bytes]:
        with os.fdopen(os.dup(self._fd), "rb") as f:
            f.seek(0)
            data = f.read()
        # A torn last line (a crash mid-write) has no newline and is never acknowledged to
        # anyone; it is skipped rather than replayed as garbage.
        complete = data[: data.rfind(b"\n") + 1]
        return [line for line in complete.split(b"\n") if line.strip()]

    def delete(self) -> None:
        # Unlink while still holding the lock, so no other process can claim it half-gone.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.release()

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


class Spool:
    def __init__(self, directory: Path, max_events: int) -> None:
        self.directory = directory
        self.max_events = max_events
        self._active: Path | None = None
        self._active_fd = -1
        self._own = 0  # lines appended to segments this process has not replayed yet
        self._others = 0  # lines in other segments of the directory, as of the last scan

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rescan()

    def close(self) -> None:
        self.seal()

    # --- counting ---

    @property
    def count(self) -> int:
        return self._own + self._others

    @property
    def full(self) -> bool:
        return self.count >= self.max_events

    def pending_files(self) -> list[Path]:
        if not self.directory.exists():
            return []
        return sorted(self.directory.glob(_PATTERN))

    def oldest_created(self) -> float | None:
        """When the oldest pending segment was started (Unix seconds), None when there is
        none. Read from its name, not its mtime: an outage appends to one active segment
        all along, so its mtime is the newest event's, not the oldest's."""
        oldest: float | None = None
        for path in self.pending_files():
            created = _created(path)
            if created is not None and (oldest is None or created < oldest):
                oldest = created
        return oldest

    def rescan(self) -> None:
        """Recount the lines of every segment that is not this process's active one."""
        others = 0
        for path in self.pending_files():
            if path == self._active:
                continue
            with contextlib.suppress(FileNotFoundError):
                others += _count_lines(path)
        self._others = others
        self._own = _count_lines(self._active) if self._active else 0

    # --- writing ---

    def append(self, events: list[bytes]) -> None:
        """Append and fsync; returns only once the events are on disk."""
        if not events:
            return
        fd = self._active_fd if self._active_fd >= 0 else self._new_segment()
        data = b"".join(e + b"\n" for e in events)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        self._own += len(events)

    def _new_segment(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"spool-{os.getpid()}-{time.time_ns()}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # new file: nobody else can hold it
        _fsync_dir(self.directory)  # the new name itself must survive a power cut
        self._active, self._active_fd = path, fd
        return fd

    def seal(self) -> None:
        """Stop writing to the active segment and release it for replay."""
        if self._active_fd >= 0:
            os.close(self._active_fd)
        if self._active is not None:
            self._others += self._own
            self._own = 0
        self._active, self._active_fd = None, -1

    def all_lines(self) -> list[bytes]:
        """Every complete line of every segment in the directory, without claiming any."""
        lines: list[bytes] = []
        for path in self.pending_files():
            with contextlib.suppress(FileNotFoundError):
                data = path.read_bytes()
                lines.extend(x for x in data[: data.rfind(b"\n") + 1].split(b"\n") if x.strip())
        return lines

    # --- replaying ---

    def claim(self) -> Iterator[Segment]:
        """Seal, then yield each segment this process could lock, oldest first. The caller
        must `delete()` or `release()` each one before asking for the next."""
        self.seal()
        for path in self.pending_files():
            segment = _try_lock(path)
            if segment is not None:
                yield segment

    def replayed(self, lines: int) -> None:
        """Account for a deleted segment's lines."""
        self._others = max(0, self._others - lines)


def _try_lock(path: Path) -> Segment | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)  # a live writer, or another process replaying it
        return None
    try:
        # Another replayer may have deleted it between our open and our lock.
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return Segment(path, fd)


def _created(path: Path) -> float | None:
    """A segment's start time from its name (`spool-<pid>-<ns>`); else its mtime."""
    _, _, ns = path.stem.rpartition("-")
    if ns.isdigit():
        return int(ns) / 1e9
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
