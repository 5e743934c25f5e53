"""The hub with a Clock: bounded queues (a stalled client is dropped and counted, memory
never grows), the maximum of streams, heartbeats, the replay's hand-over, shutdown."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dpvoip.live.events import KEEPALIVE, LiveEvent, Viewer
from dpvoip.live.hub import Hub, Stream, TooManyStreams
from dpvoip.live.listener import LiveFeed

STAFF = Viewer(1, True)


class FakeSink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.ended = False
        self.dropped = False

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def end(self) -> None:
        self.ended = True

    def drop(self) -> None:
        self.dropped = True

    def ids(self) -> list[int]:
        return [int(f.split(b"\n")[0][4:]) for f in self.frames if f.startswith(b"id: ")]


def event(n: int, legs: tuple[str, ...] = ("100",)) -> LiveEvent:
    return LiveEvent(n, "call", {"call_id": f"c{n}"}, legs)


class HubTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.hub = Hub(self.clock, max_streams=2, queue_limit=3, heartbeat=15)

    def open(self, viewer: Viewer = STAFF) -> tuple[FakeSink, Stream]:
        sink = FakeSink()
        stream = self.hub.subscribe(viewer, sink)
        stream.release()
        return sink, stream

    def test_every_stream_gets_each_event_it_may_see(self) -> None:
        staff, _ = self.open()
        anna, _ = self.open(Viewer(2, False, frozenset({"101"})))
        self.hub.publish([event(1), event(2, ("101",))])
        self.assertEqual(staff.ids(), [1, 2])
        self.assertEqual(anna.ids(), [2])

    def test_beyond_the_maximum_a_stream_is_refused_and_counted(self) -> None:
        self.open()
        _, second = self.open()
        with self.assertRaises(TooManyStreams):
            self.hub.subscribe(STAFF, FakeSink())
        self.assertEqual(self.hub.counters.streams_refused, 1)
        second.detach()
        self.open()  # a place is free again

    def test_a_stalled_client_queues_up_to_the_limit_then_is_dropped(self) -> None:
        sink, stream = self.open()
        fast, _ = self.open()
        stream.pauseProducing()
        self.hub.publish([event(1), event(2), event(3)])
        self.assertEqual((sink.ids(), stream.queued), ([], 3))
        self.hub.publish([event(4)])
        self.assertTrue(sink.dropped)
        self.assertEqual(self.hub.counters.streams_dropped, 1)
        self.assertEqual(self.hub.open_streams, 1)
        self.hub.publish([event(n) for n in range(5, 1000)])  # nothing kept for it
        self.assertEqual(stream.queued, 0)
        self.assertEqual(len(fast.ids()), 999)

    def test_a_client_that_catches_up_gets_its_queue_in_order(self) -> None:
        sink, stream = self.open()
        stream.pauseProducing()
        self.hub.publish([event(1), event(2)])
        stream.resumeProducing()
        self.hub.publish([event(3)])
        self.assertEqual(sink.ids(), [1, 2, 3])

    def test_heartbeats_on_idle_streams_only_while_streams_are_open(self) -> None:
        sink, stream = self.open()
        self.clock.advance(14.9)
        self.assertEqual(sink.frames, [])
        self.clock.advance(0.1)
        self.assertEqual(sink.frames, [KEEPALIVE])
        self.clock.advance(15)
        self.assertEqual(sink.frames, [KEEPALIVE, KEEPALIVE])
        stream.detach()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_events_during_the_replay_are_held_and_those_replayed_not_sent_twice(self) -> None:
        sink = FakeSink()
        stream = self.hub.subscribe(STAFF, sink)
        self.hub.publish([event(5), event(6)])  # committed while the replay reads
        stream.write_now(event(4).frame())
        stream.write_now(event(5).frame())  # the replay's read saw 5 too
        self.assertEqual(sink.ids(), [4, 5])
        stream.release([4, 5])
        self.assertEqual(sink.ids(), [4, 5, 6])

    def test_shutdown_ends_every_stream_cleanly_and_refuses_new_ones(self) -> None:
        first, _ = self.open()
        second, _ = self.open()
        self.hub.close_all()
        self.assertEqual((first.ended, second.ended), (True, True))
        self.assertEqual((first.dropped, self.hub.open_streams), (False, 0))
        with self.assertRaises(TooManyStreams):
            self.hub.subscribe(STAFF, FakeSink())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_event_the_replay_read_before_the_hub_published_it_is_not_sent_twice(
            self) -> None:
        sink = FakeSink()
        stream = self.hub.subscribe(STAFF, sink)
        stream.write_now(event(9).frame())  # committed; the listener has not heard yet
        stream.release([9])
        self.hub.publish([event(9), event(10)])
        self.assertEqual(sink.ids(), [9, 10])


class TableReader:
    """``dpvoip.live_event`` as the feed reads it, with the reads counted."""

    def __init__(self) -> None:
        self.rows: list[LiveEvent] = []
        self.reads = 0

    async def since(self, after: int, limit: int, skip: list[int]) -> list[LiveEvent]:
        self.reads += 1
        return [e for e in self.rows if e.id > after and e.id not in skip][:limit]

    async def newest(self) -> int:
        return max((e.id for e in self.rows), default=0)


class FeedWithoutStreamsTests(SynchronousTestCase):
    """With no stream open, an announcement is settled from its payload: no read; with
    one, the table is read and the stream gets the event, once."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.hub = Hub(self.clock, heartbeat=3600)
        self.table = TableReader()
        self.feed = LiveFeed(self.table, self.hub, self.clock)
        self.assertIsNone(self.feed.settled(), "nothing read yet: nothing known")
        self.feed.listening()  # started: what exists now is settled
        self.assertEqual(self.table.reads, 1)

    def commit(self, n: int) -> None:
        self.table.rows.append(event(n))
        self.feed.notified(f'{{"event": "started", "call_id": "c{n}", "id": {n}}}')

    def test_no_stream_no_read(self) -> None:
        for n in (1, 2, 3):
            self.commit(n)
        self.assertEqual((self.table.reads, self.feed.skipped), (1, 3))
        self.assertEqual(self.feed.watermark.low, 3)
        self.assertEqual(self.feed.settled(), 3)

    def test_a_stream_opened_later_gets_only_what_comes_after(self) -> None:
        self.commit(1)
        sink = FakeSink()
        self.hub.subscribe(Viewer(1, True), sink).release()
        self.commit(2)
        self.commit(3)
        self.assertEqual(sink.ids(), [2, 3])
        self.assertEqual(self.table.reads, 3)

    def test_an_announcement_without_an_id_is_read_from_the_table(self) -> None:
        self.table.rows.append(event(1))
        self.feed.notified("not json")
        self.feed.notified('{"id": true}')
        self.assertEqual((self.table.reads, self.feed.skipped), (3, 0))
        self.assertEqual(self.feed.watermark.low, 1)
