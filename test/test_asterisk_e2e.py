"""The fake Asterisk's calls, followed and submitted to the real ingest against a real
PostgreSQL, for both CRM versions: the call rows, their notes, the missed-call tickets
(exactly once, also when the same events are applied again)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from dpvoip.asterisk.calls import CallFollower
from dpvoip.asterisk.messages import Message
from dpvoip.asterisk.service import origin_of
from dpvoip.asterisk.settings import read_settings, rules_of
from dpvoip.calls.ingest import Ingest
from dpvoip.config import DatabaseSettings, TicketSettings
from dpvoip.core.happenings import Happening, Started
from dpvoip.core.numbers import Dialling
from dpvoip.core.outcomes import Reason
from dpvoip.core.texts import Texts
from dpvoip.deferreds import OneShotObserver
from dpvoip.store.database import Store
from dpvoip.store.directory import DirectoryIndex
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.migrations import SchemaReport, prepare
from dpvoip.store.pool import HealingPool
from dpvoip.testing.asterisk import SCENARIOS, ChannelTable, Pbx
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.daemon import PATIENCE
from test.support.postgres import postgres

OWN = ("2107654321",)


class AsteriskIngestMixin:
    crm_version = "2025-12"
    timeout = 2 * PATIENCE

    def setUp(self) -> Any:
        case: Any = self
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()), 4)
        case.addCleanup(pool.close)
        self.store = Store(pool, reactor)
        self.index = DirectoryIndex(self.store, "public", Dialling("GR"), own_numbers=OWN)
        self.schema: OneShotObserver[SchemaReport] = OneShotObserver()
        self.ingest = Ingest(self.store, self.index, Texts("en"), TicketSettings(),
                             ZoneInfo("Europe/Athens"), self.schema, reactor)
        settings = read_settings({"name": "office", "secret": "x"})
        self.origin = origin_of(settings)
        self.follower = CallFollower(rules_of(settings))
        self.pbx = Pbx(epoch=int(datetime.now(UTC).timestamp()))
        self.start = datetime.now(UTC) - timedelta(hours=1)

        async def ready() -> None:
            await pool.start()
            self.schema.fire(await self.store.write(
                lambda c: prepare(c, standalone=False, crm_schema="public")))

        return defer.Deferred.fromCoroutine(ready())

    def tearDown(self) -> None:
        case: Any = self
        case.assertEqual(crm_findings(self.dsn), [])

    def happenings(self, name: str, **params: Any) -> list[tuple[Happening, datetime]]:
        out: list[tuple[Happening, datetime]] = []
        at = self.start
        for beat in SCENARIOS[name](self.pbx, **params):
            at += timedelta(seconds=beat.delay)
            out += [(h, at) for h in self.follower.feed(beat.message, at)]
        self.start = at + timedelta(minutes=1)
        return out

    async def apply(self, happened: list[tuple[Happening, datetime]]) -> None:
        for happening, at in happened:
            await self.ingest.submit(happening, self.origin, at)

    def play(self, name: str, **params: Any) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self.apply(self.happenings(name, **params)))

    def calls(self) -> list[tuple[Any, ...]]:
        return self.crm.query(
            "SELECT direction, phone_number, status, duration_seconds, notes,"
            " ticket_created, client_id FROM accounting_voipcall ORDER BY id")

    def tickets(self) -> list[tuple[Any, ...]]:
        return self.crm.query("SELECT title, status, client_id FROM accounting_ticket"
                              " ORDER BY id")

    def details(self) -> list[tuple[Any, ...]]:
        return self.crm.query("SELECT source, box, extension, outcome FROM"
                              " dpvoip.call_detail ORDER BY started_at")


class AsteriskIngestTests(AsteriskIngestMixin, TestCase):
    @defer.inlineCallbacks
    def test_every_outcome_becomes_its_call_row(self) -> Any:
        client = self.crm.client("Papadopoulos AE", kinito_tilefono="6912345678")
        yield defer.Deferred.fromCoroutine(self.index.build())
        scenarios: list[tuple[str, dict[str, Any]]] = [
            ("incoming-answered", {"talk": 65}), ("incoming-missed", {}),
            ("incoming-voicemail", {"talk": 15}), ("incoming-busy", {}),
            ("outgoing-answered", {"talk": 42}), ("outgoing-unanswered", {}),
            ("outgoing-busy", {}), ("blind-transfer", {"talk": 20}),
            ("attended-transfer", {"talk": 20}), ("pickup", {"to": "205", "talk": 30}),
            ("queue", {"ext": "203", "talk": 50}),
        ]
        for name, params in scenarios:
            yield self.play(name, **params)
        rows = self.calls()
        # The CRM's duration is the whole call's (its start to its end); the notes say
        # the talk (or the message's length).
        self.assertEqual([r[:5] for r in rows], [
            ("incoming", "+306912345678", "completed", 70,
             "answered on extension 201, talk 1:05"),
            ("incoming", "+306912345678", "missed", 20, "missed"),
            ("incoming", "+306912345678", "missed", 35,
             "voicemail (answering machine), message 0:15"),
            ("incoming", "+306912345678", "missed", 3, "missed"),
            ("outgoing", "+302101234567", "completed", 48,
             "answered on extension 201, talk 0:42"),
            ("outgoing", "+302101234567", "failed", 25, "not reached"),
            ("outgoing", "+302101234567", "failed", 3, "busy"),
            ("incoming", "+306912345678", "completed", 48,
             "answered on extension 202, talk 0:44"),
            ("incoming", "+306912345678", "completed", 58,
             "answered on extension 202, talk 0:54"),
            ("incoming", "+306912345678", "completed", 36,
             "answered on extension 205, talk 0:30"),
            ("incoming", "+306912345678", "completed", 58,
             "answered on extension 203, talk 0:50"),
        ])
        self.assertEqual({r[6] for r in rows if r[0] == "incoming"}, {client})
        self.assertEqual({d[:2] for d in self.details()}, {("asterisk", "office")})
        # The missed, the voicemail and the busy office: one ticket, grouped.
        [ticket] = self.tickets()
        self.assertEqual(ticket, ("MISSED CALLS (3x) - +306912345678 - Papadopoulos AE",
                                  "open", client))
        self.assertEqual([r[5] for r in rows],
                         [False, True, True, True, False, False, False, False, False,
                          False, False])

    @defer.inlineCallbacks
    def test_the_same_events_applied_again_change_nothing(self) -> Any:
        happened = self.happenings("incoming-missed")
        yield defer.Deferred.fromCoroutine(self.apply(happened))
        before = (self.calls(), self.tickets())
        yield defer.Deferred.fromCoroutine(self.apply(happened))  # a replay
        self.assertEqual((self.calls(), self.tickets()), before)
        self.assertEqual(len(self.tickets()), 1)
        self.assertGreaterEqual(self.ingest.counters.replays_ignored, 2)

    @defer.inlineCallbacks
    def test_a_voicemail_alone_makes_a_ticket(self) -> Any:
        yield self.play("incoming-voicemail", caller="2310123456", talk=12)
        [call] = self.calls()
        self.assertEqual(call[:5], ("incoming", "+302310123456", "missed", 32,
                                    "voicemail (answering machine), message 0:12"))
        self.assertEqual([t[:2] for t in self.tickets()],
                         [("MISSED CALL - +302310123456", "open")])

    @defer.inlineCallbacks
    def test_a_call_closed_as_interrupted_then_listed_again_ends_as_it_did(self) -> Any:
        """The link went and the next login could not list the channels: the calls
        followed were closed as interrupted. A later login lists one still going: it is
        adopted, and its real end stands over the interrupted one (the answer, made
        before the gap, is dated by the list: the talk time counts from there)."""
        beats = SCENARIOS["incoming-answered"](self.pbx, talk=65)
        table, at, happened = ChannelTable(), self.start, []
        for beat in beats[:11]:  # ringing, answered, talking
            at += timedelta(seconds=beat.delay)
            table.follow(beat.fields, at.timestamp())
            happened += [(h, at) for h in self.follower.feed(beat.message, at)]
        yield defer.Deferred.fromCoroutine(self.apply(happened))
        lost = at + timedelta(seconds=2)
        yield defer.Deferred.fromCoroutine(self.apply(
            [(h, lost) for h in self.follower.close_all(Reason.LINK_LOST, lost)]))
        self.assertEqual([d[3] for d in self.details()], ["interrupted"])
        listed_at = lost + timedelta(seconds=3)
        listed = [Message(tuple(fields))
                  for fields in table.listing("list", listed_at.timestamp())]
        adopted = self.follower.adopt(listed, listed_at)
        self.assertEqual(len([h for h in adopted if isinstance(h, Started)]), 1)
        rest, at = [], listed_at
        for beat in beats[11:]:  # the call goes on to its end
            at += timedelta(seconds=beat.delay)
            rest += [(h, at) for h in self.follower.feed(beat.message, at)]
        yield defer.Deferred.fromCoroutine(self.apply(
            [(h, listed_at) for h in adopted] + rest))
        [call] = self.calls()
        self.assertEqual(call[:3], ("incoming", "+306912345678", "completed"))
        self.assertTrue(call[4].startswith("answered on extension 201, talk "), call[4])
        self.assertEqual([d[3] for d in self.details()], ["answered"])
        [(ended_at, started_at)] = self.crm.query(
            "SELECT ended_at, started_at FROM accounting_voipcall")
        self.assertEqual(ended_at - started_at, at - self.start - timedelta(
            seconds=beats[0].delay))


class AsteriskIngestNewestCrmTests(AsteriskIngestTests):
    crm_version = "2026-08"
