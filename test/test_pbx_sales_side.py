"""The CRM's sales side of a PBX's calls (behaviour.md section 6; issue 20 point 2): a
finished Asterisk call of a matched contact or lead prepends one line to the person's
active deal's workflow, and an answered one sets the person's ``was_in_touch``, written
with the call's end, once per call; a Fritz!Box's calls write neither.

The rules on plain data first; then the fake Asterisk's calls, followed and submitted
through ``Ingest.submit`` with the PBX's origin into a real PostgreSQL (both CRM
versions); then the daemon as the composition root wires it, the fake speaking AMI to it
over loopback, also while PostgreSQL is away (the spool's replay).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.asterisk.calls import CallFollower
from dpvoip.asterisk.service import origin_of
from dpvoip.asterisk.settings import read_settings, rules_of
from dpvoip.calls.ingest import Ingest, Submission
from dpvoip.config import DatabaseSettings, FritzBoxSettings, TicketSettings
from dpvoip.core.happenings import Ended, Happening, Started
from dpvoip.core.numbers import Dialling
from dpvoip.core.outcomes import Detail, Outcome, Reason
from dpvoip.core.sales import end_touch, sales_touch
from dpvoip.core.texts import Texts
from dpvoip.deferreds import OneShotObserver
from dpvoip.fritzbox import box
from dpvoip.fritzbox.parser import parse
from dpvoip.fritzbox.tracker import CallTracker
from dpvoip.store.database import Store
from dpvoip.store.directory import DirectoryIndex
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.migrations import SchemaReport, prepare
from dpvoip.store.pool import HealingPool
from dpvoip.testing.asterisk import SCENARIOS, Pbx
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.daemon import PATIENCE
from test.support.postgres import postgres, private_cluster, take_down
from test.support.statements import statements_sent
from test.support.waiting import until
from test.test_asterisk_daemon import AsteriskDaemonCase

ATHENS = ZoneInfo("Europe/Athens")
EN, EL = Texts("en"), Texts("el")
OWN = ("2107654321",)
CONTACT = "6971111111"  # Maria Ioannou's mobile
LEAD = "6972222222"  # Nikos Georgiou's mobile


# -- the rule, on plain data ----------------------------------------------------------------


class EndTouchTests(SynchronousTestCase):
    """``end_touch``: the lines ``sales_touch`` writes, with the name left to the store."""

    late = datetime(2030, 3, 1, 22, 30, tzinfo=UTC)  # already 2 March in Athens

    def test_an_answered_end_is_dated_in_the_office_zone_in_both_directions(self) -> None:
        touch = end_touch(Outcome.ANSWERED, 65, self.late, ATHENS, EN)
        assert touch is not None
        self.assertEqual(touch.in_touch_on, date(2030, 3, 2))
        self.assertEqual(touch.line("incoming", "Maria Ioannou"),
                         "02.03.2030 - Incoming call from Maria Ioannou (answered, 1:05).")
        self.assertEqual(touch.line("outgoing", "Maria Ioannou"),
                         "02.03.2030 - Outgoing call to Maria Ioannou (answered, 1:05).")

    def test_its_lines_are_zadarmas_for_every_outcome_and_language(self) -> None:
        for texts in (EN, EL):
            for outcome in Outcome:
                touch = end_touch(outcome, 65, self.late, ATHENS, texts)
                if outcome is Outcome.INTERRUPTED:
                    continue
                assert touch is not None
                for direction in ("incoming", "outgoing"):
                    zadarma = sales_touch(direction, outcome, 65, "Μαρία", self.late, ATHENS,
                                          texts)
                    assert zadarma is not None
                    self.assertEqual(touch.line(direction, "Μαρία"), zadarma.workflow_line)
                    self.assertEqual(touch.in_touch_on, zadarma.in_touch_on)

    def test_only_an_answered_call_puts_the_person_in_touch(self) -> None:
        for outcome in (Outcome.MISSED, Outcome.VOICEMAIL, Outcome.BUSY,
                        Outcome.NOT_REACHED, Outcome.FAILED):
            touch = end_touch(outcome, 0, self.late, ATHENS, EN)
            assert touch is not None
            self.assertIsNone(touch.in_touch_on, outcome)

    def test_a_call_dpvoip_lost_track_of_leaves_nothing(self) -> None:
        self.assertIsNone(end_touch(Outcome.INTERRUPTED, 0, self.late, ATHENS, EN))


# -- the ingest, against PostgreSQL -----------------------------------------------------


class PbxIngestCase(TestCase):
    """The fake Asterisk's calls followed and submitted as the PBX's service submits
    them (``origin_of``: the PBX's own origin)."""

    crm_version = "2025-12"
    pool_size = 4
    timeout = 2 * PATIENCE

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()),
                           self.pool_size)
        self.addCleanup(pool.close)
        self.store = Store(pool, reactor)
        self.index = DirectoryIndex(self.store, "public", Dialling("GR"), own_numbers=OWN)
        self.schema: OneShotObserver[SchemaReport] = OneShotObserver()
        self.ingest = Ingest(self.store, self.index, EN, TicketSettings(), ATHENS,
                             self.schema, reactor)
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
        # was_in_touch and workflow changed with update_date, as the CRM's save would.
        self.assertEqual(crm_findings(self.dsn), [])

    def build_directory(self) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(self.index.build())

    def happenings(self, name: str, **params: Any) -> list[tuple[Happening, datetime]]:
        """A scenario's happenings, each with when it arrived (the PBX's times)."""
        out: list[tuple[Happening, datetime]] = []
        at = self.start
        for beat in SCENARIOS[name](self.pbx, **params):
            at += timedelta(seconds=beat.delay)
            out += [(h, at) for h in self.follower.feed(beat.message, at)]
        self.start = at + timedelta(minutes=1)
        return out

    def apply(self, happened: list[tuple[Happening, datetime]]) -> defer.Deferred[None]:
        async def run() -> None:
            for happening, at in happened:
                await self.ingest.submit(happening, self.origin, at)

        return defer.Deferred.fromCoroutine(run())

    def together(self, happened: list[tuple[Happening, datetime]]) -> defer.Deferred[None]:
        """As the spool's replay applies them: in one transaction."""
        return self.ingest.apply_together(
            [Submission(h, self.origin, at) for h, at in happened])

    def play(self, name: str, **params: Any) -> defer.Deferred[None]:
        return self.apply(self.happenings(name, **params))

    @staticmethod
    def day(happened: list[tuple[Happening, datetime]]) -> str:
        """The date of the call's end in the office's zone, as its line writes it."""
        [end] = [h for h, _ in happened if isinstance(h, Ended)]
        return f"{end.at.astimezone(ATHENS):%d.%m.%Y}"

    def workflow(self, deal: int) -> list[str]:
        [(text,)] = self.crm.query("SELECT workflow FROM crm_deal WHERE id = %s", (deal,))
        return str(text).split("\n") if text else []

    def in_touch(self, table: str, record: int) -> date | None:
        [(day,)] = self.crm.query(f"SELECT was_in_touch FROM {table} WHERE id = %s",
                                  (record,))
        return day  # type: ignore[no-any-return]

    def sales_rows(self) -> list[tuple[Any, ...]]:
        """Everything the sales side may change, to compare before and after."""
        return (self.crm.query("SELECT id, was_in_touch, update_date FROM crm_contact"
                               " ORDER BY id")
                + self.crm.query("SELECT id, was_in_touch, update_date FROM crm_lead"
                                 " ORDER BY id")
                + self.crm.query("SELECT id, workflow, update_date FROM crm_deal ORDER BY id"))


class PbxSalesSideTests(PbxIngestCase):
    @defer.inlineCallbacks
    def test_an_answered_call_of_a_contact_touches_the_contact_and_its_active_deal(
        self,
    ) -> Any:
        contact = self.crm.contact("Maria", "Ioannou", mobile=CONTACT)
        closed = self.crm.deal("Old deal", contact_id=contact, active=False, workflow="")
        deal = self.crm.deal("Insurance", contact_id=contact, workflow="a user's line")
        yield self.build_directory()
        happened = self.happenings("incoming-answered", caller=CONTACT, talk=65)
        yield self.apply(happened)
        day = self.day(happened)
        self.assertEqual(f"{self.in_touch('crm_contact', contact):%d.%m.%Y}", day)
        # One line, prepended: what a CRM user wrote there stays below it.
        self.assertEqual(self.workflow(deal), [
            f"{day} - Incoming call from Maria Ioannou (answered, 1:05).", "a user's line"])
        self.assertEqual(self.workflow(closed), [])
        self.assertEqual(self.crm.query("SELECT crm_touched FROM dpvoip.call_detail"),
                         [(True,)])

    @defer.inlineCallbacks
    def test_a_missed_call_writes_its_line_and_leaves_was_in_touch(self) -> Any:
        contact = self.crm.contact("Maria", "Ioannou", mobile=CONTACT)
        deal = self.crm.deal("Insurance", contact_id=contact, workflow="")
        yield self.build_directory()
        missed = self.happenings("incoming-missed", caller=CONTACT)
        yield self.apply(missed)  # a new ticket
        voicemail = self.happenings("incoming-voicemail", caller=CONTACT, talk=15)
        yield self.apply(voicemail)  # joins it
        busy = self.happenings("incoming-busy", caller=CONTACT)
        yield self.apply(busy)  # joins it too
        self.assertIsNone(self.in_touch("crm_contact", contact))
        self.assertEqual(self.workflow(deal), [
            f"{self.day(busy)} - Incoming call from Maria Ioannou (missed, 0:00).",
            f"{self.day(voicemail)} - Incoming call from Maria Ioannou (voicemail, 0:15).",
            f"{self.day(missed)} - Incoming call from Maria Ioannou (missed, 0:00).",
        ])
        # The tickets are the box's: one, grouped, every call linked to it.
        self.assertEqual(self.crm.query("SELECT title FROM accounting_ticket"),
                         [("MISSED CALLS (3x) - +306971111111",)])
        self.assertEqual(self.crm.query(
            "SELECT count(*) FROM accounting_voipcall WHERE ticket_created"), [(3,)])

    @defer.inlineCallbacks
    def test_a_leads_calls_both_ways(self) -> Any:
        lead = self.crm.lead("Nikos", "Georgiou", mobile=LEAD)
        deal = self.crm.deal("Leasing", lead_id=lead, workflow="")
        other = self.crm.lead("Eleni", "Pappa", mobile="6973333333")  # never calls
        yield self.build_directory()
        answered = self.happenings("incoming-answered", caller=LEAD, talk=30)
        yield self.apply(answered)
        unanswered = self.happenings("outgoing-unanswered", number=LEAD)
        yield self.apply(unanswered)
        self.assertEqual(f"{self.in_touch('crm_lead', lead):%d.%m.%Y}", self.day(answered))
        self.assertIsNone(self.in_touch("crm_lead", other))
        self.assertEqual(self.workflow(deal), [
            f"{self.day(unanswered)} - Outgoing call to Nikos Georgiou (not reached, 0:00).",
            f"{self.day(answered)} - Incoming call from Nikos Georgiou (answered, 0:30).",
        ])

    @defer.inlineCallbacks
    def test_a_replay_of_the_same_events_writes_nothing_more(self) -> Any:
        contact = self.crm.contact("Maria", "Ioannou", mobile=CONTACT)
        self.crm.deal("Insurance", contact_id=contact, workflow="")
        lead = self.crm.lead("Nikos", "Georgiou", mobile=LEAD)
        self.crm.deal("Leasing", lead_id=lead, workflow="")
        yield self.build_directory()
        calls = (self.happenings("incoming-answered", caller=CONTACT, talk=65)
                 + self.happenings("incoming-missed", caller=CONTACT)
                 + self.happenings("outgoing-answered", number=LEAD, talk=42))
        yield self.apply(calls)
        written = self.sales_rows()
        self.assertEqual(sum(len(str(r[1]).split("\n")) for r in written[-2:]), 3)
        ended = self.ingest.counters.calls_ended
        yield self.apply(calls)  # the PBX's events again (a reconnect, a retry)
        yield self.together(calls)  # the spool's replay of them
        self.assertEqual(self.sales_rows(), written)
        self.assertEqual(self.ingest.counters.calls_ended, ended)
        self.assertEqual(self.crm.query("SELECT count(*) FROM accounting_ticket"), [(1,)])

    @defer.inlineCallbacks
    def test_the_spools_replay_writes_the_sales_side_in_its_transaction(self) -> Any:
        contact = self.crm.contact("Maria", "Ioannou", mobile=CONTACT)
        deal = self.crm.deal("Insurance", contact_id=contact, workflow="")
        yield self.build_directory()
        answered = self.happenings("incoming-answered", caller=CONTACT, talk=65)
        missed = self.happenings("incoming-missed", caller=CONTACT)
        withheld = self.happenings("incoming-missed", caller="")  # no ticket, no person
        yield self.together(answered + missed + withheld)
        self.assertEqual(self.workflow(deal), [
            f"{self.day(missed)} - Incoming call from Maria Ioannou (missed, 0:00).",
            f"{self.day(answered)} - Incoming call from Maria Ioannou (answered, 1:05).",
        ])
        self.assertEqual(f"{self.in_touch('crm_contact', contact):%d.%m.%Y}",
                         self.day(answered))
        written = self.sales_rows()
        yield self.together(answered + missed + withheld)
        self.assertEqual(self.sales_rows(), written)

    @defer.inlineCallbacks
    def test_a_fritzbox_origin_writes_neither(self) -> Any:
        contact = self.crm.contact("Maria", "Ioannou", mobile=CONTACT)
        self.crm.deal("Insurance", contact_id=contact, workflow="a user's line")
        yield self.build_directory()
        before = self.sales_rows()
        # The box's origin as the composition root builds it, its lines through its
        # tracker: an answered call and a missed one of the contact.
        settings = replace(FritzBoxSettings(), own_numbers=OWN)
        origin = box.origin_of(settings, frozenset(self.index.own_numbers))
        self.assertFalse(origin.sales_side)
        assert origin.rules is not None
        tracker = CallTracker(origin.rules)
        moment = datetime.now(ATHENS) - timedelta(hours=1)
        stamp = f"{moment:%d.%m.%y}"
        for line in (f"{stamp} 10:00:00;RING;0;0{CONTACT};7654321;SIP0;",
                     f"{stamp} 10:00:05;CONNECT;0;11;0{CONTACT};",
                     f"{stamp} 10:01:10;DISCONNECT;0;65;",
                     f"{stamp} 10:05:00;RING;1;0{CONTACT};7654321;SIP0;",
                     f"{stamp} 10:05:20;DISCONNECT;1;0;"):
            for happening in tracker.feed(parse(line)):
                yield self.ingest.submit(happening, origin)
        # And the PBX's own happenings under an origin that does not ask for it.
        flagless = replace(self.origin, sales_side=False)
        for happening, at in self.happenings("incoming-answered", caller=CONTACT):
            yield self.ingest.submit(happening, flagless, at)
        self.assertEqual(self.sales_rows(), before)
        self.assertEqual(self.crm.query(
            "SELECT count(*) FROM dpvoip.call_detail WHERE contact_id = %s", (contact,)),
            [(3,)])
        self.assertEqual(self.crm.query(
            "SELECT count(*) FROM dpvoip.call_detail WHERE crm_touched"), [(0,)])

    @defer.inlineCallbacks
    def test_an_interrupted_call_leaves_nothing_and_its_date_is_the_offices(self) -> Any:
        contact = self.crm.contact("Maria", "Ioannou", mobile=CONTACT)
        deal = self.crm.deal("Insurance", contact_id=contact, workflow="")
        lead = self.crm.lead("Nikos", "Georgiou", mobile=LEAD)  # no deal at all
        yield self.build_directory()
        late = datetime(2030, 3, 1, 22, 30, tzinfo=UTC)  # 2 March in Athens
        for n, (caller, outcome) in enumerate(((CONTACT, Outcome.INTERRUPTED),
                                               (CONTACT, Outcome.ANSWERED),
                                               (LEAD, Outcome.ANSWERED))):
            call = f"ast-office-190000000{n}.1"
            at = late + timedelta(minutes=n)
            yield self.ingest.submit(Started(call, "office", 0, "incoming", caller, OWN[0],
                                             "", None, at), self.origin, at)
            end = at + timedelta(seconds=70)
            detail = Detail(Reason.LINK_LOST) if outcome is Outcome.INTERRUPTED else None
            yield self.ingest.submit(Ended(call, outcome, 61, end, 201, detail),
                                     self.origin, end)
        self.assertEqual(self.workflow(deal), [
            "02.03.2030 - Incoming call from Maria Ioannou (answered, 1:01)."])
        self.assertEqual(self.in_touch("crm_contact", contact), date(2030, 3, 2))
        self.assertEqual(self.in_touch("crm_lead", lead), date(2030, 3, 2))
        self.assertEqual(self.crm.query(
            "SELECT outcome, crm_touched FROM dpvoip.call_detail ORDER BY call_id"),
            [("interrupted", False), ("answered", True), ("answered", True)])


class PbxSalesSideNewestCrmTests(PbxSalesSideTests):
    crm_version = "2026-08"


class PbxRoundTripTests(PbxIngestCase):
    """The sales side rides in the statements that end the call: a PBX's end costs the
    round trips a box's does (``test_ingest.RoundTripTests``), once its statements are
    planned on the one pooled connection."""

    pool_size = 1

    def sent(self) -> list[str]:
        return statements_sent(self)

    @defer.inlineCallbacks
    def test_the_ends_cost_what_a_boxs_do(self) -> Any:
        contact = self.crm.contact("Maria", "Ioannou", mobile=CONTACT)
        deal = self.crm.deal("Insurance", contact_id=contact, workflow="")
        yield self.build_directory()
        # Planned: each kind of end once.
        yield self.play("incoming-answered", caller=CONTACT)
        yield self.play("incoming-missed", caller="6944444444")
        yield self.play("incoming-missed", caller="6944444444")
        sent = self.sent()
        for name, expected, why in (
            ("incoming-answered", 1, "the end and the sales side in one statement"),
            ("incoming-missed", 2, "the lock and the facts, then the new ticket with the"
             " sales side and its COMMIT (the ticket's id carried past it, for the log)"),
            ("incoming-voicemail", 2, "the lock and the facts, then the rest with its"
             " COMMIT (joining the open ticket)"),
        ):
            happened = self.happenings(name, caller=CONTACT)
            [(end, at)] = [(h, at) for h, at in happened if isinstance(h, Ended)]
            yield self.apply([(h, at) for h, at in happened if h is not end])
            del sent[:]
            yield self.ingest.submit(end, self.origin, at)
            self.assertEqual(len(sent), expected, f"{name}: {why}: {sent}")
        self.assertEqual(len(self.workflow(deal)), 4)


# -- the daemon, the fake Asterisk speaking AMI to it -------------------------------------


class PbxDaemonCase(AsteriskDaemonCase):
    """The PBX's origin as the composition root builds it, live and in the spool's
    replay, puts the line on the deal."""

    def expected(self, contact: int) -> tuple[str, str]:
        """The contact's deal line and was_in_touch as its one call wrote them, from the
        call's end as recorded (the fake's clock)."""
        [(ended,)] = self.crm.query(
            "SELECT ended_at FROM dpvoip.call_detail WHERE contact_id = %s", (contact,))
        day = f"{ended.astimezone(ATHENS):%d.%m.%Y}"
        return f"{day} - Incoming call from Maria Ioannou (answered, 0:20).", day


class PbxDaemonSalesSideTests(PbxDaemonCase):
    async def test_an_answered_call_puts_its_line_on_the_contacts_deal(self) -> None:
        contact = self.crm.contact("Maria", "Ioannou", mobile=CONTACT)
        deal = self.crm.deal("Insurance", contact_id=contact, workflow="a user's line")
        await self.start()
        await until(lambda: self.daemon.directory.state.built)
        await self.play("incoming-answered", caller=CONTACT, talk=20)
        line, day = self.expected(contact)
        self.assertEqual(self.crm.query("SELECT workflow FROM crm_deal WHERE id = %s",
                                        (deal,)), [(f"{line}\na user's line",)])
        [(in_touch,)] = self.crm.query("SELECT was_in_touch FROM crm_contact")
        self.assertEqual(f"{in_touch:%d.%m.%Y}", day)


class PbxDaemonSalesSideNewestCrmTests(PbxDaemonSalesSideTests):
    crm_version = "2026-08"


class PbxOutageSalesSideTests(PbxDaemonCase):
    async def test_a_call_spooled_while_postgresql_is_away_touches_the_deal_on_replay(
        self,
    ) -> None:
        _, cluster, dsn = private_cluster(self, "dpvoip-pbx-touch-", self.crm_version)
        self.crm = crm = Crm(dsn)
        contact = crm.contact("Maria", "Ioannou", mobile=CONTACT)
        deal = crm.deal("Insurance", contact_id=contact, workflow="")
        await self.start(self.config(dsn=dsn))
        await until(lambda: self.daemon.directory.state.built)
        await threads.deferToThread(take_down, cluster)
        await self.play("incoming-answered", caller=CONTACT, talk=20)
        durable = self.daemon.durable
        self.assertTrue(durable.spooling)
        await threads.deferToThread(cluster.start)
        await until(lambda: not durable.spooling, PATIENCE)
        line, day = self.expected(contact)
        self.assertEqual(crm.query("SELECT workflow FROM crm_deal WHERE id = %s", (deal,)),
                         [(line,)])
        [(in_touch,)] = crm.query("SELECT was_in_touch FROM crm_contact")
        self.assertEqual(f"{in_touch:%d.%m.%Y}", day)
        self.assertEqual(crm_findings(dsn), [])  # (tearDown checks the shared database)
