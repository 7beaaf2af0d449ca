"""The spool's file protocol: a live writer's segment is never taken from it, a sealed or
abandoned one is claimed by exactly one replayer, a torn last line is skipped, and lines are
on disk when `append` returns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apifast.router.spool import Segment, Spool


def test_live_segment_is_not_claimed_until_sealed(tmp_path: Path) -> None:
    writer, replayer = Spool(tmp_path, 100), Spool(tmp_path, 100)
    writer.open()
    replayer.open()
    writer.append([b'{"generation_id": "a"}', b'{"generation_id": "b"}'])
    assert writer.count == 2
    # The writer holds its active segment: another process cannot take it.
    assert [s.path for s in _claim_all(replayer)] == []
    replayer.rescan()
    assert replayer.count == 2  # but it is counted towards the shared limit
    writer.seal()
    (segment,) = list(replayer.claim())
    assert segment.lines() == [b'{"generation_id": "a"}', b'{"generation_id": "b"}']
    # While claimed, nobody else gets it either.
    assert [s.path for s in _claim_all(writer)] == []
    segment.delete()
    replayer.replayed(2)
    assert not list(tmp_path.glob("spool-*.jsonl"))


def test_abandoned_segment_with_torn_line_is_adopted(tmp_path: Path) -> None:
    # What a router killed mid-write leaves: an unlocked file whose last line is cut short.
    path = tmp_path / "spool-999999-1.jsonl"
    path.write_bytes(b'{"generation_id": "x"}\n{"generation_id": "y"}\n{"generation_id": "z')
    later = Spool(tmp_path, 100)
    later.open()
    assert later.count == 2
    (segment,) = list(later.claim())
    assert segment.lines() == [b'{"generation_id": "x"}', b'{"generation_id": "y"}']
    segment.release()  # e.g. NATS went away again: the file stays for the next try
    assert path.exists()
    assert len(later.all_lines()) == 2


def test_appends_are_durable_and_the_limit_is_soft(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 2)
    spool.open()
    spool.append([b"1", b"2", b"3"])  # over the limit: kept, never dropped
    assert spool.full and spool.count == 3
    (path,) = tmp_path.glob("spool-*.jsonl")
    # Another open file description sees the bytes: they left the process on append.
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"1\n2\n3\n"
    finally:
        os.close(fd)
    spool.close()


def _claim_all(spool: Spool) -> list[Segment]:
    claimed = list(spool.claim())
    for segment in claimed:
        segment.release()
    return claimed


def test_spool_age_is_the_oldest_events_all_through_an_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`apifast_spool_age_seconds` (EventPublisher.spool_age_s) is how an operator alerts on
    events stuck in the spool. During an outage a router appends to one active segment all
    along, so its mtime is always the newest event's: the age must come from when the
    segment was started, or it stays near 0 however long NATS has been gone."""
    from apifast.router import publisher as publisher_module
    from apifast.router import spool as spool_module
    from apifast.router.publisher import EventPublisher

    outage_began = 1_700_000_000  # Unix seconds, on a clock this test controls
    monkeypatch.setattr(spool_module.time, "time_ns", lambda: outage_began * 10**9)
    publisher = EventPublisher("nats://127.0.0.1:1", "S", "s", tmp_path, 100)
    publisher.spool.open()
    assert publisher.spool_age_s() == 0.0  # nothing spooled
    publisher.spool.append([b'{"generation_id": "first"}'])
    # Two minutes on, the same segment still takes events (NATS is still gone); the file's
    # mtime is the real clock's now, and of this latest append.
    monkeypatch.setattr(publisher_module.time, "time", lambda: outage_began + 120.0)
    publisher.spool.append([b'{"generation_id": "latest"}'])
    assert len(list(tmp_path.glob("spool-*.jsonl"))) == 1
    assert publisher.spool_age_s() == 120.0
    publisher.spool.close()
