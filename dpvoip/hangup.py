"""SIGHUP (the terminal of ``make start`` closed) stops dpvoip in order, like SIGTERM.

twistd leaves SIGHUP at its default, which kills the process at once: no orderly stop, and
the embedded PostgreSQL, started in a session of its own, kept running with nobody to stop
it. The handler only asks the reactor to stop, as Twisted's own SIGTERM handler does; the
exit status is 0 (a closed terminal is not a failure of dpvoip).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="dpvoip")

Handler = Callable[[int, FrameType | None], None]


def hangup_handler(reactor: Any) -> Handler:
    """The SIGHUP handler: a stop asked of the reactor from the signal's context."""

    def stop() -> None:
        if reactor.running:
            log.info("SIGHUP received (the terminal closed?): stopping in order, as on SIGTERM")
            reactor.stop()

    def handler(number: int, frame: FrameType | None) -> None:
        reactor.callFromThread(stop)

    return handler


def stop_on_hangup(reactor: Any,
                   install: Callable[[int, Handler], object] = signal.signal) -> None:
    """Install the handler (from the main thread, before the reactor runs)."""
    install(signal.SIGHUP, hangup_handler(reactor))
