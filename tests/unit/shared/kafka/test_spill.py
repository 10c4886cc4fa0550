"""The outbox's queues on real files: the spill journal keeps what was appended across a process
that never closed it (kill -9), cuts a torn tail, deletes acknowledged segments, stays under its
byte bound, and refuses a second user; the memory queue is capped in events and bytes."""

from __future__ import annotations

import os

import pytest

from shared.kafka.spill import ASIDE_NAME, MemoryQueue, Pending, SpillError, SpillJournal, decode, encode


def rec(n: int, size: int = 10, key: str | None = "k") -> Pending:
    return Pending("rlhf.completions", key.encode() if key else None, f"{n:06d}".encode().ljust(size, b"."))


def drain(journal: SpillJournal) -> list[bytes]:
    out = []
    while (item := journal.head()) is not None:
        out.append(item.value)
        assert journal.remove_through(item) == 1
    return out


def test_a_record_survives_encoding_with_and_without_a_key():
    for item in (rec(1), rec(2, key=None), Pending("t", b"", b"")):
        back = decode(encode(item)[8:])
        assert (back.topic, back.key, back.value) == (item.topic, item.key, item.value)
    with pytest.raises(ValueError):
        decode(b"\x05\x00ab")


def test_records_left_unacknowledged_by_a_killed_process_are_replayed_in_order(tmp_path):
    first = SpillJournal(tmp_path / "outbox")
    for n in range(5):
        first.append(rec(n))
    head = first.head()
    assert head is not None and first.remove_through(head) == 1  # one acknowledged before the "kill"
    # kill -9: no close(); the kernel has the writes. Release the lock as the dead process would.
    os.close(first._lock_fd)
    second = SpillJournal(tmp_path / "outbox")
    assert second.replayed == second.events == 4
    assert drain(second) == [rec(n).value for n in range(1, 5)]
    assert second.events == 0 and second.bytes == 0


def test_a_torn_record_at_the_end_is_cut_off_and_the_rest_replayed(tmp_path):
    journal = SpillJournal(tmp_path / "o")
    for n in range(3):
        journal.append(rec(n))
    segment = tmp_path / "o" / f"{journal.active:08d}.seg"
    os.close(journal._lock_fd)
    with open(segment, "ab") as f:
        f.write(encode(rec(99))[:-3])  # the write a crash cut short
    again = SpillJournal(tmp_path / "o")
    assert again.events == 3 and drain(again) == [rec(n).value for n in range(3)]


def test_acknowledged_segments_are_deleted_and_a_clean_close_leaves_nothing(tmp_path):
    journal = SpillJournal(tmp_path / "o", segment_bytes=100, max_bytes=10_000)
    for n in range(20):
        journal.append(rec(n, size=30))
    assert len(list((tmp_path / "o").glob("*.seg"))) > 3
    assert drain(journal) == [rec(n, size=30).value for n in range(20)]
    assert len(list((tmp_path / "o").glob("*.seg"))) == 1  # only the segment being written
    journal.close()
    assert not (tmp_path / "o").exists()


def test_past_its_byte_bound_the_oldest_segment_is_dropped_and_reported(tmp_path):
    journal = SpillJournal(tmp_path / "o", segment_bytes=100, max_bytes=250)
    dropped: list[Pending] = []
    for n in range(30):
        dropped += journal.append(rec(n, size=30))
    on_disk = sum(p.stat().st_size for p in (tmp_path / "o").glob("*.seg"))
    assert on_disk <= 250 and dropped
    kept = drain(journal)
    assert [d.value for d in dropped] + kept == [rec(n, size=30).value for n in range(30)]  # nothing else lost


def test_acknowledging_a_later_record_acknowledges_those_before_it_across_segments(tmp_path):
    journal = SpillJournal(tmp_path / "o", segment_bytes=40, max_bytes=10_000)
    items = [rec(n, size=30) for n in range(3)]
    for item in items:
        journal.append(item)  # one record per segment
    assert journal.remove_through(items[1]) == 2
    assert journal.remove_through(items[0]) == 0  # already behind the cursor
    assert drain(journal) == [rec(2, size=30).value]
    assert [p.name for p in (tmp_path / "o").glob("*.seg")] == ["00000003.seg"]


def test_a_record_put_aside_is_kept_in_its_own_file(tmp_path):
    journal = SpillJournal(tmp_path / "o")
    journal.append(rec(7))
    head = journal.head()
    assert head is not None and journal.put_aside(head, max_bytes=1000)
    journal.remove_through(head)
    assert not journal.put_aside(rec(8, size=2000), max_bytes=1000)  # the aside file is bounded too
    journal.close()
    data = (tmp_path / "o" / ASIDE_NAME).read_bytes()
    assert decode(data[8:]).value == rec(7).value


def test_a_journal_in_use_by_another_process_is_refused(tmp_path):
    journal = SpillJournal(tmp_path / "o")
    with pytest.raises(SpillError, match="in use by another process"):
        SpillJournal(tmp_path / "o")
    journal.close()


def test_the_memory_queue_drops_the_oldest_past_its_event_or_byte_cap():
    by_count = MemoryQueue(max_events=3, max_bytes=10_000)
    dropped = [d for n in range(5) for d in by_count.append(rec(n))]
    assert [d.value for d in dropped] == [rec(0).value, rec(1).value] and by_count.events == 3
    by_bytes = MemoryQueue(max_events=1000, max_bytes=3 * rec(0, size=100).size)
    dropped = [d for n in range(10) for d in by_bytes.append(rec(n, size=100))]
    assert len(dropped) == 7 and by_bytes.bytes <= 3 * rec(0, size=100).size
    head = by_bytes.head()
    assert head is not None and head.value == rec(7, size=100).value
    assert by_bytes.remove_through(head) == 1 and by_bytes.events == 2
