"""An HTTP answer's body, read with a size bound and a Deferred that can be cancelled.

Shared by the clients of the far side (Zadarma's REST API, a Fritz!Box's TR-064): unlike
treq's collector, cancelling the read (a deadline) aborts the connection, so an answer
that stalls after its headers leaves no socket behind; and an answer larger than the
bound, announced or not, is cut off rather than buffered.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse


class BodyTooBig(Exception):
    """The answer's body is larger than the bound (the caller says whose answer)."""


class _Body(Protocol):
    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self._done = done
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def connectionMade(self) -> None:
        if self._limit <= 0:
            self.abort()

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self.abort()
            if not self._done.called:
                self._done.errback(BodyTooBig())
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)

    def abort(self) -> None:
        """Stop the answer: the connection it comes on is closed, not reused."""
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


def _collect(response: IResponse, limit: int) -> Deferred[bytes]:
    body: _Body

    def cancel(_: Deferred[bytes]) -> None:
        body.abort()

    done: Deferred[bytes] = Deferred(cancel)
    body = _Body(done, limit)
    response.deliverBody(body)
    return done


def read_body(response: IResponse, limit: int) -> Deferred[bytes]:
    """The body, at most ``limit`` bytes; fails with ``BodyTooBig`` beyond (at once when
    the answer announces its length, the connection then aborted)."""
    length = response.length
    if isinstance(length, int) and length > limit:
        _collect(response, 0).addErrback(lambda _: None)  # aborts the connection
        return fail(BodyTooBig())
    return _collect(response, limit)
