"""A local durable spool for usage events that could not be published (NATS unreachable).

Append-only JSON lines in one file per router process; events are replayed when NATS is
back, and the file is removed once every line in it has been acknowledged. Replaying an
event twice is harmless: the stream and the meter both deduplicate on the generation id.
"""

from __future__ import annotations

import os
from pathlib import Path


class SpoolFull(RuntimeError):
    pass


class Spool:
    def __init__(self, directory: Path, max_events: int) -> None:
        self.directory = directory
        self.max_events = max_events
        self._count = 0
        self._path = directory / f"spool-{os.getpid()}.jsonl"

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count = sum(self._count_lines(p) for p in self.pending_files())

    @staticmethod
    def _count_lines(path: Path) -> int:
        with path.open("rb") as f:
            return sum(1 for _ in f)

    def pending_files(self) -> list[Path]:
        if not self.directory.exists():
            return []
        return sorted(self.directory.glob("spool-*.jsonl"))

    @property
    def count(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        return self._count >= self.max_events

    def append(self, events: list[bytes]) -> None:
        if self._count + len(events) > self.max_events:
            raise SpoolFull(f"spool holds {self._count} events, limit {self.max_events}")
        with self._path.open("ab") as f:
            f.write(b"".join(e + b"\n" for e in events))
            f.flush()
            os.fsync(f.fileno())
        self._count += len(events)

    def read(self, path: Path) -> list[bytes]:
        with path.open("rb") as f:
            return [line.rstrip(b"\n") for line in f if line.strip()]

    def remove(self, path: Path, lines: int) -> None:
        path.unlink(missing_ok=True)
        self._count = max(0, self._count - lines)
