"""A durable, bounded, append-only journal of opaque events for when PostgreSQL is away.

Issue 7: nothing acknowledged is ever lost. When the database is unreachable or too slow,
an event is appended here and fsynced *before* it is acknowledged (a webhook gets its 200,
a CallMonitor line counts as taken); once the database is back the ingest side reads
``pending()`` in order, commits (idempotently), and calls ``replayed(up_to)``. The spool
neither knows nor cares what a payload means.

Layout of the folder (created 0700, files 0600)::

    000000000001.seg   segment files, named by the sequence number of their first record
    000000000412.seg
    mark               the replay mark: what has been replayed, and the next sequence number
    mark.tmp           a mark being written; a leftover one is ignored and removed at open
    lock               flock(2)ed while a Spool has the folder open: one writer only

A record is, all integers big-endian::

    MAGIC b"\\xd9\\x5f" (2) | seq (8) | length (4) | crc32(seq bytes + payload) (4) | payload

and a segment is records with consecutive sequence numbers, the first one equal to the
number in the file name. A record is *intact* only when its magic, length (at most
``MAX_PAYLOAD``, and within the file), crc and sequence number (the expected next one) all
check out. A new segment is started once the current one reaches ``segment_bytes``; a
batch is never split across segments, because it is one ``write``.

The mark file is ``b"DPSM" | replayed_up_to (8) | next_seq (8) | crc32 of the 20 bytes
before (4)``, or, when records beyond ``replayed_up_to`` were replayed too,
``b"DPSA" | replayed_up_to (8) | next_seq (8) | count (4) | count seqs (8 each) | crc32 of
everything before (4)``. It is replaced atomically (write ``mark.tmp``, fsync, rename,
fsync the folder), so it is always either the old or the new mark, never a mixture. It
carries ``next_seq`` so that sequence numbers keep increasing after every segment was
compacted away: a consumer may key on them.

The seqs *ahead* of the mark exist because a consumer may apply records side by side (the
replay's lanes): when one lane's transaction commits and another's fails (the database
went away again), the records committed beyond the first failed one are done but not
contiguous. ``replayed(up_to, ahead)`` keeps them, ``pending`` never returns them again, in
this run or after a restart. At most ``MAX_AHEAD`` are kept; any more are simply returned
again (the consumer is idempotent), so the mark stays small.

Why these rules:

* Durability: ``append_many`` does one ``write`` and one ``fsync`` for the whole batch (and
  a folder fsync when it had to create a segment file) and returns only then; what it
  returned is on disk. The ``AsyncSpool`` groups appends that arrive while an fsync runs
  into the next batch, so a burst costs one fsync, not one per event.
* Crash recovery: a crash can leave a torn last record (a partial write, or zeros from
  delayed allocation). ``open`` keeps every intact record and cuts the segment at the first
  record that does not check out, *and everything after it in that segment*: a record is
  found only by the length of the one before it, so nothing after a bad one can be trusted
  to start where it seems to. Such a cut in the middle of a segment is not a crash artefact
  (it is bit rot or tampering); the bytes are cut all the same, counted in
  ``recovered_torn_bytes`` for the alarm, and later *segments* are kept (sequence numbers
  may then have a gap). What was cut was never acknowledged when the cause is a crash,
  because the fsync of its batch had not returned.
* A failed write or fsync (a full disk, an I/O error) raises to the caller, who must not
  acknowledge. The segment is cut back to its last good size if possible and is not written
  to again; the batch's sequence numbers are skipped, so should its bytes have reached the
  disk after all they come back at the next open as records of their own (at least once;
  the ingest side is idempotent), never mixed up with later records.
* Bounded: ``max_bytes`` counts the segment files on disk. An append that would exceed it
  raises ``SpoolFull`` with nothing written, so the caller can refuse loudly (a 503 that
  the client retries) instead of anything being dropped silently; ``state().alarm`` turns
  on at ``alarm_ratio`` of it for the log, the readiness probe and the metrics.
* Compaction: ``replayed`` writes the mark first and only then removes the segment files
  that hold nothing pending (all of them once everything is replayed), so a crash between
  the two leaves old records that the mark already hides, removed at the next open.
* A full disk (issue 14): a failed append is cut back as above, and a segment file left
  empty by it is removed, so a full disk refusing event after event leaves no pile of
  empty files. When the mark cannot be written, the replay goes on from the mark kept
  in memory (nothing is applied twice in this run; after a restart at most the records
  replayed since the last mark on disk are applied once more, which the ingest
  tolerates), the fully replayed segment files are still removed (that frees the space
  the mark needs; removing a replayed segment never loses an event), and the mark is
  written again at the next ``replayed``, ``sync_mark`` or ``close``. ``state()`` tells
  the last disk error until an operation succeeds again (the alarm is then on).

``Spool`` does blocking file I/O and is pure standard library; ``AsyncSpool`` is the
reactor's face of it and runs every file operation in one dedicated thread. Every call
that writes goes through ``Spool.files`` (``FileOps``: the ``os`` functions by default), a
seam where a test puts a disk that fails (``ENOSPC``, ``EIO``) without any privilege.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import struct
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from dpvoip.deferreds import OneShotObserver

T = TypeVar("T")

MAGIC = b"\xd9\x5f"
HEADER = struct.Struct(">2sQII")  # magic, seq, payload length, crc32 of seq + payload
SEQ = struct.Struct(">Q")
MAX_PAYLOAD = 1024 * 1024
SEGMENT_BYTES = 8 * 1024 * 1024
SEGMENT_SUFFIX = ".seg"
MARK_MAGIC = b"DPSM"
MARK = struct.Struct(">4sQQI")  # magic, replayed up to, next seq, crc32 of the 20 before
MARK_AHEAD_MAGIC = b"DPSA"
#: The long form's head: the short form's layout, its last field the count of seqs ahead.
MARK_AHEAD = MARK
#: Seqs replayed beyond the mark's prefix that the mark remembers (64 KiB of mark at most).
MAX_AHEAD = 8192
MARK_NAME = "mark"
MARK_TEMP = "mark.tmp"
LOCK_NAME = "lock"


class SpoolError(Exception):
    """The spool cannot do what was asked; the base of the spool's own errors."""


class SpoolFull(SpoolError):
    """Appending would exceed ``max_bytes``: nothing of the batch was written."""


class SpoolCorrupt(SpoolError):
    """The spool's files contradict each other in a way no crash produces (a damaged mark
    file, overlapping segments, a record that changed after it was checked). Refusing is
    better than guessing: a guess could drop or repeat events without anyone noticing."""


class SpoolClosed(SpoolError):
    """The spool is not open (not yet, no longer, or in use by another process)."""


#: The errors of a disk that cannot take more now (full, over quota, failing): the event
#: is refused (a webhook's 503), the spool tries again with the next one.
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


class FileOps:
    """The file operations through which the spool writes: ``os``'s own. A test hands the
    spool a subclass that fails like a full or broken disk."""

    def open(self, path: str | Path, flags: int, mode: int = 0o777) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def replace(self, source: str | Path, target: str | Path) -> None:
        os.replace(source, target)

    def unlink(self, path: Path) -> None:
        path.unlink(missing_ok=True)


def disk_error(error: BaseException) -> bool:
    """Whether ``error`` is the disk refusing (full, quota, I/O error), not a bug."""
    return isinstance(error, OSError) and error.errno in DISK_ERRORS


@dataclass(frozen=True)
class SpoolState:
    """What the alarm, the readiness probe and the metrics need, in one immutable value."""

    pending: int  # records appended and not yet marked replayed
    bytes: int  # bytes on disk of pending (and not yet compacted) records
    limit: int  # max_bytes
    alarm: bool  # bytes >= alarm_ratio * limit
    recovered_torn_bytes: int  # bytes of a torn tail cut off when the spool was opened
    appended_total: int  # since open
    replayed_total: int  # since open
    disk_error: str = ""  # the last write's error while the disk refuses, else ""
    disk_errors: int = 0  # failed disk operations since open
    mark_behind: bool = False  # the mark on disk is older than the replay's progress


@dataclass
class _Segment:
    """One segment file as far as it has been checked: records ``first``..``last``
    (``last == first - 1`` when empty) in its first ``size`` bytes."""

    first: int
    path: Path
    size: int
    last: int


def segment_name(first_seq: int) -> str:
    return f"{first_seq:012d}{SEGMENT_SUFFIX}"


def record_size(payload: bytes) -> int:
    """Bytes one payload takes on disk, header included."""
    return HEADER.size + len(payload)


def encode_record(seq: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(SEQ.pack(seq)))
    return HEADER.pack(MAGIC, seq, len(payload), crc) + payload


def decode_records(data: bytes, first_seq: int,
                   limit: int | None = None) -> tuple[list[tuple[int, bytes]], int]:
    """The intact records at the start of ``data`` (a segment whose first record is
    ``first_seq``; at most ``limit`` of them), and the number of bytes they take: without
    a limit, everything from there on is torn or corrupt."""
    records: list[tuple[int, bytes]] = []
    view = memoryview(data)
    position = 0
    expected = first_seq
    while len(data) - position >= HEADER.size and (limit is None or len(records) < limit):
        magic, seq, length, crc = HEADER.unpack_from(data, position)
        end = position + HEADER.size + length
        if magic != MAGIC or seq != expected or length > MAX_PAYLOAD or end > len(data):
            break
        payload = bytes(view[position + HEADER.size:end])
        if zlib.crc32(payload, zlib.crc32(SEQ.pack(seq))) != crc:
            break
        records.append((seq, payload))
        position = end
        expected += 1
    return records, position


def encode_mark(replayed_up_to: int, next_seq: int, ahead: Sequence[int] = ()) -> bytes:
    """The mark; the short form (which every earlier version reads) when nothing beyond
    ``replayed_up_to`` was replayed."""
    if not ahead:
        body = MARK.pack(MARK_MAGIC, replayed_up_to, next_seq, 0)[:-4]
    else:
        seqs = sorted(ahead)
        body = (MARK_AHEAD.pack(MARK_AHEAD_MAGIC, replayed_up_to, next_seq, len(seqs))
                + struct.pack(f">{len(seqs)}Q", *seqs))
    return body + struct.pack(">I", zlib.crc32(body))


def decode_mark(data: bytes) -> tuple[int, int, frozenset[int]] | None:
    """``(replayed_up_to, next_seq, seqs replayed beyond it)``, or None when ``data`` is
    not a valid mark."""
    if len(data) < MARK.size or zlib.crc32(data[:-4]) != struct.unpack(">I", data[-4:])[0]:
        return None
    magic, replayed_up_to, next_seq, count = MARK_AHEAD.unpack(data[:MARK_AHEAD.size])
    if magic == MARK_MAGIC and len(data) == MARK.size:
        ahead: tuple[int, ...] = ()
    elif magic == MARK_AHEAD_MAGIC and 0 < count <= MAX_AHEAD \
            and len(data) == MARK_AHEAD.size + 8 * count + 4:
        ahead = struct.unpack(f">{count}Q", data[MARK_AHEAD.size:-4])
        if any(b <= a for a, b in itertools.pairwise(ahead)) \
                or ahead[0] <= replayed_up_to or ahead[-1] >= next_seq:
            return None
    else:
        return None
    if replayed_up_to >= next_seq:
        return None
    return replayed_up_to, next_seq, frozenset(ahead)


class Spool:
    """Synchronous, blocking file operations. Not thread-safe: one caller at a time.

    ``fsyncs`` counts the fsync calls made (files and folder), so tests and benchmarks can
    see group commit at work.
    """

    def __init__(self, folder: Path, max_bytes: int = 64 * 1024 * 1024,
                 alarm_ratio: float = 0.8, segment_bytes: int = SEGMENT_BYTES,
                 files: FileOps | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if not 0.0 < alarm_ratio <= 1.0:
            raise ValueError("alarm_ratio must be in (0, 1]")
        if segment_bytes <= 0:
            raise ValueError("segment_bytes must be positive")
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.alarm_ratio = alarm_ratio
        self.segment_bytes = segment_bytes
        self.files = files or FileOps()  # the seam for a failing disk
        self.fsyncs = 0
        self._disk_error = ""
        self._disk_errors = 0
        self._mark_behind = False
        self._cursor: tuple[int, int, int] | None = None  # (next seq, segment first, offset)
        self._open = False
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the segment being appended to, O_APPEND
        self._segments: list[_Segment] = []
        self._replayed_up_to = 0
        self._ahead: frozenset[int] = frozenset()  # replayed beyond _replayed_up_to
        # (replayed_up_to, next_seq, ahead) on disk
        self._mark: tuple[int, int, frozenset[int]] | None = None
        self._next_seq = 1
        self._recovered_torn_bytes = 0
        self._appended_total = 0
        self._replayed_total = 0

    # -- life cycle --------------------------------------------------------------------

    def open(self) -> None:
        """Take the folder, check every segment, cut torn tails, load the mark, and remove
        what a crash in the middle of a compaction left behind."""
        if self._open:
            raise SpoolError("the spool is already open")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                          0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(lock_fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolClosed(f"{self.folder} is in use by another spool") from error
            raise
        try:
            self._recover()
        except BaseException:
            os.close(lock_fd)
            raise
        self._lock_fd = lock_fd
        self._open = True
        self._appended_total = 0
        self._replayed_total = 0
        self._disk_errors = 0

    def _recover(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / MARK_TEMP).unlink()
        replayed_up_to, next_seq, ahead = self._read_mark()
        self._segments = []
        self._recovered_torn_bytes = 0
        previous_last = 0
        for first, path in self._segment_files():
            if first <= previous_last:
                raise SpoolCorrupt(f"{path.name} overlaps the segment before it")
            data = path.read_bytes()
            records, good = decode_records(data, first)
            if good < len(data):
                self._cut(path, good)
                self._recovered_torn_bytes += len(data) - good
            last = records[-1][0] if records else first - 1
            self._segments.append(_Segment(first, path, good, last))
            previous_last = last
        self._replayed_up_to = replayed_up_to
        # Only what a segment still holds (a cut torn tail takes its records with it).
        self._ahead = frozenset(seq for seq in ahead if any(
            segment.first <= seq <= segment.last for segment in self._segments))
        self._next_seq = max(next_seq, previous_last + 1)
        self._compact()

    def _read_mark(self) -> tuple[int, int, frozenset[int]]:
        try:
            data = (self.folder / MARK_NAME).read_bytes()
        except FileNotFoundError:
            self._mark = None
            return 0, 1, frozenset()
        self._mark = decode_mark(data)
        if self._mark is None:
            raise SpoolCorrupt(f"{self.folder / MARK_NAME} is damaged")
        return self._mark

    def _segment_files(self) -> list[tuple[int, Path]]:
        found: list[tuple[int, Path]] = []
        for path in self.folder.iterdir():
            stem, suffix = path.name[:-len(SEGMENT_SUFFIX)], path.name[-len(SEGMENT_SUFFIX):]
            if suffix == SEGMENT_SUFFIX and len(stem) == 12 and stem.isdigit():
                found.append((int(stem), path))
        return sorted(found)

    def _cut(self, path: Path, size: int) -> None:
        """Cut a torn tail off for good, so that later appends do not land behind it."""
        fd = self.files.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            self.files.ftruncate(fd, size)
            self._fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if not self._open:
            return
        if self._mark_behind:
            with contextlib.suppress(OSError):
                self.sync_mark()
        self._close_segment()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self._open = False

    # -- appending ---------------------------------------------------------------------

    def append_many(self, payloads: Sequence[bytes]) -> list[int]:
        """Append the batch durably and return its sequence numbers: one write, one fsync
        (plus one of the folder when a segment file was created). Raises ``SpoolFull``
        when the batch would exceed ``max_bytes`` (nothing written), ``ValueError`` for a
        payload over ``MAX_PAYLOAD`` (nothing written), ``OSError`` when the disk fails
        (the batch must be taken as not written; its sequence numbers are skipped)."""
        self._check_open()
        blobs: list[bytes] = []
        for payload in payloads:
            if not isinstance(payload, bytes | bytearray | memoryview):
                raise TypeError("a spool payload must be bytes")
            blobs.append(bytes(payload))
            if len(blobs[-1]) > MAX_PAYLOAD:
                raise ValueError(f"a spool payload is at most {MAX_PAYLOAD} bytes")
        if not blobs:
            return []
        first = self._next_seq
        data = b"".join(encode_record(first + i, p) for i, p in enumerate(blobs))
        if self._bytes() + len(data) > self.max_bytes:
            raise SpoolFull(f"{len(data)} more bytes would exceed the spool's limit of "
                            f"{self.max_bytes} ({self._bytes()} in use)")
        try:
            segment, fd = self._writable_segment()
            written = 0
            while written < len(data):  # one write, unless the kernel writes it short
                written += self.files.write(fd, data[written:])
            self._fsync(fd)
        except BaseException as error:
            self._next_seq = first + len(blobs)  # possibly on disk: never reuse them
            self._abandon_segment()
            if isinstance(error, OSError):
                self._disk_failed(error)
            raise
        self._disk_error = ""
        segment.size += len(data)
        segment.last = first + len(blobs) - 1
        self._next_seq = first + len(blobs)
        self._appended_total += len(blobs)
        return list(range(first, first + len(blobs)))

    def _writable_segment(self) -> tuple[_Segment, int]:
        """The segment to append to, opening or creating it: the last one, unless it is
        full or the next sequence number would not follow its last record."""
        last = self._segments[-1] if self._segments else None
        if (last is not None and last.size < self.segment_bytes
                and last.last + 1 == self._next_seq):
            if self._fd is None:
                self._fd = self.files.open(last.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            return last, self._fd
        self._close_segment()
        path = self.folder / segment_name(self._next_seq)
        self._fd = self.files.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                                   | os.O_CLOEXEC, 0o600)
        segment = _Segment(self._next_seq, path, 0, self._next_seq - 1)
        self._segments.append(segment)
        self._fsync_folder()  # the new file's name must survive a crash too
        return segment, self._fd

    def _abandon_segment(self) -> None:
        """After a failed write or fsync: cut the segment being appended to back to what
        is known to be good (if the disk lets us), close it and never write to it again
        (the caller skips the batch's numbers). A segment left empty is removed, so that
        a full disk refusing event after event does not leave an empty file per attempt
        (nothing in it was acknowledged)."""
        last = self._segments[-1] if self._segments else None
        if last is not None and self._fd is not None:
            with contextlib.suppress(OSError):
                self.files.ftruncate(self._fd, last.size)
                self._fsync(self._fd)
        with contextlib.suppress(OSError):
            self._close_segment()
        if last is not None and last.size == 0:
            with contextlib.suppress(OSError):
                self.files.unlink(last.path)
                self._segments.remove(last)
                self._fsync_folder()

    def _disk_failed(self, error: OSError) -> None:
        self._disk_errors += 1
        name = errno.errorcode.get(error.errno or 0, "error")
        self._disk_error = f"{name}: {error.strerror or error}"

    def _close_segment(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    # -- reading and replay ------------------------------------------------------------

    def pending(self, limit: int | None = None) -> list[tuple[int, bytes]]:
        """``(seq, payload)`` of the records not yet replayed (the first ``limit`` of them),
        in order, read from disk and checked again. A read that goes on where the last
        one stopped (the replay's next chunk) starts at that place in its segment instead
        of at the segment's start."""
        self._check_open()
        found: list[tuple[int, bytes]] = []
        for segment in self._segments:
            if segment.last <= self._replayed_up_to:
                continue
            wanted = None if limit is None else limit - len(found)
            if wanted is not None and wanted <= 0:
                break
            seq, offset = segment.first, 0
            cursor = self._cursor
            if (cursor is not None and cursor[1] == segment.first
                    and segment.first <= cursor[0] <= self._replayed_up_to + 1):
                seq, offset = cursor[0], cursor[2]
            with segment.path.open("rb") as file:
                file.seek(offset)
                data = file.read(segment.size - offset)
            cap = None if wanted is None else (
                wanted + max(0, self._replayed_up_to + 1 - seq) + len(self._ahead))
            records, good = decode_records(data, seq, limit=cap)
            read_up_to = records[-1][0] if records else seq - 1
            cut_short = cap is not None and len(records) == cap
            if ((read_up_to != segment.last and not cut_short)
                    or (read_up_to == segment.last and offset + good != segment.size)):
                raise SpoolCorrupt(f"{segment.path.name} changed after it was checked")
            if records:
                self._cursor = (records[-1][0] + 1, segment.first, offset + good)
            found.extend(r for r in records
                         if r[0] > self._replayed_up_to and r[0] not in self._ahead)
        return found if limit is None else found[:limit]

    def replayed(self, up_to: int, ahead: Sequence[int] = ()) -> None:
        """Durably mark every record up to ``up_to`` as done, and the records ``ahead``
        (beyond it) too, then compact."""
        self._check_open()
        if up_to >= self._next_seq or any(seq >= self._next_seq for seq in ahead):
            raise ValueError(f"cannot mark {max([up_to, *ahead])} replayed: nothing past "
                             f"{self._next_seq - 1} was appended")
        up_to = max(up_to, self._replayed_up_to)
        beyond = sorted(seq for seq in self._ahead.union(ahead) if seq > up_to)
        # Seqs ahead that now follow the mark without a gap move it on.
        while beyond and beyond[0] == up_to + 1:
            up_to = beyond.pop(0)
        kept = frozenset(beyond[:MAX_AHEAD])
        if up_to == self._replayed_up_to and kept == self._ahead:
            if self._mark_behind:
                self.sync_mark()
            return
        before = self._pending_count()
        try:
            self._write_mark(up_to, self._next_seq, kept)
        except OSError as error:
            # The disk refuses the mark: the replay goes on from the mark kept here (never
            # the same records twice in this run), and what is replayed is still removed,
            # which frees the space the mark needs. The caller hears of it (a warning);
            # the mark is written again at the next call.
            self._disk_failed(error)
            self._replayed_up_to = up_to
            self._ahead = kept
            self._mark_behind = True
            self._replayed_total += before - self._pending_count()
            self._compact()
            raise
        self._replayed_total += before - self._pending_count()
        self._compact()

    def sync_mark(self) -> None:
        """Write the mark when it is behind the replay's progress (after a full disk)."""
        self._check_open()
        if self._mark_behind:
            try:
                self._write_mark(self._replayed_up_to, self._next_seq, self._ahead)
            except OSError as error:
                self._disk_failed(error)
                raise

    def _write_mark(self, replayed_up_to: int, next_seq: int,
                    ahead: frozenset[int] = frozenset()) -> None:
        temp = self.folder / MARK_TEMP
        try:
            fd = self.files.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                 0o600)
            try:
                data = encode_mark(replayed_up_to, next_seq, tuple(ahead))
                written = 0
                while written < len(data):
                    written += self.files.write(fd, data[written:])
                self._fsync(fd)
            finally:
                os.close(fd)
            self.files.replace(temp, self.folder / MARK_NAME)
            self._fsync_folder()  # the new mark must be durable before any segment goes
        except OSError:
            with contextlib.suppress(OSError):
                self.files.unlink(temp)  # a half-written temporary mark takes space too
            raise
        self._mark = (replayed_up_to, next_seq, ahead)
        self._replayed_up_to = replayed_up_to
        self._ahead = ahead
        self._mark_behind = False
        self._disk_error = ""

    def _compact(self) -> None:
        """Remove the segment files that hold nothing pending: all of them once everything
        is replayed (later appends start a fresh segment), else the full ones before the
        one being appended to. Oldest first, so a crash leaves a contiguous tail."""
        if not self._segments:
            return
        if self._pending_count() == 0:
            self._close_segment()
            doomed = list(self._segments)
            if self._mark != (self._next_seq - 1, self._next_seq, frozenset()):
                # The mark on disk must carry the next seq before the segments that show it
                # go (it is stale after skipped seqs or an empty segment left by a crash).
                try:
                    self._write_mark(self._next_seq - 1, self._next_seq)
                except OSError as error:
                    # A full disk: the segments go all the same (everything in them is
                    # replayed; their space is what the mark needs). A restart then
                    # numbers from the old mark's next seq, which no file holds any more.
                    self._disk_failed(error)
                    self._replayed_up_to = self._next_seq - 1
                    self._ahead = frozenset()
                    self._mark_behind = True
        else:
            doomed = [s for s in self._segments[:-1] if s.last <= self._replayed_up_to]
        if not doomed:
            return
        for segment in doomed:
            self.files.unlink(segment.path)
            self._segments.remove(segment)
        with contextlib.suppress(OSError):
            self._fsync_folder()

    # -- state -------------------------------------------------------------------------

    def state(self) -> SpoolState:
        used = self._bytes()
        return SpoolState(
            pending=self._pending_count(),
            bytes=used,
            limit=self.max_bytes,
            alarm=used >= self.alarm_ratio * self.max_bytes or bool(self._disk_error),
            recovered_torn_bytes=self._recovered_torn_bytes,
            appended_total=self._appended_total,
            replayed_total=self._replayed_total,
            disk_error=self._disk_error,
            disk_errors=self._disk_errors,
            mark_behind=self._mark_behind,
        )

    def _pending_count(self) -> int:
        return sum(max(0, s.last - max(s.first - 1, self._replayed_up_to))
                   for s in self._segments) - len(self._ahead)

    def _bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def _check_open(self) -> None:
        if not self._open:
            raise SpoolClosed("the spool is not open")

    def _fsync(self, fd: int) -> None:
        self.fsyncs += 1
        self.files.fsync(fd)

    def _fsync_folder(self) -> None:
        fd = self.files.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)


class _Batch:
    """Appends waiting for the same ``append_many``."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.waiting: list[Deferred[int]] = []


_Work = tuple[Callable[[], Any], Deferred[Any]] | _Batch


class AsyncSpool:
    """The reactor's face of a Spool: every file operation runs in ONE dedicated worker
    thread, so the reactor never blocks on fsync, and in the order the calls were made.

    Appends that arrive while an earlier operation runs (or in the same reactor turn) are
    batched into one ``append_many``: one fsync for the lot (group commit). When a batch
    does not fit, the appends that fit (in order) are written and the rest fail with
    ``SpoolFull``, so one burst does not refuse events the spool has room for.
    """

    def __init__(self, spool: Spool, reactor: Any) -> None:
        self._spool = spool
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._queue: deque[_Work] = deque()
        self._busy = False
        self._scheduled = False
        self._accepting = False
        self._stopping: OneShotObserver[None] | None = None  # every caller of stop()
        self._shutdown_trigger: Any = None
        self._state = SpoolState(0, 0, spool.max_bytes, False, 0, 0, 0)

    def start(self) -> Deferred[None]:
        """Start the thread and open the spool in it (recovery reads the whole spool)."""
        if self._pool is not None:
            return fail(SpoolError("the AsyncSpool was already started"))
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="dpvoip-spool")
        self._pool.start()
        self._accepting = True
        # Should the reactor stop without stop() being called, still write what is queued
        # and let the thread go, or the process would hang on it ("before": the only phase
        # whose Deferreds the reactor waits for). An owner that stops the spool itself
        # after its last use says so (``stopped_by_owner``).
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "before", "shutdown", self.stop)
        opened: Deferred[None] = self._submit(self._spool.open)

        def failed(failure: Failure) -> Failure:
            self._accepting = False
            self._remove_trigger()
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.stop()
            queued, self._queue = list(self._queue), deque()
            for work in queued:
                for waiting in work.waiting if isinstance(work, _Batch) else [work[1]]:
                    waiting.errback(SpoolClosed("the spool could not be opened"))
            return failure

        opened.addErrback(failed)
        return opened

    def append(self, payload: bytes) -> Deferred[int]:
        """Fires with the record's sequence number once it is fsynced; fails with
        ``SpoolFull``, ``ValueError`` (too big) or the ``OSError`` of the disk."""
        if not self._accepting:
            return fail(SpoolClosed("the AsyncSpool is not running"))
        # Checked here, so that one bad payload fails alone and not the batch it joins.
        if not isinstance(payload, bytes | bytearray | memoryview):
            return fail(TypeError("a spool payload must be bytes"))
        payload = bytes(payload)
        if len(payload) > MAX_PAYLOAD:
            return fail(ValueError(f"a spool payload is at most {MAX_PAYLOAD} bytes"))
        tail = self._queue[-1] if self._queue else None
        if not isinstance(tail, _Batch):
            tail = _Batch()
            self._queue.append(tail)
        done: Deferred[int] = Deferred()
        tail.payloads.append(payload)
        tail.waiting.append(done)
        self._schedule()
        return done

    @property
    def spool(self) -> Spool:
        """The spool this drives (its ``files`` is the seam for a failing disk)."""
        return self._spool

    def replayed(self, up_to: int, ahead: Sequence[int] = ()) -> Deferred[None]:
        return self._submit(lambda: self._spool.replayed(up_to, ahead))

    def sync_mark(self) -> Deferred[None]:
        return self._submit(self._spool.sync_mark)

    def pending(self, limit: int | None = None) -> Deferred[list[tuple[int, bytes]]]:
        return self._submit(lambda: self._spool.pending(limit))

    def state(self) -> SpoolState:
        """The state after the last finished operation: cheap, no I/O."""
        return self._state

    def stopped_by_owner(self) -> None:
        """The service that owns the spool stops it itself, after its last use (the
        replay's last mark): no shutdown trigger of the spool's own, which would close it
        alongside the services' stop, before the owner is done with it."""
        self._remove_trigger()

    def stop(self) -> Deferred[None]:
        """Refuse new work, finish what is queued, close the spool, stop the thread."""
        if self._stopping is not None:
            return self._stopping.when_fired()
        if self._pool is None:
            return succeed(None)
        self._accepting = False
        self._remove_trigger()
        pool = self._pool
        closed: Deferred[None] = Deferred()
        self._queue.append((self._spool.close, closed))
        self._schedule()

        def stopped(result: object) -> object:
            pool.stop()  # the thread is idle now: this join is short
            return result

        stopping = self._stopping = OneShotObserver()
        closed.addBoth(stopped).addBoth(stopping.fire)
        return stopping.when_fired()

    def _submit(self, call: Callable[[], T]) -> Deferred[T]:
        if not self._accepting:
            return fail(SpoolClosed("the AsyncSpool is not running"))
        done: Deferred[T] = Deferred()
        self._queue.append((call, done))
        self._schedule()
        return done

    def _schedule(self) -> None:
        """Run the queue's head at the end of this reactor turn, so that all the appends
        made in the turn go in one batch."""
        if not self._busy and not self._scheduled and self._queue:
            self._scheduled = True
            self._reactor.callLater(0, self._run_next)

    def _run_next(self) -> None:
        self._scheduled = False
        if self._busy or not self._queue or self._pool is None:
            return
        work = self._queue.popleft()
        self._busy = True
        if isinstance(work, _Batch):
            batch = work
            running: Deferred[Any] = threads.deferToThreadPool(
                self._reactor, self._pool, self._in_thread, self._append_fitting,
                batch.payloads)
            running.addCallbacks(lambda result: self._appended(batch, result),
                                 lambda failure: self._fail_batch(batch, failure))
        else:
            call, done = work
            running = threads.deferToThreadPool(self._reactor, self._pool,
                                                self._in_thread, call)
            running.addCallbacks(lambda result: self._finished(done, result),
                                 lambda failure: self._finished_badly(done, failure))
        running.addBoth(self._next)

    def _in_thread(self, call: Callable[..., T], *args: Any) -> tuple[T, SpoolState]:
        result = call(*args)
        return result, self._spool.state()

    def _append_fitting(self, payloads: list[bytes]) -> list[int]:
        """Append the longest prefix of the batch that fits (in the worker thread)."""
        room = self._spool.max_bytes - self._spool.state().bytes
        fitting = 0
        for payload in payloads:
            room -= record_size(payload)
            if room < 0:
                break
            fitting += 1
        return self._spool.append_many(payloads[:fitting]) if fitting else []

    def _appended(self, batch: _Batch, result: tuple[list[int], SpoolState]) -> None:
        seqs, self._state = result
        for index, done in enumerate(batch.waiting):
            if index < len(seqs):
                done.callback(seqs[index])
            else:
                done.errback(SpoolFull(f"the spool is full ({self._state.bytes} of "
                                       f"{self._state.limit} bytes)"))

    def _fail_batch(self, batch: _Batch, failure: Failure) -> None:
        self._refresh_state()
        for done in batch.waiting:
            done.errback(failure)

    def _finished(self, done: Deferred[Any], result: tuple[Any, SpoolState]) -> None:
        value, self._state = result
        done.callback(value)

    def _finished_badly(self, done: Deferred[Any], failure: Failure) -> None:
        self._refresh_state()
        done.errback(failure)

    def _refresh_state(self) -> None:
        """After a failure: the state as it is now. Reading the counters from the reactor
        thread is safe here, because the worker is idle until the next item starts."""
        with contextlib.suppress(Exception):
            self._state = self._spool.state()

    def _next(self, _: object) -> None:
        self._busy = False
        self._schedule_now()

    def _schedule_now(self) -> None:
        """Start the next item at once: appends that queued up meanwhile are a batch."""
        if self._queue and not self._scheduled:
            self._run_next()

    def _remove_trigger(self) -> None:
        if self._shutdown_trigger is not None:
            with contextlib.suppress(ValueError):
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None

