"""Fault test: PostgreSQL restarted in the middle of a mixed load of 200 events/s.

The daemon as wired, its own PostgreSQL cluster (restarted by the test, so not the shared
one), signed Zadarma webhooks over HTTP and CallMonitor lines from a fake box over TCP.
Every acknowledged event (a webhook's 200; every line the box sent) must end up in the
database exactly once. About 15 s of load and recovery on an idle machine; a busy one
only sends fewer events per second, and the trial timeout is a hang detector.

How soon an event is answered while the database does not commit (the spool deadline) is
shown on a ``Clock`` (``SpoolDeadlineTests``), not measured here.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import replace
from typing import Any, cast
from urllib.parse import urlencode

import treq
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from dpvoip.calls.ingest import Ingest, ZadarmaContext, ZadarmaOutcome
from dpvoip.config import (
    DaemonSettings,
    Secret,
    SpoolSettings,
    ZadarmaSettings,
)
from dpvoip.core.numbers import Dialling
from dpvoip.deferreds import OneShotObserver
from dpvoip.providers.interface import ProviderConfig
from dpvoip.service import build
from dpvoip.spool.durable import DurableIngest
from dpvoip.spool.journal import AsyncSpool
from dpvoip.store.database import Store
from dpvoip.store.migrations import SchemaReport
from dpvoip.testing.fritzbox import box_time
from dpvoip.zadarma.events import ZadarmaEvent, parse_event
from dpvoip.zadarma.provider import KIND
from dpvoip.zadarma.signing import webhook_signature
from test.support.postgres import private_cluster, query, take_down
from test.support.wiring import in_process, loopback_box, running
from test.test_database import eventually

SECRET = "fault-secret"
ZONE = "Europe/Athens"
BRANCH_SECRET = "branch-secret"
BRANCH_ZONE = "Asia/Tokyo"
RATE = 200.0  # events per second, both sources together
LOAD_SECONDS = 6.0  # at least; and until the restart is over
DOWN_AT, DOWN_FOR = 2.0, 1.5
#: Waits for what must happen (recovery, a replay): generous, only a hang should fail.
PATIENCE = 120.0


class _Box(Protocol):
    def __init__(self, box: FakeBox) -> None:
        self.box = box

    def connectionMade(self) -> None:
        self.box.connections.append(self)


class FakeBox(ServerFactory):
    """A CallMonitor port: the test writes lines to whichever connection is current."""

    def __init__(self) -> None:
        self.connections: list[_Box] = []

    def buildProtocol(self, addr: Any) -> _Box:
        return _Box(self)

    def send(self, line: str) -> bool:
        if not self.connections or self.connections[-1].transport is None:
            return False
        self.connections[-1].transport.write(line.encode() + b"\n")
        return True


class FaultCase(TestCase):
    """The daemon as wired, on a PostgreSQL cluster of its own, and a fake box."""

    timeout = 600  # a hang detector; a busy machine may take many times the idle 15 s
    crm_version = "2025-12"

    def setUp(self) -> Any:
        self.folder, self.cluster, self.dsn = private_cluster(self, "dpvoip-fault-db-",
                                                              self.crm_version)
        self.http = HTTPConnectionPool(reactor, persistent=True)
        self.http.maxPersistentPerHost = 16
        self.addCleanup(self.http.closeCachedConnections)
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.box = FakeBox()
        port = reactor.listenTCP(0, self.box, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        config = in_process(
            self.dsn, connect_timeout=2.0, providers=self.providers(),
            daemon=DaemonSettings(state_dir=str(self.folder / "state")),
            zadarma=replace(ZadarmaSettings(), secret=Secret(SECRET), timezone=ZONE,
                            allowed_networks=("127.0.0.1/32",)),
            spool=replace(SpoolSettings(), deadline_seconds=1.0),
            boxes=[loopback_box("office", port.getHost().port,  # type: ignore[attr-defined]
                                timezone=ZONE, reconnect_initial_seconds=0.1,
                                reconnect_max_seconds=1.0)])
        self.daemon = build(config, reactor, base=self.folder)
        web = await running(self, self.daemon)
        await eventually(lambda: bool(self.box.connections), PATIENCE)
        self.url = f"http://127.0.0.1:{web}/voip/zd/"

    def providers(self) -> tuple[ProviderConfig, ...]:
        """The ``[[provider]]`` tables beside ``[zadarma]``."""
        return ()

    async def webhook(self, form: dict[str, str], path: str = "/voip/zd/",
                      secret: str = SECRET) -> int:
        try:
            response = await treq.post(
                self.url.replace("/voip/zd/", path), data=urlencode(form).encode(),
                pool=self.http,
                headers=Headers({
                    "Content-Type": ["application/x-www-form-urlencoded"],
                    "Signature": [webhook_signature(secret, form) or ""]}))
            await response.content()
            return int(response.code)
        except Exception:
            return 0


class DatabaseRestartTest(FaultCase):
    @defer.inlineCallbacks
    def test_every_acknowledged_event_is_stored_exactly_once(self) -> Any:
        sent_zd: list[tuple[str, str]] = []
        acked_zd: list[tuple[str, str]] = []
        codes: dict[int, int] = {}
        fritz_calls: list[str] = []
        pending: list[defer.Deferred[None]] = []
        numbers = itertools.count(1)
        started = time.monotonic()
        restart: defer.Deferred[None] | None = None

        starts: dict[int, str] = {}  # all events of one call share call_start

        async def one_zadarma_event(n: int) -> None:
            call, kind = divmod(n, 2)
            pbx = f"in_fault{call:034d}"
            form = {"event": "NOTIFY_START" if kind == 0 else "NOTIFY_END",
                    "pbx_call_id": pbx,
                    "call_start": starts.setdefault(call, _local(time.time())),
                    "caller_id": f"69{call:08d}", "called_did": "302107654321"}
            if kind:
                form.update(duration="0", disposition="no answer", status_code="19",
                            is_recorded="0", calltype="normal")
            sent_zd.append((pbx, form["event"]))
            code = await self.webhook(form)
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                acked_zd.append((pbx, form["event"]))

        async def restart_database() -> None:
            await threads.deferToThread(take_down, self.cluster)
            await deferLater(reactor, DOWN_FOR, lambda: None)
            await threads.deferToThread(self.cluster.start)

        zadarma_seq = itertools.count()
        conn = 0
        # Events keep coming through the whole restart, however long a busy machine takes.
        while ((elapsed := time.monotonic() - started) < LOAD_SECONDS
               or restart is None or not restart.called):
            if restart is None and elapsed >= DOWN_AT:
                restart = defer.Deferred.fromCoroutine(restart_database())
            n = next(numbers)
            if n % 4 == 0:  # a quarter of the events: CallMonitor lines, two per call
                conn = (conn + 1) % 40
                now = box_time(time.time(), _zone())
                if self.box.send(f"{now};RING;{conn};69{n:08d};2107654321;SIP0;"):
                    self.box.send(f"{now};DISCONNECT;{conn};0;")
                    fritz_calls.append(f"69{n:08d}")
            else:
                pending.append(defer.Deferred.fromCoroutine(
                    one_zadarma_event(next(zadarma_seq))))
            yield deferLater(reactor, 1 / RATE, lambda: None)
        assert restart is not None
        yield restart
        yield defer.DeferredList(pending)
        # recovery: the spool replayed, nothing left behind
        yield defer.Deferred.fromCoroutine(eventually(
            lambda: not self.daemon.durable.spooling, PATIENCE))

        def every_fritz_call_stored() -> bool:  # the last lines may be on their way in
            rows = query(self.dsn, "SELECT phone_number FROM accounting_voipcall"
                                    " WHERE call_id LIKE 'fb-%'")
            return {f"+30{n}" for n in fritz_calls} <= {row[0] for row in rows}

        with contextlib.suppress(AssertionError):  # the checks below say which are missing
            yield defer.Deferred.fromCoroutine(eventually(every_fritz_call_stored, PATIENCE))

        journal = query(self.dsn, "SELECT pbx_call_id, event, count(*)"
                                   " FROM dpvoip.zadarma_event GROUP BY 1, 2")
        stored = {(pbx, event): count for pbx, event, count in journal}
        lost = [e for e in acked_zd if e not in stored]
        doubled = [e for e, count in stored.items() if count > 1]
        calls = query(self.dsn, "SELECT call_id, count(*) FROM accounting_voipcall"
                                 " GROUP BY 1 HAVING count(*) > 1")
        fritz_rows = query(self.dsn, "SELECT phone_number FROM accounting_voipcall"
                                      " WHERE call_id LIKE 'fb-%'")
        fritz_stored = [row[0] for row in fritz_rows]
        fritz_lost = [n for n in fritz_calls if f"+30{n}" not in fritz_stored]
        fritz_doubled = len(fritz_stored) - len(set(fritz_stored))
        ended = {pbx for pbx, event in acked_zd if event == "NOTIFY_END"}
        zd_calls = dict(query(self.dsn, "SELECT call_id, status FROM accounting_voipcall"
                                         " WHERE call_id LIKE 'zd-%'"))
        wrong = [pbx for pbx in ended if zd_calls.get(f"zd-{pbx}") != "missed"]
        counters = self.daemon.durable.counters
        print(f"\nDB restart under load: webhook events sent {len(sent_zd)}, acknowledged"
              f" {len(acked_zd)} (answers {codes}), stored {len(stored)}, lost {len(lost)},"
              f" duplicated {len(doubled)}; Fritz!Box calls sent {len(fritz_calls)}, stored"
              f" {len(fritz_stored)}, lost {len(fritz_lost)}, duplicated {fritz_doubled};"
              f" spooled {counters.spooled}, replayed {counters.replayed}")
        self.assertGreater(counters.spooled, 0, "the restart must have made events spool")
        self.assertEqual(lost, [])
        self.assertEqual(doubled, [])
        self.assertEqual(calls, [])
        self.assertEqual(wrong, [], "every ended call recorded once, as missed")
        self.assertEqual(fritz_lost, [])
        self.assertEqual(fritz_doubled, 0)
        self.assertGreaterEqual(len(acked_zd), 0.95 * len(sent_zd))


def _local(at: float) -> str:
    """A moment as Zadarma writes ``call_start``: the account's local time."""
    from datetime import datetime

    return datetime.fromtimestamp(at, _zone()).strftime("%Y-%m-%d %H:%M:%S")


def _zone() -> Any:
    from zoneinfo import ZoneInfo

    return ZoneInfo(ZONE)


class _HangUp(Protocol):
    """Sends a whole request and hangs up at once, before any answer."""

    def __init__(self, request: bytes) -> None:
        self.request = request

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)
        self.transport.loseConnection()


class DatabaseDownTest(FaultCase):
    """The same daemon and cluster; the database stopped on purpose."""

    def event(self, pbx: str, kind: str = "NOTIFY_START",
              start: str | None = None) -> dict[str, str]:
        form = {"event": kind, "pbx_call_id": pbx, "call_start": start or _local(time.time()),
                "caller_id": "6912345678", "called_did": "302107654321"}
        if kind == "NOTIFY_END":
            form.update(duration="0", disposition="no answer", status_code="19",
                        is_recorded="0", calltype="normal")
        return form

    def journal(self) -> list[tuple[Any, ...]]:
        return query(self.dsn, "SELECT pbx_call_id, event FROM dpvoip.zadarma_event"
                                " ORDER BY id")

    async def hang_up_after(self, form: dict[str, str]) -> None:
        body = urlencode(form).encode()
        port = self.daemon.web.port.getHost().port  # type: ignore[union-attr]
        request = (b"POST /voip/zd/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Content-Type: application/x-www-form-urlencoded\r\n"
                   b"Signature: " + (webhook_signature(SECRET, form) or "").encode() +
                   b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await connectProtocol(endpoint, _HangUp(request))

    @defer.inlineCallbacks
    def test_notify_start_is_answered_from_the_spool_while_the_database_is_down(
            self) -> Any:
        yield threads.deferToThread(take_down, self.cluster)
        code = yield defer.Deferred.fromCoroutine(self.webhook(self.event("in_down_1")))
        self.assertEqual(code, 200)
        self.assertTrue(self.daemon.durable.spooling)
        self.assertEqual(self.daemon.durable.counters.spooled, 1)
        yield threads.deferToThread(self.cluster.start)
        yield defer.Deferred.fromCoroutine(eventually(
            lambda: not self.daemon.durable.spooling, PATIENCE))
        self.assertEqual(self.journal(), [("in_down_1", "NOTIFY_START")])

    @defer.inlineCallbacks
    def test_a_client_hanging_up_mid_request_still_has_its_event_recorded(self) -> Any:
        start = self.event("in_hang_1")  # its end has the same call_start, as Zadarma's
        yield defer.Deferred.fromCoroutine(self.hang_up_after(start))
        yield defer.Deferred.fromCoroutine(eventually(lambda: len(self.journal()) == 1,
                                                      PATIENCE))
        yield threads.deferToThread(take_down, self.cluster)
        yield defer.Deferred.fromCoroutine(self.hang_up_after(
            self.event("in_hang_1", "NOTIFY_END", start["call_start"])))
        yield defer.Deferred.fromCoroutine(eventually(
            lambda: self.daemon.durable.counters.spooled == 1, PATIENCE))
        yield threads.deferToThread(self.cluster.start)
        yield defer.Deferred.fromCoroutine(eventually(
            lambda: not self.daemon.durable.spooling, PATIENCE))
        self.assertEqual(self.journal(), [("in_hang_1", "NOTIFY_START"),
                                          ("in_hang_1", "NOTIFY_END")])


class SecondAccountDownTest(FaultCase):
    """A second Zadarma account, whose clock runs in another zone, while the database is
    down: its spooled event is read at the replay as that account's. (It was read as the
    ``[zadarma]`` section's: its call_start, Tokyo's time taken for Athens', was seven
    hours ahead, and the event refused.)"""

    def providers(self) -> tuple[ProviderConfig, ...]:
        return (ProviderConfig("branch", KIND, replace(
            ZadarmaSettings(), secret=Secret(BRANCH_SECRET), timezone=BRANCH_ZONE,
            allowed_networks=("127.0.0.1/32",))),)

    @defer.inlineCallbacks
    def test_its_spooled_event_is_replayed_in_its_own_zone(self) -> Any:
        from datetime import UTC, datetime
        from zoneinfo import ZoneInfo

        now = time.time()
        form = {"event": "NOTIFY_START", "pbx_call_id": "in_branch_1",
                "call_start": datetime.fromtimestamp(now, ZoneInfo(BRANCH_ZONE)).strftime(
                    "%Y-%m-%d %H:%M:%S"),
                "caller_id": "6912345678", "called_did": "302107654321"}
        yield threads.deferToThread(take_down, self.cluster)
        code = yield defer.Deferred.fromCoroutine(
            self.webhook(form, "/voip/zd/branch/", BRANCH_SECRET))
        self.assertEqual(code, 200)
        self.assertEqual(self.daemon.durable.counters.spooled, 1)
        yield threads.deferToThread(self.cluster.start)
        yield defer.Deferred.fromCoroutine(eventually(
            lambda: not self.daemon.durable.spooling, PATIENCE))
        self.assertEqual(self.daemon.ingest.counters.zadarma_ahead, 0)
        [(started,)] = query(
            self.dsn, "SELECT v.started_at FROM accounting_voipcall v JOIN"
                      " dpvoip.call_detail d ON d.call_id = v.call_id"
                      " WHERE d.pbx_call_id = 'in_branch_1'")
        expected = datetime.fromtimestamp(int(now), UTC)
        self.assertEqual(started, expected)


class DuplicatesAndDisorderTest(FaultCase):
    @defer.inlineCallbacks
    def test_shuffled_and_doubled_events_across_an_outage_give_each_call_once(self) -> Any:
        import random

        random.seed(7)
        calls = [f"in_mess{n:036d}" for n in range(20)]
        events: list[dict[str, str]] = []
        for n, pbx in enumerate(calls):
            start = _local(time.time() - 60)
            common = {"pbx_call_id": pbx, "call_start": start, "caller_id": f"69{n:08d}",
                      "called_did": "302107654321"}
            answered = n % 2 == 0
            end = {"event": "NOTIFY_END", **common, "duration": "30" if answered else "0",
                   "disposition": "answered" if answered else "no answer",
                   "status_code": "16", "is_recorded": "0", "calltype": "normal"}
            if answered:
                end["internal"] = "100"
            events += [{"event": "NOTIFY_START", **common}, end]
            if answered:
                events.append({"event": "NOTIFY_ANSWER", **common, "destination": "100",
                               "internal": "100", "calltype": "normal"})
        sequence = events + random.sample(events, len(events) // 2)  # half sent twice
        random.shuffle(sequence)
        half = len(sequence) // 2
        for form in sequence[:half]:
            self.assertEqual((yield defer.Deferred.fromCoroutine(self.webhook(form))), 200)
        yield threads.deferToThread(take_down, self.cluster)
        for form in sequence[half:]:  # spooled, duplicates and all
            self.assertEqual((yield defer.Deferred.fromCoroutine(self.webhook(form))), 200)
        yield threads.deferToThread(self.cluster.start)
        yield defer.Deferred.fromCoroutine(eventually(
            lambda: not self.daemon.durable.spooling, PATIENCE))
        rows = query(self.dsn, "SELECT call_id, status, duration_seconds FROM"
                                " accounting_voipcall ORDER BY call_id")
        expected = [(f"zd-{pbx}", "completed" if n % 2 == 0 else "missed",
                     30 if n % 2 == 0 else 0) for n, pbx in enumerate(calls)]
        self.assertEqual(rows, sorted(expected))
        ended_lines = query(self.dsn, "SELECT count(*) FROM accounting_voipcalllog"
                                       " WHERE action = 'ended'")
        self.assertEqual(ended_lines, [(20,)], "one 'ended' line per call, ever")


class _StuckIngest:
    """An ingest whose database never answers, or, ``down``, says at once it is gone."""

    def __init__(self) -> None:
        self.asked = 0
        self.down = False

    def submit_zadarma(self, event: ZadarmaEvent, form: Any, context: ZadarmaContext,
                       received: Any = None) -> defer.Deferred[ZadarmaOutcome]:
        from txpostgres.reconnection import ConnectionDead

        self.asked += 1
        return defer.fail(ConnectionDead()) if self.down else defer.Deferred()


class _MemorySpool:
    """Appends kept in memory, fsynced at once."""

    def __init__(self) -> None:
        self.records: list[bytes] = []

    def append(self, record: bytes) -> defer.Deferred[None]:
        self.records.append(record)
        return defer.succeed(None)


class SpoolDeadlineTests(SynchronousTestCase):
    """How soon a webhook event is answered when the database does not commit it: the
    spool deadline, on a Clock (the fault tests above run on the real clock, where a busy
    machine makes any measured bound meaningless)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.ingest = _StuckIngest()
        self.spool = _MemorySpool()
        schema: OneShotObserver[SchemaReport] = OneShotObserver()
        schema.fire(cast(SchemaReport, "prepared"))
        self.context = ZadarmaContext(Dialling("GR"), _zone())
        self.durable = DurableIngest(
            cast(Ingest, self.ingest), cast(AsyncSpool, self.spool), cast(Store, None), schema,
            self.clock, {}, lambda _provider: self.context, "GR", deadline=1.0)

    def submit(self, pbx: str) -> defer.Deferred[ZadarmaOutcome]:
        form = {"event": "NOTIFY_START", "pbx_call_id": pbx, "call_start": "2024-01-01 10:00:00",
                "caller_id": "6912345678", "called_did": "302107654321"}
        event = parse_event(form)
        assert isinstance(event, ZadarmaEvent)
        return self.durable.submit_zadarma(event, form, self.context)

    def test_an_event_not_committed_within_the_deadline_is_spooled_and_answered(self) -> None:
        answered = self.submit("in_slow_1")
        self.clock.advance(0.999)
        self.assertNoResult(answered)
        self.assertEqual(self.spool.records, [])
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(answered), ZadarmaOutcome(duplicate=False))
        self.assertEqual(len(self.spool.records), 1)
        self.assertIn(b"in_slow_1", self.spool.records[0])
        self.assertTrue(self.durable.spooling)
        # From now on every event goes to the spool at once: the database is not asked.
        self.assertEqual(self.successResultOf(self.submit("in_slow_2")),
                         ZadarmaOutcome(duplicate=False))
        self.assertEqual((self.ingest.asked, len(self.spool.records)), (1, 2))

    def test_an_event_the_database_refuses_at_once_is_answered_at_once(self) -> None:
        self.ingest.down = True
        answered = self.submit("in_down_2")
        self.assertEqual(self.successResultOf(answered), ZadarmaOutcome(duplicate=False))
        self.assertEqual(len(self.spool.records), 1)
        self.assertEqual(self.durable.counters.spooled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [], "no deadline left running")
