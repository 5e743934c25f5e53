"""The hub: every live event fanned out to the streams open on this dpvoip.

Each stream has a bounded queue. A stream whose client reads (its transport asks for
more: ``resume``) gets its frames at once; one whose client stalls (its transport's
buffer is full: ``pause``) has them queued, and when the queue is full the client is
dropped and counted: a slow or stalled browser never makes dpvoip's memory grow. The
hub holds at most ``max_streams`` streams (the route answers 503 beyond), writes a
heartbeat comment to every stream every ``heartbeat`` seconds (the clock is passed
in), and closes every stream cleanly at shutdown.

No Twisted Web here: a stream writes to a ``Sink`` (the web edge hands the request).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from dpvoip.live.events import KEEPALIVE, LiveEvent, Viewer, may_see

log = Logger(namespace="dpvoip.live")


#: How many of the ids published last the hub remembers (see ``Stream.release``).
RECENT = 4096


class Sink(Protocol):
    """Where a stream's bytes go (the HTTP request of ``GET /voip/events``)."""

    def write(self, data: bytes) -> None: ...

    def end(self) -> None:
        """Finish the response (the client sees the stream end cleanly)."""

    def drop(self) -> None:
        """Cut the connection (a client too slow to keep up)."""


class TooManyStreams(Exception):
    """``max_streams`` streams are open already."""


@dataclass
class HubCounters:
    streams_opened: int = 0
    streams_refused: int = 0  # beyond max_streams
    streams_dropped: int = 0  # too slow: their queue overflowed
    events_published: int = 0
    frames_sent: int = 0


class Stream:
    """One browser's stream. Frames are held (queued, not sent) until ``release``: the
    route replays what the browser missed first, then lets the live events through."""

    def __init__(self, hub: Hub, viewer: Viewer, sink: Sink, queue_limit: int) -> None:
        self.viewer = viewer
        self._hub = hub
        self._sink = sink
        self._limit = queue_limit
        self._queue: deque[tuple[int | None, bytes]] = deque()
        self._paused = False
        self._held = True
        self._skip: frozenset[int] = frozenset()
        self.closed = False

    # -- fed by the hub ----------------------------------------------------------------

    def offer(self, event: LiveEvent, frame: bytes | None = None) -> None:
        """``frame``: the event's frame, when the hub has made it already (once for every
        stream: encoding the JSON again for each of 200 streams was most of the cost of
        a fan-out, see bench/live.py)."""
        if event.id in self._skip:  # the replay read it from the table already
            self._skip = self._skip - {event.id}
            return
        if self.closed or not may_see(self.viewer, event, self._hub.policy):
            return
        self._push(event.id, frame if frame is not None else event.frame())

    def heartbeat(self) -> None:
        if not self.closed and not self._held and not self._paused and not self._queue:
            self._send(KEEPALIVE)

    def _push(self, ident: int | None, frame: bytes) -> None:
        if self._held or self._paused or self._queue:
            if len(self._queue) >= self._limit:
                self._hub.overflowed(self)
                return
            self._queue.append((ident, frame))
            return
        self._send(frame)

    def _send(self, frame: bytes) -> None:
        self._sink.write(frame)
        self._hub.counters.frames_sent += 1

    def _flush(self) -> None:
        while self._queue and not self._paused and not self.closed:
            _, frame = self._queue.popleft()
            self._send(frame)

    # -- the route ---------------------------------------------------------------------

    def write_now(self, frame: bytes) -> None:
        """A frame of the replay (or the reload notice), before the live ones."""
        if not self.closed:
            self._send(frame)

    def release(self, replayed: Iterable[int] = ()) -> None:
        """Let the live events through, but those the replay has sent already: the ones
        queued meanwhile, and the ones the hub has yet to publish (the replay read them
        from the table before the listener heard of them)."""
        replayed = frozenset(replayed)
        self._queue = deque(item for item in self._queue if item[0] not in replayed)
        self._skip = frozenset(i for i in replayed if not self._hub.published_lately(i))
        self._held = False
        self._flush()

    # -- the transport (IPushProducer, registered by the route) ------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._held:
            self._flush()

    def stopProducing(self) -> None:
        self.detach()

    def detach(self) -> None:
        """The client went away: forget the stream (nothing is written to it any more)."""
        if not self.closed:
            self.closed = True
            self._queue.clear()
            self._hub.forget(self)

    def close(self, drop: bool = False) -> None:
        if self.closed:
            return
        self.detach()
        if drop:
            self._sink.drop()
        else:
            self._sink.end()

    @property
    def queued(self) -> int:
        return len(self._queue)


class Hub:
    """Fans events out to the open streams; see the module's docstring."""

    def __init__(self, clock: IReactorTime, max_streams: int = 200, queue_limit: int = 256,
                 heartbeat: float = 15.0, policy: str = "everyone-own-calls") -> None:
        self._clock = clock
        self.max_streams = max_streams
        self.queue_limit = queue_limit
        self.heartbeat_seconds = heartbeat
        self.policy = policy
        self.counters = HubCounters()
        self._streams: list[Stream] = []
        self._beat: IDelayedCall | None = None
        self._closed = False
        self.on_publish: list[Callable[[LiveEvent], None]] = []
        self._recent: deque[int] = deque(maxlen=RECENT)  # the ids published lately
        self._recent_set: set[int] = set()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def subscribe(self, viewer: Viewer, sink: Sink) -> Stream:
        """A new stream, held until the route releases it; ``TooManyStreams`` beyond the
        maximum (and after shutdown began)."""
        if self._closed or len(self._streams) >= self.max_streams:
            self.counters.streams_refused += 1
            raise TooManyStreams(f"{self.max_streams} live streams are open already")
        stream = Stream(self, viewer, sink, self.queue_limit)
        self._streams.append(stream)
        self.counters.streams_opened += 1
        self._arm()
        return stream

    def published_lately(self, ident: int) -> bool:
        return ident in self._recent_set

    def publish(self, events: Iterable[LiveEvent]) -> None:
        for event in events:
            self.counters.events_published += 1
            if len(self._recent) == RECENT:
                self._recent_set.discard(self._recent[0])
            self._recent.append(event.id)
            self._recent_set.add(event.id)
            if self._streams:
                frame = event.frame()  # one encoding, whatever the number of streams
                for stream in list(self._streams):
                    stream.offer(event, frame)
            for listener in self.on_publish:
                listener(event)

    def overflowed(self, stream: Stream) -> None:
        self.counters.streams_dropped += 1
        log.info("live events: dropped a stream too slow to keep up (user {user})",
                 user=stream.viewer.user_id)
        stream.close(drop=True)

    def forget(self, stream: Stream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)
        if not self._streams:
            self._disarm()

    def close_all(self) -> None:
        """At shutdown: every stream ended cleanly, none accepted any more."""
        self._closed = True
        for stream in list(self._streams):
            stream.close()
        self._disarm()

    def _arm(self) -> None:
        if self._beat is None:
            self._beat = self._clock.callLater(self.heartbeat_seconds, self._tick)

    def _disarm(self) -> None:
        if self._beat is not None and self._beat.active():
            self._beat.cancel()
        self._beat = None

    def _tick(self) -> None:
        self._beat = None
        for stream in list(self._streams):
            stream.heartbeat()
        if self._streams:
            self._arm()
