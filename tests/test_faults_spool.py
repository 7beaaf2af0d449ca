"""The spool's file protocol: a live writer's segment is never taken from it, a sealed or
abandoned one is claimed by exactly one replayer, a torn last line is skipped, and lines are
on disk when `append` returns."""

from __future__ import annotations

import os
from pathlib import Path

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
