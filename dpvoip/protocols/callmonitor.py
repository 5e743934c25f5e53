"""The CallMonitor wire protocol: lines from a Fritz!Box's port 1012.

Only translates: bytes to lines (LF or CRLF, split across segments or several in one),
lines to text (UTF-8 with replacement, line by line), text to the box's handler. An
over-long line means a broken peer: the connection is dropped, and the service reconnects.
"""

from __future__ import annotations

from typing import Protocol, cast

from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

#: Real lines are under 100 bytes; a few KiB without a newline is not a CallMonitor.
MAX_LINE = 4096


class LineSink(Protocol):
    """What the protocol reports to (a box)."""

    def connection_made(self, protocol: CallMonitorProtocol) -> None: ...
    def line_received(self, text: str) -> None: ...
    def line_too_long(self) -> None: ...
    def connection_lost(self, reason: Failure) -> None: ...


class CallMonitorProtocol(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, sink: LineSink, clock: IReactorTime, newline_every: float = 0.0) -> None:
        self._sink = sink
        self._clock = clock
        self._newline_every = newline_every
        self._keepalive: LoopingCall | None = None

    def connectionMade(self) -> None:
        if self._newline_every > 0:
            # A bare newline now and then keeps NAT mappings open and makes a dead path
            # fail on write; the box ignores it.
            self._keepalive = LoopingCall(self._send_newline)
            self._keepalive.clock = self._clock
            self._keepalive.start(self._newline_every, now=False)
        self._sink.connection_made(self)

    def _send_newline(self) -> None:
        if self.transport is not None:
            self.transport.write(b"\n")

    def lineReceived(self, line: bytes) -> None:
        self._sink.line_received(line.rstrip(b"\r").decode("utf-8", errors="replace"))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._sink.line_too_long()
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._sink.connection_lost(reason)
