"""The quality targets' verdicts, printed the same way by every benchmark."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any


def p99(samples: Sequence[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


def report(verdicts: Sequence[tuple[str, bool]]) -> list[str]:
    """Print one line per target; the targets missed."""
    for target, met in verdicts:
        print(f"target {target}: {'met' if met else 'MISSED'}")
    return [target for target, met in verdicts if not met]


class StallWatch:
    """The longest the reactor was held (issue 21: a build must not hold it for more than
    50 ms at a time): a timer asks to run every ``interval`` seconds and notes how late
    each run was, on the reactor's own clock."""

    def __init__(self, reactor: Any, interval: float = 0.005) -> None:
        from twisted.internet.task import LoopingCall

        self._reactor = reactor
        self._interval = interval
        self._last = 0.0
        self.longest = 0.0
        self.over_50ms = 0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def start(self) -> None:
        self._last = self._reactor.seconds()
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        self._loop.stop()

    def _tick(self) -> None:
        now = self._reactor.seconds()
        held = now - self._last - self._interval
        self._last = now
        self.longest = max(self.longest, held)
        if held > 0.050:
            self.over_50ms += 1


@contextlib.contextmanager
def cpu_hog(enabled: bool) -> Iterator[None]:
    """With ``enabled``, one core kept busy by another process for the bench's duration
    (issue 21: the targets must also hold beside other work); it stops with the bench,
    and by itself after an hour should the bench die without stopping it."""
    if not enabled:
        yield
        return
    hog = subprocess.Popen(
        [sys.executable, "-c",
         "import time\nend = time.monotonic() + 3600\nwhile time.monotonic() < end: pass"])
    print(f"a CPU hog (pid {hog.pid}) keeps one of {os.cpu_count()} cores busy")
    try:
        yield
    finally:
        hog.kill()
        hog.wait()
