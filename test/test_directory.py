"""The phone directory against a real PostgreSQL, with both CRM versions: who a number
belongs to, never a wrong match, the deterministic choice, freshness after edits and
deletes, and the confirmation against the live row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from twisted.internet import defer, reactor
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.config import DatabaseSettings
from dpvoip.core.matching import Candidate, choose
from dpvoip.core.numbers import Dialling, normalise
from dpvoip.store.database import Store
from dpvoip.store.directory import DirectoryIndex
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.migrations import prepare
from dpvoip.store.pool import HealingPool
from test.support.crm import Crm
from test.support.daemon import PATIENCE, scratch
from test.support.postgres import postgres

GR = Dialling("GR")
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def candidate(source: str, record_id: int, active: bool = True, age_days: int = 0) -> Candidate:
    return Candidate(source, record_id, f"{source} {record_id}", None, active,
                     NOW - timedelta(days=age_days))


class ChoiceTests(SynchronousTestCase):
    """The pure rule: active client, then most recently updated, then lowest id."""

    def test_an_active_client_beats_a_newer_inactive_one(self) -> None:
        match = choose("+30", [candidate("client", 9, active=False),
                               candidate("client", 5, active=True, age_days=400)])
        assert match is not None and match.client is not None
        self.assertEqual(match.client.id, 5)
        self.assertEqual(match.candidates, 2)
        self.assertTrue(match.ambiguous)

    def test_then_the_most_recently_updated_then_the_lowest_id(self) -> None:
        newest = choose("+30", [candidate("contact", 3, age_days=2),
                                candidate("contact", 4, age_days=1)])
        tie = choose("+30", [candidate("lead", 8), candidate("contact", 7)])
        assert newest is not None and newest.person is not None
        assert tie is not None and tie.person is not None
        self.assertEqual(newest.person.id, 4)
        self.assertEqual((tie.person.kind, tie.person.id), ("contact", 7))

    def test_the_order_of_the_candidates_does_not_matter(self) -> None:
        pool = [candidate("client", i, active=i % 2 == 0, age_days=i % 3) for i in range(1, 9)]
        first = choose("+30", pool)
        assert first is not None
        self.assertEqual(choose("+30", list(reversed(pool))), first)

    def test_the_display_name_prefers_client_then_person_then_company(self) -> None:
        everything = choose("+30", [candidate("company", 1), candidate("lead", 2),
                                    candidate("client", 3)])
        person = choose("+30", [candidate("company", 1), candidate("lead", 2)])
        company = choose("+30", [candidate("company", 1)])
        assert everything and person and company
        self.assertEqual(everything.display_name, "client 3")
        self.assertEqual(person.display_name, "lead 2")
        self.assertEqual(company.display_name, "company 1")
        self.assertIsNone(choose("+30", []))


class DirectoryTestCase(TestCase):
    crm_version = "2025-12"
    timeout = 60

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()), 2)
        self.addCleanup(pool.close)
        self.store = Store(pool, reactor)
        self.index = DirectoryIndex(self.store, "public", GR, own_numbers=["210 999 9999"],
                                    page_size=3, margin_seconds=60)

        async def ready() -> None:
            await pool.start()
            await self.store.write(lambda c: prepare(c, standalone=False, crm_schema="public"))

        return defer.Deferred.fromCoroutine(ready())

    def lookup(self, raw: str, where: Dialling = GR) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self.index.lookup(normalise(raw, where)))

    def build(self) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(self.index.build())

    def refresh(self, sweep: bool = False) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(self.index.refresh(sweep=sweep))


class LookupTests(DirectoryTestCase):
    @defer.inlineCallbacks
    def test_every_directory_column_is_indexed_and_found(self) -> Any:
        client_fields = ["tilefono_oikias_1", "tilefono_oikias_2", "kinito_tilefono",
                         "tilefono_epixeirisis_1", "tilefono_epixeirisis_2"]
        expected: dict[str, tuple[str, int]] = {}
        for n, column in enumerate(client_fields):
            number = f"210 100 00{n:02d}"
            phones: dict[str, Any] = {column: number}
            expected[number] = ("client", self.crm.client(f"Client {n}", **phones))
        for n, column in enumerate(["phone", "other_phone", "mobile"]):
            number = f"691 200 00{n:02d}"
            expected[number] = ("contact", self.crm.contact(f"C{n}", "X", **{column: number}))
        for n, column in enumerate(["phone", "other_phone", "mobile", "company_phone"]):
            number = f"231 300 00{n:02d}"
            expected[number] = ("lead", self.crm.lead(f"L{n}", "Y", **{column: number}))
        expected["2410 400 000"] = ("company", self.crm.company("Firm AE", phone="2410 400 000"))
        built = yield self.build()
        # rows read: 5 clients, 3 contacts, 4 leads, 1 company + the 3 companies of the contacts
        self.assertEqual(built, 5 + 3 + 4 + 1 + 3)
        for number, (kind, record_id) in expected.items():
            match = yield self.lookup(number)
            self.assertIsNotNone(match, number)
            found = {"client": match.client, "company": None}.get(kind, match.person)
            if kind == "company":
                self.assertEqual(match.company_name, "Firm AE")
            else:
                self.assertEqual(found.id, record_id, number)

    @defer.inlineCallbacks
    def test_the_lookup_brings_client_person_owner_and_active_deal(self) -> Any:
        owner = self.crm.user("anna")
        client = self.crm.client("Papadopoulos AE", email="info@papadopoulos.gr",
                                 kinito_tilefono="+30 691 234 5678")
        contact = self.crm.contact("Maria", "Ioannou", mobile="0030 6912345678",
                                   owner_id=owner)
        self.crm.deal("Old deal", contact_id=contact,
                      update_date=NOW - timedelta(days=30))
        newest = self.crm.deal("New deal", contact_id=contact)
        self.crm.deal("Closed deal", contact_id=contact, active=False)
        yield self.build()
        match = yield self.lookup("691-234-5678")
        self.assertEqual((match.client.id, match.client.name, match.client.email),
                         (client, "Papadopoulos AE", "info@papadopoulos.gr"))
        self.assertEqual((match.person.kind, match.person.id, match.person.name,
                          match.person.owner_id), ("contact", contact, "Maria Ioannou", owner))
        self.assertEqual((match.deal.id, match.deal.name), (newest, "New deal"))
        self.assertEqual(match.display_name, "Papadopoulos AE")

    @defer.inlineCallbacks
    def test_a_lead_without_a_name_is_shown_by_its_company(self) -> Any:
        self.crm.lead("", "", company_name="Alpha OE", company_phone="2310 555 666")
        yield self.build()
        match = yield self.lookup("+30 2310 555666")
        self.assertEqual(match.display_name, "Alpha OE")

    @defer.inlineCallbacks
    def test_never_a_match_for_withheld_short_or_own_numbers(self) -> Any:
        # The replaced software matched these to an arbitrary client: make that tempting.
        self.crm.client("Trap 1", kinito_tilefono="0")
        self.crm.client("Trap 2", kinito_tilefono="")
        self.crm.client("Trap 3", kinito_tilefono="12345")
        self.crm.client("Trap 4", kinito_tilefono="anonymous")
        self.crm.client("Office itself", tilefono_epixeirisis_1="2109999999")
        yield self.build()
        for raw in ["", "0", "anonymous", "unknown", "+0", "+000000", "12345", "**610",
                    "210 999 9999", "+302109999999"]:
            match = yield self.lookup(raw)
            self.assertIsNone(match, raw)
        rows = self.crm.query("SELECT count(*) FROM dpvoip.directory_entry")
        self.assertEqual(rows, [(1,)])  # only the office's own number was indexable

    @defer.inlineCallbacks
    def test_ambiguity_is_decided_deterministically_and_logged(self) -> Any:
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.crm.client("Inactive newer", active=False, kinito_tilefono="6977000001")
        active = self.crm.client("Active older", kinito_tilefono="697 700 0001",
                                 updated_at=NOW - timedelta(days=100))
        self.crm.contact("Also", "Here", mobile="+306977000001")
        yield self.build()
        for _ in range(3):
            match = yield self.lookup("6977000001")
            self.assertEqual(match.client.id, active)
            self.assertEqual(match.candidates, 3)
        logged = [e for e in events if e.get("log_namespace") == "dpvoip.directory"
                  and e.get("n") == 3]
        self.assertEqual(len(logged), 3)
        self.assertEqual(logged[0]["log_level"], LogLevel.info)

    @defer.inlineCallbacks
    def test_a_number_seen_by_a_german_box_matches_a_greek_crm_entry(self) -> Any:
        client = self.crm.client("Greek client", kinito_tilefono="6912345678")
        german = self.crm.client("German client", tilefono_oikias_1="+49 30 1234567")
        yield self.build()
        box = Dialling("DE", "30")
        match = yield self.lookup("0030 691 234 5678", box)
        self.assertEqual(match.client.id, client)
        match = yield self.lookup("1234567", box)  # local, dialled without the area code
        self.assertEqual(match.client.id, german)


class FreshnessTests(DirectoryTestCase):
    @defer.inlineCallbacks
    def test_an_added_and_an_edited_number_match_after_one_refresh(self) -> Any:
        client = self.crm.client("Client", kinito_tilefono="6900000001")
        yield self.build()
        added = self.crm.contact("New", "Person", mobile="6900000002")
        self.crm.update("accounting_clientprofile", client, kinito_tilefono="6900000003",
                        updated_at=datetime.now(UTC))
        self.assertIsNone((yield self.lookup("6900000002")))
        changed = yield self.refresh()
        self.assertEqual(changed, 3)  # the client, the contact and the contact's company
        self.assertEqual((yield self.lookup("6900000002")).person.id, added)
        self.assertEqual((yield self.lookup("6900000003")).client.id, client)
        self.assertIsNone((yield self.lookup("6900000001")))

    @defer.inlineCallbacks
    def test_an_edit_undoes_a_hit_at_once_even_before_the_refresh(self) -> Any:
        client = self.crm.client("Client", kinito_tilefono="6900000011")
        yield self.build()
        # The CRM edits the number but the index has not seen it yet: the live row decides.
        self.crm.update("accounting_clientprofile", client, kinito_tilefono="2101234567")
        self.assertIsNone((yield self.lookup("6900000011")))

    @defer.inlineCallbacks
    def test_a_deleted_record_never_matches_and_is_swept(self) -> Any:
        contact = self.crm.contact("Gone", "Soon", mobile="6900000021")
        yield self.build()
        self.crm.query("DELETE FROM crm_contact WHERE id = %s", (contact,))
        self.assertIsNone((yield self.lookup("6900000021")))
        yield self.refresh(sweep=True)
        rows = self.crm.query("SELECT count(*) FROM dpvoip.directory_entry WHERE record_id = %s"
                              " AND source = 'contact'", (contact,))
        self.assertEqual(rows, [(0,)])
        self.assertEqual(self.index.state.sources.get("contact", 0), 0)

    def watermarks(self) -> dict[str, Any]:
        return dict(self.crm.query("SELECT source, updated_to FROM dpvoip.directory_watermark"))

    @defer.inlineCallbacks
    def test_tables_nobody_wrote_to_are_not_read_again_until_a_full_pass(self) -> Any:
        self.crm.client("A", kinito_tilefono="6900000041")
        yield self.build()
        yield self.refresh()  # the first pass reads everything and notes the counters
        before = self.watermarks()
        yield self.refresh()
        self.assertEqual(self.watermarks(), before, "no writes: no table re-read")
        self.crm.contact("New", "Person", mobile="6900000042")
        yield self.refresh()
        after = self.watermarks()
        self.assertGreater(after["contact"], before["contact"])
        self.assertEqual(after["client"], before["client"])
        self.assertIsNotNone((yield self.lookup("6900000042")))
        yield defer.Deferred.fromCoroutine(self.index.refresh(force=True))
        self.assertTrue(all(self.watermarks()[k] > after[k] for k in ("client", "lead")))

    @defer.inlineCallbacks
    def test_the_sweep_works_through_every_page_and_keeps_the_living(self) -> Any:
        # page_size 3: eleven contacts (two numbers each) take four sweep steps
        contacts = [self.crm.contact(f"C{n}", "X", mobile=f"69000001{n:02d}",
                                     phone=f"21000001{n:02d}") for n in range(11)]
        yield self.build()
        gone = contacts[1::3]  # in every page, at its edges and inside
        self.crm.query("DELETE FROM crm_contact WHERE id = ANY(%s)", (gone,))
        yield self.refresh(sweep=True)
        left = self.crm.query("SELECT DISTINCT record_id FROM dpvoip.directory_entry"
                              " WHERE source = 'contact' ORDER BY 1")
        self.assertEqual([r[0] for r in left], [c for c in contacts if c not in gone])
        self.assertEqual(self.index.state.sources["contact"], 2 * (11 - len(gone)))

    @defer.inlineCallbacks
    def test_a_late_committed_edit_within_the_margin_is_not_missed(self) -> Any:
        yield self.build()
        # A row whose update time is older than the last refresh (a transaction that
        # committed late, or a CRM host whose clock lags): the margin re-reads it.
        late = self.crm.client("Late", kinito_tilefono="6900000031",
                               updated_at=datetime.now(UTC) - timedelta(seconds=30))
        yield self.refresh()
        self.assertEqual((yield self.lookup("6900000031")).client.id, late)

    @defer.inlineCallbacks
    def test_two_instances_building_at_once_both_finish_with_every_number(self) -> Any:
        """Two dpvoip started together on one database both build the shared index."""
        clients = [self.crm.client(f"Client {n}", kinito_tilefono=f"69000001{n:02d}")
                   for n in range(20)]
        other = DirectoryIndex(self.store, "public", GR, own_numbers=["210 999 9999"],
                               page_size=3, margin_seconds=60)
        yield defer.gatherResults([self.build(),
                                   defer.Deferred.fromCoroutine(other.build())])
        for n, client in enumerate(clients):
            self.assertEqual((yield self.lookup(f"69000001{n:02d}")).client.id, client)

    @defer.inlineCallbacks
    def test_needs_a_build_once_and_again_only_when_the_region_changes(self) -> Any:
        self.assertTrue((yield defer.Deferred.fromCoroutine(self.index.needs_build())))
        yield self.build()
        self.assertFalse((yield defer.Deferred.fromCoroutine(self.index.needs_build())))
        german = DirectoryIndex(self.store, "public", Dialling("DE"))
        self.assertTrue((yield defer.Deferred.fromCoroutine(german.needs_build())))


class NewestCrmTests(LookupTests):
    """The same, against the 2026-08 CRM."""

    crm_version = "2026-08"


class FakeIndex:
    """Stands in for DirectoryIndex: records the passes and lets the test finish them."""

    def __init__(self, built: bool) -> None:
        from dpvoip.store.directory import IndexState

        self.state = IndexState()
        self._built = built
        self.calls: list[str] = []
        self.pending: list[defer.Deferred[int]] = []

    async def needs_build(self) -> bool:
        return not self._built

    async def build(self) -> int:
        self.calls.append("build")
        self._built = self.state.built = True
        return await self._wait()

    async def refresh(self, sweep: bool = False, force: bool = False) -> int:
        self.calls.append("refresh" + ("+sweep" if sweep else "") + ("+all" if force else ""))
        return await self._wait()

    def _wait(self) -> defer.Deferred[int]:
        waiting: defer.Deferred[int] = defer.Deferred()
        self.pending.append(waiting)
        return waiting

    def finish(self, error: Exception | None = None) -> None:
        waiting = self.pending.pop(0)
        waiting.errback(error) if error else waiting.callback(1)


class DirectoryServiceTests(SynchronousTestCase):
    def make(self, built: bool) -> tuple[Any, FakeIndex, Any]:
        from twisted.internet.task import Clock

        from dpvoip.config import DirectorySettings
        from dpvoip.services import DirectoryService

        clock = Clock()
        index = FakeIndex(built)
        prepared: defer.Deferred[None] = defer.Deferred()
        settings = DirectorySettings(refresh_seconds=15, sweep_seconds=60)
        service = DirectoryService(index, settings, clock, lambda: prepared)  # type: ignore[arg-type]
        service.startService()
        self.assertEqual(index.calls, [], "nothing before the schema is prepared")
        prepared.callback(None)
        return service, index, clock

    def test_builds_once_then_refreshes_and_sweeps_on_schedule(self) -> None:
        service, index, clock = self.make(built=False)
        self.assertEqual(index.calls, ["build"])
        clock.advance(15)  # the build is still running: no second pass on top of it
        self.assertEqual(index.calls, ["build"])
        index.finish()
        for _ in range(4):
            clock.advance(15)
            index.finish()
        self.assertEqual(index.calls, ["build", "refresh+all", "refresh", "refresh+sweep",
                                       "refresh"])
        service.stopService()
        clock.advance(60)
        self.assertEqual(len(index.calls), 5, "stopped means stopped")

    def test_every_table_is_read_in_full_every_five_minutes(self) -> None:
        from dpvoip.services import FULL_PASS_SECONDS

        _, index, clock = self.make(built=True)
        index.finish()
        for _ in range(int(FULL_PASS_SECONDS // 15)):
            clock.advance(15)
            index.finish()
        self.assertEqual([c.endswith("+all") for c in index.calls],
                         [True] + [False] * 19 + [True])

    def test_a_restart_catches_up_and_sweeps_at_once(self) -> None:
        _, index, _ = self.make(built=True)
        self.assertEqual(index.calls, ["refresh+sweep+all"])

    def test_a_failed_pass_is_counted_and_the_next_one_runs(self) -> None:
        _, index, clock = self.make(built=True)
        index.finish(RuntimeError("connection lost"))
        self.assertEqual(index.state.errors, 1)
        clock.advance(15)
        index.finish()
        self.assertEqual(index.calls, ["refresh+sweep+all", "refresh+sweep+all"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stop_waits_for_the_running_pass(self) -> None:
        service, index, _ = self.make(built=True)
        stopped = service.stopService()
        assert stopped is not None
        self.assertNoResult(stopped)
        index.finish()
        self.successResultOf(stopped)


class LiveDirectoryTests(TestCase):
    """The daemon as wired by the composition root keeps the directory fresh by itself."""

    timeout = 2 * PATIENCE

    @defer.inlineCallbacks
    def test_an_added_number_matches_and_a_deleted_record_is_swept_while_running(self) -> Any:
        from dpvoip.config import DirectorySettings
        from dpvoip.service import build
        from test.support.wiring import in_process
        from test.test_database import eventually

        dsn = postgres().new_database(crm="2026-08")
        crm = Crm(dsn)
        old = crm.client("Known before start", kinito_tilefono="6944000001")
        config = in_process(
            dsn, pool_size=2, directory=DirectorySettings(refresh_seconds=0.5, sweep_seconds=5))
        daemon = build(config, reactor, scratch(self))
        daemon.service.startService()
        self.addCleanup(daemon.service.stopService)
        yield daemon.service.started
        index = daemon.directory

        async def owner(raw: str) -> int | None:
            match = await index.lookup(normalise(raw, GR))
            return match.client.id if match and match.client else None

        yield defer.Deferred.fromCoroutine(eventually(lambda: index.state.built, PATIENCE))
        self.assertEqual((yield defer.Deferred.fromCoroutine(owner("6944000001"))), old)

        added = crm.client("Added while running", kinito_tilefono="6944000002")
        yield defer.Deferred.fromCoroutine(eventually(
            lambda: defer.Deferred.fromCoroutine(owner("6944000002")).addCallback(
                lambda found: found == added), seconds=PATIENCE))

        crm.query("DELETE FROM accounting_clientprofile WHERE id = %s", (old,))
        self.assertIsNone((yield defer.Deferred.fromCoroutine(owner("6944000001"))))
        yield defer.Deferred.fromCoroutine(eventually(
            lambda: crm.query("SELECT count(*) FROM dpvoip.directory_entry"
                              " WHERE record_id = %s AND source = 'client'", (old,)) == [(0,)],
            seconds=PATIENCE))


class BuildTurnTests(DirectoryTestCase):
    """A build gives the reactor a turn every ``NORMALISED_PER_TURN`` rows (issue 21): a
    page of thousands of rows normalised at once held the reactor for most of a second,
    and every webhook waited."""

    @defer.inlineCallbacks
    def test_the_reactor_gets_a_turn_between_slices_of_a_page(self) -> Any:
        from dpvoip.store import directory

        rows = 2 * directory.NORMALISED_PER_TURN + 50
        for n in range(rows):
            self.crm.client(f"Client {n}", kinito_tilefono=f"69{n:08d}")
        index = DirectoryIndex(self.store, "public", GR, page_size=10_000)
        normalised = [0]
        from dpvoip.core.matching import entries as real_entries

        def counted(*args: Any) -> Any:
            normalised[0] += 1
            return real_entries(*args)

        self.patch(directory, "entries", counted)
        between: list[int] = []  # rows normalised since the reactor's previous turn
        seen = [0]
        building = [True]

        def turn() -> None:
            between.append(normalised[0] - seen[0])
            seen[0] = normalised[0]
            if building[0]:
                reactor.callLater(0, turn)

        reactor.callLater(0, turn)
        try:
            yield defer.Deferred.fromCoroutine(index.build())
        finally:
            building[0] = False
        between.append(normalised[0] - seen[0])
        self.assertEqual(normalised[0], rows)
        self.assertLessEqual(max(between), directory.NORMALISED_PER_TURN, between)
        match = yield self.lookup(f"69{rows - 1:08d}")
        self.assertIsNotNone(match)


class IndexedTextTests(DirectoryTestCase):
    """Each entry keeps the column's text it was normalised from: a lookup that finds the
    live column unchanged takes the number as confirmed without parsing the text again
    (issue 21: that parse was a tenth of a webhook's CPU when callers seldom repeat);
    any other text is parsed, so an edit still undoes a hit at once."""

    def parses(self) -> list[str | None]:
        """The texts the lookup's confirmation parses from now on."""
        from dpvoip.core import matching

        parsed: list[str | None] = []

        def counted(raw: str | None, where: Dialling = GR) -> str | None:
            parsed.append(raw)
            return normalise(raw, where)

        self.patch(matching, "normalise", counted)
        return parsed

    @defer.inlineCallbacks
    def test_an_unchanged_column_is_not_parsed_again(self) -> Any:
        client = self.crm.client("Client", kinito_tilefono="690 000 0081")
        contact = self.crm.contact("Maria", "Same", mobile="6900000081")
        yield self.build()
        parsed = self.parses()
        match = yield self.lookup("6900000081")
        self.assertEqual((match.client.id, match.person.id, match.candidates),
                         (client, contact, 2))
        self.assertEqual(parsed, [])

    @defer.inlineCallbacks
    def test_the_same_number_written_otherwise_is_parsed_and_still_matches(self) -> Any:
        client = self.crm.client("Client", kinito_tilefono="6900000082")
        yield self.build()
        self.crm.update("accounting_clientprofile", client, kinito_tilefono="+30 690 000 0082")
        parsed = self.parses()
        self.assertEqual((yield self.lookup("6900000082")).client.id, client)
        self.assertEqual(parsed, ["+30 690 000 0082"])

    @defer.inlineCallbacks
    def test_entries_indexed_without_their_text_are_confirmed_by_parsing(self) -> Any:
        # As an index built before the text was kept (the column added empty).
        kept = self.crm.client("Client", kinito_tilefono="6900000083")
        edited = self.crm.client("Client", kinito_tilefono="6900000084")
        yield self.build()
        yield self.store.write(lambda c: c.execute(
            "UPDATE dpvoip.directory_entry SET raw = NULL"))
        self.crm.update("accounting_clientprofile", edited, kinito_tilefono="2101234567")
        parsed = self.parses()
        self.assertEqual((yield self.lookup("6900000083")).client.id, kept)
        self.assertIsNone((yield self.lookup("6900000084")))
        self.assertEqual(parsed, ["6900000083", "2101234567"])

    @defer.inlineCallbacks
    def test_an_upgraded_index_gets_its_text_at_the_next_refresh(self) -> Any:
        from dpvoip.store.migrations import MIGRATIONS

        client = self.crm.client("Client", kinito_tilefono="6900000085")
        contact = self.crm.contact("Maria", "Kept", mobile="6900000086")
        # Saved long ago: no refresh reads them again unless asked to.
        long_ago = datetime.now(UTC) - timedelta(days=30)
        self.crm.update("accounting_clientprofile", client, updated_at=long_ago)
        self.crm.update("crm_contact", contact, update_date=long_ago)
        yield self.build()
        yield self.refresh()
        # The index as the version before kept it, then the migration that asks for it
        # to be read again.
        yield self.store.write(lambda c: c.execute(
            "UPDATE dpvoip.directory_entry SET raw = NULL"))
        [again] = [m for m in MIGRATIONS if "read again once" in m.name]
        yield self.store.write(lambda c: c.execute(again.sql))
        # The next start (a new process: it knows nothing of the tables' last writes).
        self.index = DirectoryIndex(self.store, "public", GR, page_size=3)
        self.assertGreaterEqual((yield self.refresh()), 2)
        self.assertEqual(self.crm.query(
            "SELECT count(*) FROM dpvoip.directory_entry WHERE raw IS NULL"), [(0,)])
        parsed = self.parses()
        self.assertEqual((yield self.lookup("6900000085")).client.id, client)
        self.assertEqual((yield self.lookup("6900000086")).person.id, contact)
        self.assertEqual(parsed, [])


class RememberedRowsTests(DirectoryTestCase):
    """A refresh re-reads the rows updated within its margin (a minute); the rows it
    already indexed at their current update time are skipped (issue 21: every contact a
    call touched was re-parsed at every pass for a minute)."""

    def touch(self, contact: int) -> None:
        """What dpvoip's was_in_touch write does to a contact: its update time moves."""
        self.crm.update("crm_contact", contact, update_date=datetime.now(UTC))

    @defer.inlineCallbacks
    def test_a_touched_row_is_indexed_once_not_at_every_pass(self) -> Any:
        touched = self.crm.contact("Maria", "Touched", mobile="6900000051")
        other = self.crm.contact("Nikos", "Other", mobile="6900000052")
        yield self.build()
        self.touch(touched)
        # The first pass after the build reads every row of the last minute (the build
        # remembers nothing: a million rows would not fit).
        self.assertGreaterEqual((yield self.refresh()), 2)
        self.touch(other)  # a write to the table: it is read again, margin and all
        self.assertEqual((yield self.refresh()), 1, "only the newly touched row")
        self.touch(touched)  # touched again: a new update time, indexed again
        self.assertEqual((yield self.refresh()), 1)
        self.assertEqual((yield self.lookup("6900000051")).person.id, touched)

    @defer.inlineCallbacks
    def test_the_remembered_rows_fit_their_memory_budget(self) -> Any:
        """At their bound, under a heavy load's minute, the remembered rows stay within
        2.6 MiB of the daemon's memory (issue 21's budget: they were 3.1 MiB, a pair of
        source and id kept for every row)."""
        import gc
        import tracemalloc

        from psycopg2 import sql

        from dpvoip.store.directory import REMEMBERED_ROWS

        template = self.crm.contact("Maria", "Many", mobile="6900100000")
        columns = sql.SQL(", ").join(sql.Identifier(name) for (name,) in self.crm.query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema ="
            " 'public' AND table_name = 'crm_contact' AND column_name NOT IN"
            " ('id', 'token', 'mobile') ORDER BY ordinal_position"))
        self.crm.query(sql.SQL(
            "INSERT INTO crm_contact ({columns}, token, mobile) SELECT {columns},"
            " 'm' || lpad(g::text, 10, '0'), '69' || lpad(g::text, 8, '0')"
            " FROM crm_contact, generate_series(1, %s) g WHERE id = %s").format(
                columns=columns), (REMEMBERED_ROWS, template))
        self.index = DirectoryIndex(self.store, "public", GR, page_size=1000,
                                    margin_seconds=60)
        yield self.build()
        self.crm.query("UPDATE crm_contact SET update_date = now()")  # a busy minute
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            self.assertGreater((yield self.refresh()), REMEMBERED_ROWS)
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertLess(kept / 2**20, 2.6)

    @defer.inlineCallbacks
    def test_an_edit_after_a_remembered_pass_is_found(self) -> Any:
        contact = self.crm.contact("Maria", "Edited", mobile="6900000061")
        yield self.build()
        self.touch(contact)
        yield self.refresh()
        self.crm.update("crm_contact", contact, mobile="6900000062",
                        update_date=datetime.now(UTC))
        yield self.refresh()
        self.assertEqual((yield self.lookup("6900000062")).person.id, contact)
        self.assertIsNone((yield self.lookup("6900000061")))

    @defer.inlineCallbacks
    def test_a_row_whose_page_was_not_written_is_read_again(self) -> Any:
        contact = self.crm.contact("Maria", "Unlucky", mobile="6900000071")
        yield self.build()
        yield self.refresh()  # every table's counters noted: next, only crm_contact is read
        self.crm.update("crm_contact", contact, mobile="6900000072",
                        update_date=datetime.now(UTC))
        real_write = self.store.write

        def failing(interaction: Any) -> defer.Deferred[Any]:
            return defer.fail(RuntimeError("the database went away mid-pass"))

        self.store.write = failing  # type: ignore[method-assign]
        with self.assertRaises(RuntimeError):
            yield self.refresh()
        self.store.write = real_write  # type: ignore[method-assign]
        yield self.refresh()
        self.assertEqual((yield self.lookup("6900000072")).person.id, contact)
