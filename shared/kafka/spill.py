"""The outbox's queue: records in memory (bounded in events and bytes) or in a spill journal on disk.

``Outbox`` (publishers.py) sends the head of one of these queues until Kafka acknowledges it. Both
keep records in the order they were appended and give each a position that only grows.

``MemoryQueue``: a deque capped in events and in bytes; past either cap the oldest record is dropped
(returned to the caller, which counts and logs it). What it holds is lost with the process.

``SpillJournal``: the records themselves live in append-only segment files under one directory (the
service's state dir), so a process killed with ``kill -9`` loses nothing it accepted: ``append``
returns once the record is in the kernel (``os.write``; surviving a machine crash would take an
fsync per record, which the journal does not pay), and a journal opened on the same directory
replays every record not yet acknowledged. Layout::

    <dir>/lock                 flock'ed by the one process that uses the journal
    <dir>/cursor               (segment, offset) of the first record not yet acknowledged + crc32
    <dir>/00000001.seg ...     records: u32 body length, u32 crc32(body), body
    <dir>/aside.seg            records moved aside after failing too often (kept for an operator)

A body is ``u16 topic length, topic, i32 key length (-1: no key), key, value``. Delivery is at least
once: a record acknowledged by Kafka just before a kill, whose cursor was not written yet, is sent
again on restart (consumers key completions by response_id). A segment whose every record is
acknowledged is deleted; past ``max_bytes`` on disk the oldest segment is dropped whole (records
the broker never got: counted and logged by the caller). Memory use is one record at a time.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import itertools
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.logging import get_logger, log_event

log = get_logger(__name__)

_HEADER = struct.Struct("<II")  # body length, crc32(body)
_CURSOR = struct.Struct("<QQI")  # segment, offset, crc32 of the first 16 bytes
_SEGMENT_RE = re.compile(r"^([0-9]{8})\.seg\Z")
ASIDE_NAME = "aside.seg"
MAX_RECORD_BYTES = 1 << 30
"""A length header above this is corruption, not a record."""


class SpillError(OSError):
    """The spill journal cannot be used (another process holds it, or its directory is unusable)."""


@dataclass
class Pending:
    """One record waiting for Kafka's acknowledgement."""

    topic: str
    key: bytes | None
    value: bytes
    position: tuple[int, int] = (0, 0)
    """Where the queue keeps it; grows with every record appended."""
    next_position: tuple[int, int] = (0, 0)
    """The position just after it."""
    attempts: int = field(default=0, compare=False)

    @property
    def size(self) -> int:
        """Bytes it takes: what the caps count (the encoded body)."""
        return len(self.topic) + len(self.key or b"") + len(self.value) + 6


def encode(item: Pending) -> bytes:
    """Header + body of one record (see the module docstring)."""
    topic = item.topic.encode()
    key = b"" if item.key is None else item.key
    body = b"".join(
        (
            struct.pack("<H", len(topic)),
            topic,
            struct.pack("<i", -1 if item.key is None else len(key)),
            key,
            item.value,
        )
    )
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def decode(body: bytes) -> Pending:
    """The record of one body; ValueError when it is malformed."""
    try:
        (topic_len,) = struct.unpack_from("<H", body, 0)
        topic = body[2 : 2 + topic_len].decode()
        (key_len,) = struct.unpack_from("<i", body, 2 + topic_len)
        start = 6 + topic_len
        key = None if key_len < 0 else body[start : start + key_len]
        value = body[start + max(key_len, 0) :]
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed spill record: {exc}") from None
    if len(topic.encode()) != topic_len or (key is not None and len(key) != key_len):
        raise ValueError("malformed spill record: truncated")
    return Pending(topic, key, value)


class MemoryQueue:
    """Records in memory, at most ``max_events`` and ``max_bytes``; the oldest give way."""

    def __init__(self, *, max_events: int, max_bytes: int):
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._items: collections.deque[Pending] = collections.deque()
        self._next = 0
        self.events = 0
        self.bytes = 0

    def append(self, item: Pending) -> list[Pending]:
        """Queue ``item``; returns the records dropped to make room (oldest first)."""
        item.position, item.next_position = (0, self._next), (0, self._next + 1)
        self._next += 1
        self._items.append(item)
        self.events += 1
        self.bytes += item.size
        dropped = []
        while len(self._items) > 1 and (self.events > self.max_events or self.bytes > self.max_bytes):
            dropped.append(self._popleft())
        return dropped

    def head(self) -> Pending | None:
        return self._items[0] if self._items else None

    def peek(self, n: int) -> list[Pending]:
        """The first ``n`` records (fewer when fewer wait), the head first."""
        return list(itertools.islice(self._items, n))

    def remove_through(self, item: Pending) -> int:
        """Remove every record up to and including ``item``; returns how many were removed."""
        removed = 0
        while self._items and self._items[0].position <= item.position:
            self._popleft()
            removed += 1
        return removed

    def _popleft(self) -> Pending:
        item = self._items.popleft()
        self.events -= 1
        self.bytes -= item.size
        return item

    def put_aside(self, item: Pending) -> bool:
        """Nowhere to keep a record moved aside in memory: False (the caller logs it as dropped)."""
        return False

    def close(self, *, remove_if_empty: bool = True) -> None:
        return None


class SpillJournal:
    """Records in segment files under ``directory``; see the module docstring."""

    def __init__(self, directory: Path, *, segment_bytes: int = 8 << 20, max_bytes: int = 1 << 30):
        if max_bytes < 2 * segment_bytes:
            raise ValueError(f"max_bytes ({max_bytes}) must hold at least two segments of {segment_bytes} bytes")
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpillError(exc.errno, f"cannot use the outbox spill directory {self.directory}: {exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SpillError(
                    exc.errno, f"the outbox spill directory {self.directory} is in use by another process"
                ) from None
            raise
        self._cursor_fd = os.open(self.directory / "cursor", os.O_RDWR | os.O_CREAT, 0o600)
        self._readers: dict[int, int] = {}
        self._aside_fd: int | None = None
        self._head: Pending | None = None
        self._peeked: dict[tuple[int, int], Pending] = {}
        self.aside_bytes = self._file_size(self.directory / ASIDE_NAME)
        self._open()

    # --- start: find the cursor, repair a torn tail, count what is left ---------------------------

    def _open(self) -> None:
        segments = self._segments()
        cursor = self._read_cursor()
        if cursor is None:
            cursor = (segments[0] if segments else 1, 0)
        for seg in [s for s in segments if s < cursor[0]]:  # consumed; the delete was interrupted
            self._segment_path(seg).unlink(missing_ok=True)
        segments = [s for s in segments if s >= cursor[0]]
        if segments and cursor[0] not in segments:
            cursor = (segments[0], 0)
        if not segments:
            segments = [max(cursor[0], 1)]
            self._segment_path(segments[0]).touch()
            cursor = (segments[0], 0)
        self._sizes = {seg: self._file_size(self._segment_path(seg)) for seg in segments}
        active = segments[-1]
        valid = self._valid_length(active)
        if valid < self._sizes[active]:
            log_event(
                log,
                "outbox spill: dropping a torn record at the end of the journal",
                level=30,
                segment=active,
                bytes=self._sizes[active] - valid,
            )
            os.truncate(self._segment_path(active), valid)
            self._sizes[active] = valid
        if cursor[1] > self._sizes[cursor[0]]:
            cursor = (cursor[0], self._sizes[cursor[0]])
        self.cursor = cursor
        self.active = active
        self._active_fd = os.open(self._segment_path(active), os.O_WRONLY | os.O_APPEND)
        self.events = sum(1 for _ in self._walk(self.cursor))
        self.bytes = self._pending_bytes()
        self.replayed = self.events
        if self.events:
            log_event(log, "outbox spill: replaying records not yet acknowledged", events=self.events, bytes=self.bytes)

    def _segments(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _SEGMENT_RE.match(p.name)))

    def _segment_path(self, seg: int) -> Path:
        return self.directory / f"{seg:08d}.seg"

    @staticmethod
    def _file_size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def _read_cursor(self) -> tuple[int, int] | None:
        raw = os.pread(self._cursor_fd, _CURSOR.size, 0)
        if len(raw) != _CURSOR.size:
            return None
        seg, off, crc = _CURSOR.unpack(raw)
        if zlib.crc32(raw[:16]) != crc:
            log_event(log, "outbox spill: the cursor is corrupt; replaying from the oldest segment", level=30)
            return None
        return seg, off

    def _write_cursor(self) -> None:
        head = struct.pack("<QQ", *self.cursor)
        os.pwrite(self._cursor_fd, head + struct.pack("<I", zlib.crc32(head)), 0)

    def _valid_length(self, seg: int) -> int:
        """Bytes of ``seg`` up to the last whole record whose checksum matches."""
        off = 0
        with open(self._segment_path(seg), "rb") as f:
            data = f.read()
        while off + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, off)
            end = off + _HEADER.size + length
            if length > MAX_RECORD_BYTES or end > len(data) or zlib.crc32(data[off + _HEADER.size : end]) != crc:
                break
            off = end
        return off

    def _walk(self, start: tuple[int, int]) -> Iterator[tuple[int, int, int]]:
        """(segment, offset, body length) of every record from ``start`` on (headers only)."""
        seg, off = start
        for s in sorted(self._sizes):
            if s < seg:
                continue
            pos = off if s == seg else 0
            fd = self._reader(s)
            while pos + _HEADER.size <= self._sizes[s]:
                length, _ = _HEADER.unpack(os.pread(fd, _HEADER.size, pos))
                if length > MAX_RECORD_BYTES or pos + _HEADER.size + length > self._sizes[s]:
                    break
                yield s, pos, length
                pos += _HEADER.size + length

    def _pending_bytes(self) -> int:
        return sum(size for seg, size in self._sizes.items()) - self.cursor[1]

    def _reader(self, seg: int) -> int:
        fd = self._readers.get(seg)
        if fd is None:
            fd = self._readers[seg] = os.open(self._segment_path(seg), os.O_RDONLY)
        return fd

    # --- the queue ---------------------------------------------------------------------------------

    def append(self, item: Pending) -> list[Pending]:
        """Write ``item`` at the end of the journal; returns the records dropped to stay under
        ``max_bytes`` (whole oldest segments)."""
        if self._sizes[self.active] >= self.segment_bytes:
            self._rotate()
        data = encode(item)
        item.position = (self.active, self._sizes[self.active])
        written = os.write(self._active_fd, data)
        if written != len(data):  # a full disk mid-record: cut it off so the journal stays whole
            os.truncate(self._segment_path(self.active), item.position[1])
            raise OSError(errno.ENOSPC, f"outbox spill: short write to {self._segment_path(self.active)}")
        self._sizes[self.active] += len(data)
        item.next_position = (self.active, self._sizes[self.active])
        self.events += 1
        self.bytes += len(data)
        dropped: list[Pending] = []
        while sum(self._sizes.values()) > self.max_bytes and len(self._sizes) > 1:
            dropped += self._drop_oldest_segment()
        return dropped

    def _rotate(self) -> None:
        os.close(self._active_fd)
        self.active += 1
        self._active_fd = os.open(self._segment_path(self.active), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._sizes[self.active] = 0

    def _drop_oldest_segment(self) -> list[Pending]:
        oldest = min(self._sizes)
        dropped = [self._read(oldest, off, length) for seg, off, length in self._walk(self.cursor) if seg == oldest]
        if self.cursor[0] == oldest:
            self.cursor = (min(s for s in self._sizes if s > oldest), 0)
        self._delete_segment(oldest)
        self._write_cursor()
        self.events -= len(dropped)
        self.bytes = self._pending_bytes()
        return dropped

    def _delete_segment(self, seg: int) -> None:
        fd = self._readers.pop(seg, None)
        if fd is not None:
            os.close(fd)
        self._segment_path(seg).unlink(missing_ok=True)
        del self._sizes[seg]

    def _read(self, seg: int, off: int, length: int) -> Pending:
        body = os.pread(self._reader(seg), length, off + _HEADER.size)
        try:
            item = decode(body)
        except ValueError:
            item = Pending("<unreadable>", None, body)
        item.position, item.next_position = (seg, off), (seg, off + _HEADER.size + length)
        return item

    def head(self) -> Pending | None:
        """The first record not yet acknowledged (None: the journal is empty); the same object
        until the cursor moves, so that the sender's count of attempts sticks to it."""
        if self._head is not None and self._head.position == self.cursor:
            return self._head
        peeked = self._peeked.get(self.cursor)
        if peeked is not None:  # read by peek: the same object, with its attempts
            self._head = peeked
            return peeked
        while True:
            seg, off = self.cursor
            if off < self._sizes[seg]:
                first = next(self._walk(self.cursor), None)
                if first is not None and first[0] == seg:
                    self._head = self._read(*first)
                    return self._head
                # The rest of this segment is unreadable (a torn record cannot sit before the end
                # of a non-active segment unless the disk corrupted it): skip to the next one.
                log_event(log, "outbox spill: unreadable records skipped", level=40, segment=seg, offset=off)
                self._sizes[seg] = off
            if seg == self.active:
                return None
            self._settle()

    def peek(self, n: int) -> list[Pending]:
        """The first ``n`` records not yet acknowledged (fewer when fewer wait), the head first."""
        head = self.head()
        if head is None:
            return []
        rest = itertools.islice(self._walk(head.next_position), n - 1)
        batch = [head, *(self._read(*found) for found in rest)]
        self._peeked = {item.position: item for item in batch}
        return batch

    def _settle(self) -> None:
        """Delete the segments wholly behind the cursor (moving it past a finished segment that is
        not being written), then write the cursor."""
        for seg in [s for s in self._sizes if s < self.cursor[0]]:
            self._delete_segment(seg)
        while self.cursor[0] != self.active and self.cursor[1] >= self._sizes[self.cursor[0]]:
            old = self.cursor[0]
            self.cursor = (min(s for s in self._sizes if s > old), 0)
            self._delete_segment(old)
        self._write_cursor()

    def remove_through(self, item: Pending) -> int:
        """Acknowledge every record up to and including ``item`` (the cursor moves past it and is
        written); returns how many records that was (0 when the cursor is already past it)."""
        if item.next_position <= self.cursor:
            return 0
        removed = 0
        for seg, off, _ in self._walk(self.cursor):
            if (seg, off) > item.position:
                break
            removed += 1
        self.cursor = item.next_position
        self._settle()
        self.events -= removed
        self.bytes = self._pending_bytes()
        return removed

    def put_aside(self, item: Pending, max_bytes: int = 256 << 20) -> bool:
        """Append ``item`` to ``aside.seg`` (same format, for an operator to inspect or replay);
        False when that file already holds ``max_bytes``."""
        data = encode(item)
        if self.aside_bytes + len(data) > max_bytes:
            return False
        if self._aside_fd is None:
            self._aside_fd = os.open(self.directory / ASIDE_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self._aside_fd, data)
        self.aside_bytes += len(data)
        return True

    def close(self, *, remove_if_empty: bool = True) -> None:
        """Release the files; an empty journal's segment files are removed (the directory stays
        when records or records put aside remain)."""
        empty = self.events == 0
        for fd in [*self._readers.values(), self._active_fd, self._cursor_fd]:
            os.close(fd)
        self._readers.clear()
        if self._aside_fd is not None:
            os.close(self._aside_fd)
        if empty and remove_if_empty:
            for seg in list(self._sizes):
                self._segment_path(seg).unlink(missing_ok=True)
            (self.directory / "cursor").unlink(missing_ok=True)
            if not self.aside_bytes:
                (self.directory / "lock").unlink(missing_ok=True)
                try:
                    self.directory.rmdir()
                except OSError:
                    pass
        os.close(self._lock_fd)
