"""One dpvoip per state folder, SIGHUP, and the watch over the embedded PostgreSQL, in
process: the lock (also against another process, and one killed with SIGKILL), the
refusal of ``makeService`` before anything is touched, the SIGHUP handler, and the watch
driven by a ``Clock``. The same, with the installed daemon: ``test_daemon_instance``."""

from __future__ import annotations

import contextlib
import io
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from dpvoip.config import Config, DaemonSettings
from dpvoip.embedded_watch import WARN_EVERY, EmbeddedWatch
from dpvoip.hangup import hangup_handler, stop_on_hangup
from dpvoip.service import build, makeService
from dpvoip.state_folder import (
    LOCK_NAME,
    AlreadyRunning,
    InstanceLock,
    InstanceLockService,
    holder_pid,
    lock_or_exit,
)
from dpvoip.store.embedded import EmbeddedError
from test.support.daemon import PATIENCE

#: A process holding a state folder's lock until its stdin closes or it is killed.
HOLDER = """
import sys
from pathlib import Path
from dpvoip.state_folder import InstanceLock
lock = InstanceLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
"""


def folder_of(case: SynchronousTestCase) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="dpvoip-lock-"))
    case.addCleanup(shutil.rmtree, folder, True)
    return folder / "state"


class InstanceLockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = folder_of(self)

    def acquire(self) -> InstanceLock:
        lock = InstanceLock.acquire(self.folder)
        self.addCleanup(lock.release)
        return lock

    def test_a_second_lock_is_refused_naming_the_holder_and_the_folder(self) -> None:
        import os

        self.acquire()
        with self.assertRaises(AlreadyRunning) as refused:
            InstanceLock.acquire(self.folder)
        self.assertEqual(refused.exception.pid, os.getpid())
        self.assertEqual(str(refused.exception),
                         f"another dpvoip (pid {os.getpid()}) is running on this state "
                         f"folder {self.folder}")
        # The refused attempt left the holder's pid in place.
        self.assertEqual(holder_pid(self.folder), os.getpid())

    def test_released_it_can_be_taken_again(self) -> None:
        first = self.acquire()
        first.release()
        self.assertFalse(first.held)
        self.acquire()

    def test_another_process_holds_it_and_its_sigkill_leaves_no_stale_lock(self) -> None:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(self.folder)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
        self.addCleanup(holder.kill)  # harmless once it is dead
        assert holder.stdout is not None
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        with self.assertRaises(AlreadyRunning) as refused:
            InstanceLock.acquire(self.folder)
        self.assertEqual(refused.exception.pid, holder.pid)

        holder.send_signal(signal.SIGKILL)
        holder.wait(PATIENCE)
        assert holder.stdin is not None
        holder.stdin.close()
        holder.stdout.close()
        lock = self.acquire()  # the kernel dropped the dead holder's lock
        self.assertTrue(lock.held)

    def test_lock_or_exit_says_one_line_and_exits_1(self) -> None:
        import os

        self.acquire()
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as left:
            lock_or_exit(self.folder)
        self.assertEqual(left.exception.code, 1)
        self.assertEqual(stderr.getvalue(), f"dpvoip: another dpvoip (pid {os.getpid()}) is "
                                            f"running on this state folder {self.folder}\n")

    def test_a_folder_that_cannot_be_made_is_one_line_too(self) -> None:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.folder.write_text("a file where the folder should be")
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit):
            lock_or_exit(self.folder)
        self.assertIn(f"cannot open the state folder's lock {self.folder / LOCK_NAME}",
                      stderr.getvalue())
        self.assertEqual(stderr.getvalue().count("\n"), 1)

    def test_the_service_writes_the_running_pid_and_releases_last(self) -> None:
        import os

        lock = InstanceLock.acquire(self.folder)
        self.addCleanup(lock.release)
        (self.folder / LOCK_NAME).write_text("1\n")  # as if twistd forked since
        service = InstanceLockService(lock)
        service.startService()
        self.assertEqual(holder_pid(self.folder), os.getpid())
        service.stopService()
        self.assertFalse(lock.held)
        self.acquire()


class MakeServiceTests(SynchronousTestCase):
    """The entry points' composition root takes the lock before anything else."""

    def setUp(self) -> None:
        self.folder = folder_of(self)
        self.config = Config(daemon=DaemonSettings(state_dir=str(self.folder)))

    def test_a_second_instance_refuses_before_touching_the_folder(self) -> None:
        import os

        lock = InstanceLock.acquire(self.folder)
        self.addCleanup(lock.release)
        stderr = io.StringIO()
        reactor = MemoryReactorClock()
        with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as left:
            makeService(self.config, reactor)
        self.assertEqual(left.exception.code, 1)
        self.assertEqual(stderr.getvalue(), f"dpvoip: another dpvoip (pid {os.getpid()}) is "
                                            f"running on this state folder {self.folder}\n")
        # No spool, no embedded PostgreSQL, no port, no trigger: only the holder's lock.
        self.assertEqual([p.name for p in self.folder.iterdir()], [LOCK_NAME])
        self.assertEqual((reactor.tcpServers, reactor.triggers), ([], {}))

    def test_the_lock_is_the_first_service_and_the_watch_follows_the_database(self) -> None:
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        service = makeService(self.config, MemoryReactorClock())
        names = [child.name for child in service]
        self.assertEqual(names[:3], ["state folder lock", "embedded PostgreSQL",
                                     "embedded PostgreSQL watch"])
        with self.assertRaises(AlreadyRunning):
            InstanceLock.acquire(self.folder)
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), previous)
        next(iter(service)).stopService()  # releases the lock
        InstanceLock.acquire(self.folder).release()

    def test_build_without_a_lock_is_unchanged_for_in_process_tests(self) -> None:
        daemon = build(self.config, MemoryReactorClock(), self.folder.parent)
        self.assertNotIn("state folder lock", [child.name for child in daemon.service])
        self.assertFalse((self.folder / LOCK_NAME).exists())


class StoppingReactor:
    """What the SIGHUP handler uses of a reactor."""

    def __init__(self) -> None:
        self.running = True
        self.stops = 0
        self.from_thread: list[Callable[[], None]] = []

    def callFromThread(self, f: Callable[[], None]) -> None:
        self.from_thread.append(f)

    def stop(self) -> None:
        self.stops += 1
        self.running = False


class HangupTests(SynchronousTestCase):
    def test_sighup_asks_the_reactor_to_stop_as_sigterm_does(self) -> None:
        reactor = StoppingReactor()
        handler = hangup_handler(reactor)
        handler(signal.SIGHUP, None)
        self.assertEqual(reactor.stops, 0, "nothing is done inside the signal handler")
        with capturedLogs() as events:
            reactor.from_thread.pop()()
        self.assertEqual(reactor.stops, 1)
        self.assertIn("SIGHUP received", formatEvent(events[0]))
        handler(signal.SIGHUP, None)  # a second one while stopping: nothing more
        reactor.from_thread.pop()()
        self.assertEqual(reactor.stops, 1)

    def test_installed_for_sighup(self) -> None:
        installed: list[tuple[int, Any]] = []
        stop_on_hangup(StoppingReactor(), lambda number, handler: installed.append(
            (number, handler)))
        self.assertEqual([number for number, _ in installed], [signal.SIGHUP])


class FakeCluster:
    """An embedded server as the watch sees it: running, or gone; starts that succeed or
    fail."""

    def __init__(self) -> None:
        self.up = True
        self.started_pid: int | None = 100
        self.starts = 0
        self.fail_with: str | None = None

    def running(self) -> bool:
        return self.up

    def start(self) -> None:
        self.starts += 1
        if self.fail_with is not None:
            raise EmbeddedError(self.fail_with)
        self.up = True
        self.started_pid = 100 + self.starts


class EmbeddedWatchTests(SynchronousTestCase):
    """The watch on a Clock; its blocking work handed to the test, finished when it says."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cluster = FakeCluster()
        self.pending: list[tuple[Callable[[], None], Deferred[None]]] = []
        self.watch = EmbeddedWatch(self.clock, self.cluster, self.blocking, every=2.0)
        self.watch.startService()
        self.addCleanup(lambda: self.watch.running and self.watch.stopService())

    def blocking(self, work: Callable[[], None]) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.pending.append((work, done))
        return done

    def finish(self) -> None:
        work, done = self.pending.pop(0)
        try:
            work()
        except Exception as error:
            done.errback(error)
        else:
            done.callback(None)

    def test_a_running_server_is_left_alone(self) -> None:
        self.clock.advance(10)
        self.assertEqual(self.pending, [])

    def test_a_server_gone_is_started_again_once(self) -> None:
        self.cluster.up = False
        with capturedLogs() as events:
            self.clock.advance(1.9)
            self.assertEqual(self.pending, [], "looked at only every 2 s")
            self.clock.advance(0.1)
            self.assertEqual(len(self.pending), 1)
            self.clock.advance(6)  # still starting: no second start
            self.assertEqual(len(self.pending), 1)
            self.finish()
        self.assertEqual((self.cluster.starts, self.watch.restarts), (1, 1))
        lines = [formatEvent(e) for e in events]
        self.assertEqual(lines, ["the embedded PostgreSQL (pid 100) is gone; starting it again",
                                 "the embedded PostgreSQL runs again (pid 101)"])
        self.clock.advance(10)
        self.assertEqual(self.pending, [])

    def test_a_failed_start_is_tried_again_and_said_at_a_calm_rate(self) -> None:
        self.cluster.up = False
        self.cluster.fail_with = "PostgreSQL did not start: No space left on device"
        with capturedLogs() as events:
            for _ in range(WARN_EVERY + 1):
                self.clock.advance(2)
                self.finish()
        self.assertEqual(self.cluster.starts, WARN_EVERY + 1)
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 3, lines)  # gone; the first failure; the 31st
        self.assertIn("could not be started again: PostgreSQL did not start: No space left",
                      lines[1])
        self.assertEqual(lines[1], lines[2])
        self.cluster.fail_with = None
        self.clock.advance(2)
        self.finish()
        self.assertEqual((self.watch.failures, self.watch.restarts), (0, 1))

    def test_a_stop_waits_for_a_start_under_way_and_looks_no_more(self) -> None:
        self.cluster.up = False
        self.clock.advance(2)
        stopped = self.watch.stopService()
        assert stopped is not None
        self.assertNoResult(stopped)
        self.finish()
        self.successResultOf(stopped)
        self.cluster.up = False
        self.clock.advance(10)
        self.assertEqual((self.pending, self.clock.getDelayedCalls()), ([], []))
