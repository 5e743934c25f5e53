"""``GET /voip/events``: the live events as Server-Sent Events, for signed-in CRM users.

The route identifies the user as click-to-call does (the CRM's session cookie, its JWT
or a dpvoip token), asks what they may see (staff or not, their connections' numbers),
opens a stream on the hub (503 beyond its maximum), replays from the kept window what
the browser missed (``Last-Event-ID``, or ``?last_event_id=`` for EventSource polyfills)
or tells it to reload when that is older than the window, then lets the live events
through. The response never ends by itself: the hub's heartbeats keep proxies from
closing it, and it ends when the client goes, when the client is too slow (dropped), or
at shutdown (ended cleanly).

No CORS headers: a page of another origin cannot read the stream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from dpvoip.click_to_call.errors import DatabaseUnreachable, from_database
from dpvoip.click_to_call.logins import NotSignedIn
from dpvoip.live.events import (
    LiveEvent,
    Viewer,
    last_event_id,
    may_see,
    may_watch,
    must_reload,
    reload_frame,
)
from dpvoip.live.hub import Hub, TooManyStreams
from dpvoip.web.callback import LoginService
from dpvoip.web.errors import HttpError

#: The browser's EventSource waits this long before reconnecting (milliseconds).
RETRY_MS = 3000
#: Most events replayed per read of the kept window.
PAGE = 1000

_HEADERS = {
    b"Content-Type": b"text/event-stream; charset=utf-8",
    b"Cache-Control": b"no-cache",
    b"X-Accel-Buffering": b"no",  # nginx: pass each event on at once
    b"X-Content-Type-Options": b"nosniff",
}


class EventLog(Protocol):
    """The kept events and the CRM users who watch them (``store.live.LiveEvents``).
    A database that does not answer raises what the store raises."""

    def viewer(self, user_id: int) -> Awaitable[Viewer]: ...

    def window(self) -> Awaitable[tuple[int | None, int]]: ...

    def since(self, after: int, limit: int = PAGE, skip: Sequence[int] = ()
              ) -> Awaitable[list[LiveEvent]]: ...


class _RequestSink:
    """A stream's bytes into the HTTP response; its end fires ``ended`` (the route then
    returns, and Klein finishes the response)."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.ended: Deferred[None] = Deferred()

    def write(self, data: bytes) -> None:
        self._request.write(data)

    def end(self) -> None:
        if not self.ended.called:
            self.ended.callback(None)

    def drop(self) -> None:
        transport = self._request.transport
        if transport is not None:
            transport.abortConnection()


class EventStreams:
    """The route's work; the composition root hands it the logins, the log and the hub."""

    def __init__(self, logins: LoginService, events: EventLog, hub: Hub) -> None:
        self._logins = logins
        self._events = events
        self._hub = hub

    async def stream(self, answer: IRequest) -> bytes:
        request: Any = answer  # twisted.web's Request: its channel, producer, transport
        try:
            last = last_event_id(request.getHeader(b"Last-Event-ID"),
                                 (request.args or {}).get(b"last_event_id", [None])[0])
        except ValueError as bad:
            raise HttpError(400, str(bad)) from None
        viewer = await self._viewer(request)
        sink = _RequestSink(request)
        try:
            stream = self._hub.subscribe(viewer, sink)
        except TooManyStreams as full:
            raise HttpError(503, f"{full}; try again later", {"Retry-After": "30"}) from None
        try:
            request.setResponseCode(200)
            for name, value in _HEADERS.items():
                request.setHeader(name, value)
            channel = request.channel
            if channel is not None:
                channel.setTimeout(None)  # a stream is not an idle connection: heartbeats
            request.registerProducer(stream, True)
            request.write(f"retry: {RETRY_MS}\n\n".encode())  # the headers go out now
            try:
                replayed = await self._replay(stream.write_now, viewer, last)
            except DatabaseUnreachable:  # the headers are out: end; the browser comes back
                return b""
            stream.release(replayed)
            await sink.ended
        finally:
            stream.detach()
            if not request.finished and request.channel is not None:
                request.unregisterProducer()
        return b""

    async def _viewer(self, request: IRequest) -> Viewer:
        try:
            user = await self._logins.identify(request)
            viewer = await from_database(self._events.viewer(user.id))
        except NotSignedIn as refused:
            raise HttpError(401, refused.message) from None
        except DatabaseUnreachable:
            raise HttpError(503, "the CRM database is not reachable; try again shortly") \
                from None
        if not may_watch(viewer, self._hub.policy):
            raise HttpError(403, "only the CRM's staff users may watch the live events")
        return viewer

    async def _replay(self, write: Any, viewer: Viewer, last: int | None) -> list[int]:
        """What the browser missed since ``last`` (ids of the events sent), or the reload
        notice when that is older than the kept window."""
        if last is None:
            return []
        oldest, newest = await from_database(self._events.window())
        if must_reload(last, oldest, newest):
            write(reload_frame())
            return []
        sent: list[int] = []
        after = last
        while True:
            page = await from_database(self._events.since(after, PAGE))
            for event in page:
                if may_see(viewer, event, self._hub.policy):
                    write(event.frame())
                sent.append(event.id)
            if len(page) < PAGE:
                return sent
            after = page[-1].id
