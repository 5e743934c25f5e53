"""The spool keeps what it acknowledged: across reopen, torn tails, SIGKILL, a full bound,
failing disks and compaction, and its asynchronous face batches fsyncs off the reactor.

* Plain tests drive ``Spool`` on pytest's ``tmp_path`` (real files, real fsync).
* The crash test runs a child process that appends and prints what it was acknowledged,
  kills it with SIGKILL after a random number of acknowledgements, and reopens the spool
  in the parent.
* ``AsyncSpool`` runs with the real reactor under trial; ``timeout`` only detects hangs,
  and a slow fsync is one the test holds open, not one that sleeps.
* A hypothesis test runs random appends, replays and reopens against an in-memory model.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from dpvoip.spool import journal as spool_module
from dpvoip.spool.journal import (
    HEADER,
    MAGIC,
    MARK_NAME,
    MARK_TEMP,
    AsyncSpool,
    Spool,
    SpoolClosed,
    SpoolCorrupt,
    SpoolFull,
    SpoolState,
    decode_records,
    record_size,
    segment_name,
)

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def opened(folder: Path, **options: Any) -> Iterator[Spool]:
    spool = Spool(folder, **options)
    spool.open()
    try:
        yield spool
    finally:
        spool.close()


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.seg"))


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in segments(folder))


# -- round trips ---------------------------------------------------------------------------


def test_append_pending_replayed_round_trip(tmp_path: Path) -> None:
    with opened(tmp_path / "spool") as spool:
        assert spool.append_many([b"one", b"two"]) == [1, 2]
        assert spool.append_many([b"three"]) == [3]
        assert spool.append_many([]) == []
        assert spool.pending() == [(1, b"one"), (2, b"two"), (3, b"three")]
        spool.replayed(2)
        assert spool.pending() == [(3, b"three")]
        state = spool.state()
        assert (state.pending, state.appended_total, state.replayed_total) == (1, 3, 2)
        assert state.bytes == disk_bytes(tmp_path / "spool") > 0
        fsyncs = spool.fsyncs
        spool.replayed(1)  # behind the mark: nothing to do, no I/O
        assert spool.fsyncs == fsyncs
        assert spool.pending() == [(3, b"three")]


def test_folder_and_files_are_private(tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "spool"
    with opened(folder) as spool:
        spool.append_many([b"secret caller number"])
        spool.replayed(0)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())


def test_reopen_returns_the_same_pending_records_in_order(tmp_path: Path) -> None:
    payloads = [bytes([i]) * i for i in range(1, 40)]
    with opened(tmp_path, segment_bytes=200) as spool:
        for start in range(0, len(payloads), 5):
            spool.append_many(payloads[start:start + 5])
        before = spool.pending()
    assert len(segments(tmp_path)) > 1  # rolled over
    with opened(tmp_path, segment_bytes=200) as spool:
        assert spool.pending() == before == list(enumerate(payloads, start=1))
        assert spool.state().recovered_torn_bytes == 0


def test_sequence_numbers_increase_across_reopen_and_compaction(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        assert spool.append_many([b"a", b"b"]) == [1, 2]
    with opened(tmp_path) as spool:
        assert spool.append_many([b"c"]) == [3]
        spool.replayed(3)  # everything replayed: compacted
        assert segments(tmp_path) == []
        assert spool.state().bytes == 0
        assert spool.append_many([b"d"]) == [4]
        assert segments(tmp_path)[0].name == segment_name(4)
        spool.replayed(4)
    with opened(tmp_path) as spool:
        assert spool.pending() == []
        assert spool.append_many([b"e"]) == [5]
    with opened(tmp_path) as spool:
        assert spool.pending() == [(5, b"e")]


def test_replayed_frees_full_segments_before_everything_is_replayed(tmp_path: Path) -> None:
    with opened(tmp_path, segment_bytes=100) as spool:
        for i in range(10):
            spool.append_many([b"x" * 40, b"y" * 40])  # one segment each
            assert len(segments(tmp_path)) == i + 1
        spool.replayed(15)
        assert [p.name for p in segments(tmp_path)] == [segment_name(15), segment_name(17),
                                                         segment_name(19)]
        assert [seq for seq, _ in spool.pending()] == [16, 17, 18, 19, 20]
        assert spool.state().bytes == disk_bytes(tmp_path)


def test_replayed_refuses_a_mark_past_what_was_appended(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"a"])
        with pytest.raises(ValueError, match="nothing past 1"):
            spool.replayed(2)
        assert spool.pending() == [(1, b"a")]


def test_payload_limits_and_types(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        with pytest.raises(ValueError):
            spool.append_many([b"ok", b"x" * (spool_module.MAX_PAYLOAD + 1)])
        with pytest.raises(TypeError):
            spool.append_many(["text"])  # type: ignore[list-item]
        assert spool.pending() == []
        assert spool.append_many([b"x" * spool_module.MAX_PAYLOAD, b"b"]) == [1, 2]
        assert spool.pending()[1] == (2, b"b")


def test_a_closed_spool_refuses_and_a_second_opener_is_locked_out(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(SpoolClosed):
        spool.append_many([b"a"])
    spool.open()
    with pytest.raises(SpoolClosed, match="in use"):
        Spool(tmp_path).open()
    spool.close()
    spool.close()  # twice is harmless
    with opened(tmp_path):
        pass


# -- torn and corrupt tails ----------------------------------------------------------------


def test_torn_last_record_at_every_offset_is_cut_and_appending_goes_on(tmp_path: Path) -> None:
    source = tmp_path / "source"
    with opened(source) as spool:
        spool.append_many([b"first record"])
        spool.append_many([b"second"])
        spool.append_many([b"the third and last record, torn below"])
    [segment] = segments(source)
    whole = segment.read_bytes()
    last_start = len(whole) - record_size(b"the third and last record, torn below")
    tails = [b"", b"\x00" * 7, b"\xff\xfegarbage",
             HEADER.pack(MAGIC, 3, 100, 0) + b"plausible header, short body"]
    cases = 0
    for cut in range(last_start, len(whole)):
        for tail in tails:
            folder = tmp_path / f"case-{cut}-{len(tail)}"
            folder.mkdir()
            (folder / segment.name).write_bytes(whole[:cut] + tail)
            with opened(folder) as spool:
                assert spool.pending() == [(1, b"first record"), (2, b"second")]
                assert spool.state().recovered_torn_bytes == cut - last_start + len(tail)
                assert spool.append_many([b"after the crash"]) == [3]
            with opened(folder) as spool:
                assert spool.pending() == [(1, b"first record"), (2, b"second"),
                                           (3, b"after the crash")]
                assert spool.state().recovered_torn_bytes == 0
            cases += 1
    assert cases == (len(whole) - last_start) * len(tails)


def test_garbage_after_an_intact_last_record_is_cut(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"a", b"b"])
    [segment] = segments(tmp_path)
    with segment.open("ab") as file:
        file.write(b"\x00" * 4096)  # delayed allocation after a power cut
    with opened(tmp_path) as spool:
        assert spool.pending() == [(1, b"a"), (2, b"b")]
        assert spool.state().recovered_torn_bytes == 4096
        assert spool.append_many([b"c"]) == [3]


def test_a_corrupt_middle_record_cuts_it_and_the_rest_of_its_segment_only(
        tmp_path: Path) -> None:
    """Records are found by the length of the one before, so nothing after a bad record in
    the same segment can be trusted; later segments are kept (with a gap in the seqs)."""
    payloads = [b"record-%d" % i for i in range(1, 6)]
    with opened(tmp_path, segment_bytes=10_000) as spool:
        spool.append_many(payloads)  # 1..5 in the first segment
    with opened(tmp_path, segment_bytes=10) as spool:
        spool.append_many([b"later segment"])  # 6 in a second one
    first = segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    third = 2 * record_size(payloads[0])
    data[third + HEADER.size] ^= 0x01  # a flipped bit in record 3's payload: crc fails
    first.write_bytes(bytes(data))
    with opened(tmp_path, segment_bytes=10) as spool:
        assert spool.pending() == [(1, payloads[0]), (2, payloads[1]),
                                   (6, b"later segment")]
        assert spool.state().recovered_torn_bytes == 3 * record_size(payloads[0])
        assert spool.append_many([b"goes on"]) == [7]
    with opened(tmp_path) as spool:
        assert [seq for seq, _ in spool.pending()] == [1, 2, 6, 7]


def test_a_record_with_an_unexpected_seq_is_not_intact(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"a", b"b"])
    [segment] = segments(tmp_path)
    data = segment.read_bytes()
    # A record that checks out by itself but is not the expected seq 3.
    segment.write_bytes(data + spool_module.encode_record(9, b"stray"))
    assert decode_records(data, 1)[1] == len(data)
    with opened(tmp_path) as spool:
        assert spool.pending() == [(1, b"a"), (2, b"b")]
        assert spool.state().recovered_torn_bytes == record_size(b"stray")


def test_bytes_changed_after_open_are_refused_loudly(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"abc"])
        [segment] = segments(tmp_path)
        data = bytearray(segment.read_bytes())
        data[-1] ^= 0xFF
        segment.write_bytes(bytes(data))
        with pytest.raises(SpoolCorrupt):
            spool.pending()


def test_overlapping_segments_are_refused_not_guessed(tmp_path: Path) -> None:
    with opened(tmp_path, segment_bytes=10) as spool:
        spool.append_many([b"a", b"b"])
        spool.append_many([b"c"])
    (tmp_path / segment_name(2)).write_bytes(spool_module.encode_record(2, b"B"))
    with pytest.raises(SpoolCorrupt, match="overlaps"):
        Spool(tmp_path).open()


# -- durability order ----------------------------------------------------------------------


def record_syscalls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Log the calls whose order makes the spool durable: write, fsync of a file or of the
    folder, rename, unlink."""
    log: list[str] = []
    real_write, real_fsync, real_replace, real_unlink = os.write, os.fsync, os.replace, \
        os.unlink

    def write(fd: int, data: bytes) -> int:
        log.append("write")
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        log.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(source: Any, target: Any) -> None:
        log.append("rename")
        real_replace(source, target)

    def unlink(path: Any, **options: Any) -> None:
        log.append("unlink")
        real_unlink(path, **options)

    for name, fake in [("write", write), ("fsync", fsync), ("replace", replace),
                       ("unlink", unlink)]:
        monkeypatch.setattr(os, name, fake)
    return log


def test_appends_are_written_then_fsynced_with_the_new_segment_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with opened(tmp_path, segment_bytes=100) as spool:
        log = record_syscalls(monkeypatch)
        spool.append_many([b"a" * 50])  # a new segment: its name made durable first
        assert log == ["fsync folder", "write", "fsync file"]
        log.clear()
        spool.append_many([b"b" * 30, b"c" * 30])  # the same segment, now over 100 bytes
        assert log == ["write", "fsync file"]
        log.clear()
        spool.append_many([b"d"])  # the last one is full: another
        assert log == ["fsync folder", "write", "fsync file"]
        assert [p.name for p in segments(tmp_path)] == [segment_name(1), segment_name(4)]


def test_the_mark_is_durable_before_any_segment_is_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with opened(tmp_path, segment_bytes=10) as spool:
        spool.append_many([b"a"])
        spool.append_many([b"b"])
        log = record_syscalls(monkeypatch)
        spool.replayed(1)
        assert log == ["write", "fsync file", "rename", "fsync folder", "unlink",
                       "fsync folder"]
        log.clear()
        spool.replayed(2)
        assert log == ["write", "fsync file", "rename", "fsync folder", "unlink",
                       "fsync folder"]


# -- the replay mark -----------------------------------------------------------------------


def test_the_mark_survives_reopen_and_a_leftover_temp_file_is_ignored(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"a", b"b", b"c"])
        spool.replayed(2)
    (tmp_path / MARK_TEMP).write_bytes(b"half a mark")  # a crash in the middle of writing
    with opened(tmp_path) as spool:
        assert spool.pending() == [(3, b"c")]
        assert spool.state().pending == 1
        assert not (tmp_path / MARK_TEMP).exists()
        spool.replayed(3)
    (tmp_path / MARK_TEMP).write_bytes(spool_module.encode_mark(0, 1))  # stale, valid
    with opened(tmp_path) as spool:
        assert spool.pending() == []
        assert spool.append_many([b"d"]) == [4]


def test_a_damaged_mark_is_refused_not_guessed(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"a"])
        spool.replayed(1)
    mark = tmp_path / MARK_NAME
    data = bytearray(mark.read_bytes())
    data[6] ^= 0x10
    mark.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt, match="mark"):
        Spool(tmp_path).open()
    with pytest.raises(SpoolCorrupt):  # the lock was let go: the refusal repeats
        Spool(tmp_path).open()


def test_a_crash_between_mark_and_compaction_leaves_nothing_to_replay(tmp_path: Path) -> None:
    with opened(tmp_path, segment_bytes=50) as spool:
        for _ in range(4):
            spool.append_many([b"z" * 40])
        kept = {p.name: p.read_bytes() for p in segments(tmp_path)}
        spool.replayed(4)
    for name, data in list(kept.items())[1:]:  # the oldest went, the others did not
        (tmp_path / name).write_bytes(data)
    with opened(tmp_path, segment_bytes=50) as spool:
        assert spool.pending() == []
        assert segments(tmp_path) == []
        assert spool.append_many([b"next"]) == [5]


def test_an_empty_segment_left_by_a_crash_keeps_its_seq_from_reuse(tmp_path: Path) -> None:
    """A crash after a segment file was created (named by the next seq, after seqs 4 and 5
    were skipped by a failed write) and before anything was written to it."""
    (tmp_path / MARK_NAME).write_bytes(spool_module.encode_mark(3, 4))
    (tmp_path / segment_name(6)).write_bytes(b"")
    with opened(tmp_path) as spool:
        assert spool.pending() == []
        assert segments(tmp_path) == []
    with opened(tmp_path) as spool:
        assert spool.append_many([b"a"]) == [6]


# -- the bound -----------------------------------------------------------------------------


def test_spool_full_writes_nothing_alarm_flips_and_replay_frees_space(tmp_path: Path) -> None:
    size = record_size(b"x" * 82)  # 100 bytes a record
    with opened(tmp_path, max_bytes=10 * size, alarm_ratio=0.5) as spool:
        for n in range(1, 11):
            spool.append_many([b"x" * 82])
            state = spool.state()
            assert state.bytes == n * size == disk_bytes(tmp_path)
            assert state.alarm is (n >= 5)
            assert state.limit == 10 * size
        with pytest.raises(SpoolFull):
            spool.append_many([b""])
        spool.replayed(9)
        assert spool.state().bytes == 10 * size  # still in the active segment
        with pytest.raises(SpoolFull):
            spool.append_many([b"y"])
        spool.replayed(10)
        assert spool.state() == SpoolState(0, 0, 10 * size, False, 0, 10, 10)
        assert spool.append_many([b"x" * 82] * 4) == [11, 12, 13, 14]
        with pytest.raises(SpoolFull):  # would fit partly: nothing of it is written
            spool.append_many([b"x" * 82] * 7)
        assert disk_bytes(tmp_path) == 4 * size
        assert [seq for seq, _ in spool.pending()] == [11, 12, 13, 14]
        assert spool.append_many([b"x" * 82] * 6) == list(range(15, 21))
    with opened(tmp_path, max_bytes=10 * size) as spool:
        assert len(spool.pending()) == 10
        assert spool.state().alarm


# -- a failing disk ------------------------------------------------------------------------


def fail_once(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Make ``os.<name>`` fail once with ENOSPC/EIO, then behave again."""
    real: Callable[..., Any] = getattr(os, name)
    calls: list[int] = []

    def failing(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            if name == "write":
                real(args[0], args[1][:7])  # a partial write before the failure
            raise OSError(errno.ENOSPC if name == "write" else errno.EIO, name)
        return real(*args)

    monkeypatch.setattr(os, name, failing)  # the os module dpvoip.spool calls
    return calls


@pytest.mark.parametrize("call", ["write", "fsync"])
def test_a_failed_write_or_fsync_is_not_acknowledged_and_nothing_later_is_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str) -> None:
    with opened(tmp_path) as spool:
        assert spool.append_many([b"before"]) == [1]
        fail_once(monkeypatch, call)
        with pytest.raises(OSError):
            spool.append_many([b"lost", b"lost too"])
        monkeypatch.undo()
        assert spool.append_many([b"after"]) == [4]  # 2 and 3 are never reused
        assert spool.pending() == [(1, b"before"), (4, b"after")]
        assert spool.state().bytes == disk_bytes(tmp_path)
    with opened(tmp_path) as spool:
        assert spool.pending() == [(1, b"before"), (4, b"after")]
        assert spool.state().recovered_torn_bytes == 0
        spool.replayed(4)
        assert segments(tmp_path) == []
    with opened(tmp_path) as spool:
        assert spool.append_many([b"later"]) == [5]


# -- SIGKILL -------------------------------------------------------------------------------

CHILD = r"""
import sys
from pathlib import Path
from dpvoip.spool.journal import Spool

folder, tag = Path(sys.argv[1]), sys.argv[2]
spool = Spool(folder, segment_bytes=2048)
spool.open()
acked = []
n = 0
while True:
    n += 1
    payloads = [b"%s-%d-%d" % (tag.encode(), n, i) * (1 + (n * 7 + i) % 9)
                for i in range(1 + n % 4)]
    seqs = spool.append_many(payloads)
    for seq, payload in zip(seqs, payloads):
        print("A", seq, payload.decode(), flush=True)
    acked.extend(seqs)
    if n % 10 == 0 and len(acked) > 3:
        mark = acked[-1] if n % 20 == 0 else acked[-3]
        print("r", mark, flush=True)
        spool.replayed(mark)
        print("R", mark, flush=True)
"""


def test_sigkill_while_appending_never_loses_an_acknowledged_record(tmp_path: Path) -> None:
    rng = random.Random(7)
    acked: dict[int, bytes] = {}
    mark_low = 0  # a replay mark the child saw written
    mark_high = 0  # a mark the child may have been writing when it was killed
    for round_number in range(ROUNDS):
        lines = run_child_until_killed(tmp_path, f"round{round_number}", rng)
        for line in lines:
            kind, value, *rest = line.split(" ")
            if kind == "A":
                seq = int(value)
                assert seq not in acked and all(seq > s for s in acked)
                acked[seq] = rest[0].encode()
            elif kind == "r":
                mark_high = int(value)
            elif kind == "R":
                mark_low = mark_high = int(value)
        with opened(tmp_path) as spool:
            pending = spool.pending()
        seqs = [seq for seq, _ in pending]
        assert seqs == sorted(set(seqs)), "out of order or duplicated"
        assert all(seq > mark_low for seq in seqs)
        found = dict(pending)
        for seq, payload in acked.items():
            if seq > mark_high:
                assert found.get(seq) == payload, f"acknowledged record {seq} lost"
        between = [seq in found for seq in acked if mark_low < seq <= mark_high]
        assert all(between) or not any(between)  # the mark is the old one or the new one
    assert len(acked) >= ROUNDS * FEWEST_ACKS  # every round ran until its kill


#: Rounds of append-and-kill, and how many acknowledgements a round reads, at the fewest
#: and the most, before it kills the child.
ROUNDS = 5
FEWEST_ACKS = 20
MOST_ACKS = 400
#: A child that prints nothing for this long is hung (a hang detector, not a speed bound).
HUNG_SECONDS = 120


def run_child_until_killed(folder: Path, tag: str, rng: random.Random) -> list[str]:
    """Start the child, read its acknowledgements until a random number of them arrived,
    SIGKILL it, and return every complete line it printed (it prints a line only after
    what it reports returned).

    The kill follows what the child *did*, not how long it ran: a busy machine slows the
    child and the reading alike, and the round still sees as many acknowledgements."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), tag], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE)
    watchdog = threading.Timer(HUNG_SECONDS, child.kill)
    watchdog.start()
    assert child.stdout is not None
    try:
        wanted = rng.randrange(FEWEST_ACKS, MOST_ACKS)
        read: list[bytes] = []
        seen = 0
        while seen < wanted and (line := child.stdout.readline()):
            read.append(line)
            seen += line.startswith(b"A ")
        time.sleep(rng.random() * 0.01)  # the kill lands anywhere in an append or a mark
        child.send_signal(signal.SIGKILL)
        read.append(child.stdout.read())  # what it printed before it died
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
    assert seen == wanted, "the child died (or hung) before it was killed"
    assert child.returncode == -signal.SIGKILL, "the child died before it was killed"
    return b"".join(read).decode().split("\n")[:-1]  # the last piece: unfinished, or empty


# -- AsyncSpool ----------------------------------------------------------------------------


class AsyncSpoolTests(TestCase):
    """The real reactor, a real worker thread, real files."""

    timeout = 120  # a hang detector: each test takes well under a second idle

    def setUp(self) -> None:
        temp = tempfile.TemporaryDirectory()
        self.addCleanup(temp.cleanup)  # after the stop() cleanups added later: LIFO
        self.folder = Path(temp.name) / "spool"

    def make(self, **options: Any) -> tuple[Spool, AsyncSpool]:
        spool = Spool(self.folder, **options)
        front = AsyncSpool(spool, reactor)
        self.addCleanup(front.stop)
        return spool, front

    async def test_appends_in_one_turn_share_one_fsync(self) -> None:
        spool, front = self.make()
        await front.start()
        assert await front.append(b"warm up: the segment file exists") == 1
        await deferLater(reactor, 0, lambda: None)  # a fresh turn, the worker idle
        before = spool.fsyncs
        seqs = await gatherResults([front.append(b"event %d" % i) for i in range(50)])
        assert spool.fsyncs == before + 1
        assert seqs == list(range(2, 52))
        assert front.state().pending == 51
        assert front.state().appended_total == 51

    async def test_appends_during_an_fsync_are_batched_and_the_reactor_runs(self) -> None:
        spool, front = self.make()
        await front.start()
        await front.append(b"warm up")
        real_fsync = os.fsync
        in_fsync: Deferred[None] = Deferred()
        release = threading.Event()
        held: list[int] = []  # only the first fsync waits, for as long as the test says

        def held_fsync(fd: int) -> None:
            if not held:
                held.append(fd)
                cast(IReactorFromThreads, reactor).callFromThread(in_fsync.callback, None)
                release.wait(HUNG_SECONDS)
            real_fsync(fd)

        setattr(os, "fsync", held_fsync)  # noqa: B010 - the worker thread calls it
        self.addCleanup(setattr, os, "fsync", real_fsync)
        self.addCleanup(release.set)  # never leave the worker thread waiting
        before = spool.fsyncs
        first = front.append(b"first")
        await in_fsync  # the worker is inside the fsync now, and stays there
        await deferLater(reactor, 0.05, lambda: None)  # a timed call: the reactor runs
        assert not first.called  # while the fsync still blocks the worker
        later = [front.append(b"later %d" % i) for i in range(20)]
        await deferLater(reactor, 0, lambda: None)
        assert not any(d.called for d in later)  # queued behind the running fsync
        release.set()
        results = await gatherResults([first, *later])
        assert results == list(range(2, 23))
        assert spool.fsyncs == before + 2  # the first alone, the twenty together

    async def test_spool_full_fails_only_what_does_not_fit(self) -> None:
        size = record_size(b"x" * 82)
        _, front = self.make(max_bytes=5 * size)
        await front.start()
        outcomes: list[Deferred[int]] = [front.append(b"x" * 82) for _ in range(7)]
        results: list[object] = []
        for outcome in outcomes:
            try:
                results.append(await outcome)
            except SpoolFull:
                results.append("full")
        assert results == [1, 2, 3, 4, 5, "full", "full"]
        assert front.state().alarm
        await self.assertFailure(front.append(b"y"), SpoolFull)
        await front.replayed(5)
        assert front.state().bytes == 0
        assert await front.append(b"y") == 6

    async def test_a_bad_payload_fails_alone(self) -> None:
        _, front = self.make()
        await front.start()
        big = front.append(b"x" * (spool_module.MAX_PAYLOAD + 1))
        small = front.append(b"small")
        text = front.append("text")  # type: ignore[arg-type]
        smaller = front.append(b"smaller")
        await self.assertFailure(big, ValueError)
        await self.assertFailure(text, TypeError)
        assert await small == 1
        assert await smaller == 2

    async def test_pending_and_replayed_in_call_order(self) -> None:
        _, front = self.make()
        await front.start()
        first = front.append(b"a")
        listed = front.pending()
        second = front.append(b"b")
        marked = front.replayed(1)
        after = front.pending()
        assert await first == 1
        assert await listed == [(1, b"a")]
        assert await second == 2
        await marked
        assert await after == [(2, b"b")]
        assert front.state().replayed_total == 1

    async def test_stop_waits_for_queued_appends_then_refuses(self) -> None:
        spool, front = self.make()
        await front.start()
        appends = [front.append(b"queued %d" % i) for i in range(30)]
        await front.stop()
        assert all(d.called for d in appends)
        assert [await d for d in appends] == list(range(1, 31))
        await self.assertFailure(front.append(b"too late"), SpoolClosed)
        await self.assertFailure(front.pending(), SpoolClosed)
        await front.stop()  # twice is harmless
        with opened(self.folder) as reopened:
            assert [seq for seq, _ in reopened.pending()] == list(range(1, 31))
        assert spool.fsyncs >= 1

    async def test_a_failed_open_fails_start_and_what_was_queued(self) -> None:
        self.folder.mkdir()
        (self.folder / MARK_NAME).write_bytes(b"not a mark")
        _, front = self.make()
        started = front.start()
        queued = front.append(b"early")
        await self.assertFailure(started, SpoolCorrupt)
        await self.assertFailure(queued, SpoolClosed)
        await front.stop()

    async def test_appends_before_start_are_refused(self) -> None:
        _, front = self.make()
        await self.assertFailure(front.append(b"x"), SpoolClosed)


# -- the model -----------------------------------------------------------------------------

operation = st.one_of(
    st.tuples(st.just("append"), st.lists(st.binary(max_size=60), max_size=6)),
    st.tuples(st.just("replayed"), st.integers(min_value=-1, max_value=8)),
    st.tuples(st.just("reopen"), st.just(0)),
    st.tuples(st.just("beyond"), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(operation, max_size=25))
def test_pending_always_equals_a_simple_model(ops: list[tuple[str, Any]]) -> None:
    options: dict[str, Any] = {"max_bytes": 600, "segment_bytes": 150, "alarm_ratio": 0.5}
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp) / "spool"
        spool = Spool(folder, **options)
        spool.open()
        model: list[tuple[int, bytes]] = []
        last_seq = 0
        try:
            for kind, argument in ops:
                if kind == "append":
                    before = spool.state()
                    try:
                        seqs = spool.append_many(argument)
                    except SpoolFull:
                        assert before.bytes + sum(map(record_size, argument)) > before.limit
                        assert spool.state() == before
                    else:
                        assert len(seqs) == len(argument)
                        assert seqs == list(range(last_seq + 1, last_seq + 1 + len(seqs)))
                        last_seq += len(seqs)
                        model.extend(zip(seqs, argument, strict=True))
                elif kind == "replayed":
                    # An index into the model (-1: everything appended so far).
                    up_to = last_seq if argument < 0 or argument >= len(model) \
                        else model[argument][0]
                    spool.replayed(up_to)
                    model = [r for r in model if r[0] > up_to]
                elif kind == "reopen":
                    spool.close()
                    spool = Spool(folder, **options)
                    spool.open()
                    assert spool.state().recovered_torn_bytes == 0
                else:
                    with pytest.raises(ValueError):
                        spool.replayed(last_seq + 1)
                assert spool.pending() == model
                state = spool.state()
                assert state.pending == len(model)
                assert state.bytes == disk_bytes(folder) <= state.limit
                assert state.alarm is (state.bytes >= 300)
                if not model:
                    assert segments(folder) == []
        finally:
            spool.close()
