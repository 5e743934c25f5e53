"""Zadarma's webhook journal is pruned: without it, ``dpvoip.zadarma_event`` and
``dpvoip.zadarma_binding`` grew by every webhook for as long as dpvoip ran. The rule
(how long, checked against the freshness window), the configuration, the statements on a
real PostgreSQL (both CRM versions), the hourly beat, and the composition root's choice."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from dpvoip.calls.ingest import ZadarmaContext
from dpvoip.config import ConfigError, DaemonSettings, Secret, ZadarmaSettings, load
from dpvoip.core.numbers import Dialling
from dpvoip.deferreds import OneShotObserver
from dpvoip.service import build
from dpvoip.services import JournalRetentionService
from dpvoip.store.zadarma_journal import PRUNE_BINDINGS, PRUNE_EVENTS, ZadarmaJournal
from dpvoip.zadarma.guard import GuardRules
from dpvoip.zadarma.retention import journal_kept, kept_days, shortest_journal_days
from test.support.daemon import scratch
from test.support.waiting import until
from test.support.wiring import in_process, running
from test.test_ingest import ZadarmaTestCase, zadarma_call

NINETY_DAYS = timedelta(days=90)


class RuleTests(SynchronousTestCase):
    def test_the_journal_outlives_the_freshness_window_by_a_day(self) -> None:
        self.assertEqual(shortest_journal_days(24, 0), 2.0)
        self.assertAlmostEqual(shortest_journal_days(24 * 7, 60), 8 + 1 / 24)

    def test_the_longest_wish_of_the_providers_is_kept(self) -> None:
        self.assertEqual(journal_kept([90, 120, 30]), timedelta(days=120))

    def test_a_wider_freshness_window_raises_what_is_kept(self) -> None:
        self.assertEqual(kept_days(90, 24, 10), 90)
        self.assertAlmostEqual(kept_days(90, 8760, 0), 366)
        self.assertEqual(kept_days(0, 8760, 0), 0, "for ever stays for ever")

    def test_one_provider_keeping_for_ever_or_none_configured_prunes_nothing(self) -> None:
        self.assertIsNone(journal_kept([90, 0]))
        self.assertIsNone(journal_kept([]))


def _config(case: SynchronousTestCase, text: str) -> Any:
    folder = Path(tempfile.mkdtemp(prefix="dpvoip-retention-"))
    case.addCleanup(lambda: __import__("shutil").rmtree(folder, True))
    path = folder / "dpvoip.toml"
    path.write_text(text, encoding="utf-8")
    return load(path, {}), folder


class ConfigurationTests(SynchronousTestCase):
    def test_ninety_days_by_default(self) -> None:
        config, _ = _config(self, '[zadarma]\nsecret = "s"\n')
        self.assertEqual(config.zadarma.journal_days, 90.0)

    def test_a_journal_shorter_than_the_freshness_window_is_refused_naming_both(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            _config(self, '[zadarma]\nsecret = "s"\nmax_event_age_hours = 72\n'
                          'journal_days = 3\n')
        text = str(raised.exception)
        self.assertIn("provider 'zadarma' journal_days = 3 is too short", text)
        self.assertIn("max_event_age_hours = 72", text)
        self.assertIn("at least 4.01, or 0 to keep them for ever", text)

    def test_a_provider_table_is_checked_the_same_way(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            _config(self, '[[provider]]\nkind = "zadarma"\nname = "branch"\nsecret = "s"\n'
                          'journal_days = 1\n')
        self.assertIn("provider 'branch' journal_days = 1 is too short", str(raised.exception))

    def test_zero_keeps_for_ever_whatever_the_window(self) -> None:
        config, _ = _config(self, '[zadarma]\nsecret = "s"\nmax_event_age_hours = 8760\n'
                                  'journal_days = 0\n')
        self.assertEqual(config.zadarma.journal_days, 0.0)

    def test_a_negative_number_of_days_is_refused(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            _config(self, '[zadarma]\njournal_days = -1\n')
        self.assertIn("journal_days", str(raised.exception))


class CompositionTests(SynchronousTestCase):
    """The daemon prunes the journal only when a Zadarma provider writes one, for as long
    as the longest-keeping provider asks."""

    def service(self, text: str) -> JournalRetentionService | None:
        config, folder = _config(self, text)
        daemon = build(config, MemoryReactorClock(), folder)
        names = {s.name: s for s in daemon.service}
        found = names.get(JournalRetentionService.name)
        assert found is None or isinstance(found, JournalRetentionService)
        return found

    def test_the_zadarma_section_prunes_after_ninety_days(self) -> None:
        service = self.service('[zadarma]\nsecret = "s"\n')
        assert service is not None
        self.assertEqual(service.keep, NINETY_DAYS)

    def test_a_configuration_from_before_with_a_years_window_starts_and_keeps_it(
            self) -> None:
        """journal_days not set (the default), the freshness window a year: no refusal
        at the upgrade; the journal is kept for the year and a day."""
        service = self.service('[zadarma]\nsecret = "s"\nmax_event_age_hours = 8760\n'
                               'max_event_ahead_minutes = 0\n')
        assert service is not None
        self.assertEqual(service.keep, timedelta(days=366))

    def test_two_providers_keep_the_longer(self) -> None:
        service = self.service('[zadarma]\nsecret = "s"\n\n[[provider]]\nkind = "zadarma"\n'
                               'name = "branch"\nsecret = "t"\njournal_days = 400\n')
        assert service is not None
        self.assertEqual(service.keep, timedelta(days=400))

    def test_kept_for_ever_or_without_zadarma_nothing_is_pruned(self) -> None:
        self.assertIsNone(self.service('[zadarma]\nsecret = "s"\njournal_days = 0\n'))
        # A [[provider]] table, and no key of [zadarma]: no Zadarma provider at all.
        self.assertIsNone(self.service(
            'fritzbox = []\n[[provider]]\nkind = "asterisk"\nname = "office"\nhost = "127.0.0.1"\n'
            'username = "dpvoip"\nsecret = "s"\n'))


class PruneTests(ZadarmaTestCase):
    """On a real PostgreSQL, with the journal the webhooks really wrote."""

    def journal(self) -> list[tuple[str, int]]:
        return self.crm.query(
            "SELECT e.pbx_call_id, (SELECT count(*) FROM dpvoip.zadarma_binding b"
            " WHERE b.pbx_call_id = e.pbx_call_id) FROM dpvoip.zadarma_event e"
            " ORDER BY e.id")

    def age(self, pbx: str, days: int) -> None:
        aged(self.crm, pbx, days)

    @defer.inlineCallbacks
    def test_what_is_older_than_kept_goes_the_rest_stays(self) -> Any:
        old, recent = "in_" + "1" * 40, "in_" + "2" * 40
        yield self.send(zadarma_call("+306912345678", old, answered=False))
        yield self.send(zadarma_call("+306912345678", recent, answered=True,
                                     start="2026-01-15 11:00:00"))
        self.assertEqual(self.journal(), [(old, 1), (old, 1), (recent, 1), (recent, 1)])
        self.age(old, 91)
        self.age(recent, 89)
        calls_before = self.calls()
        pruned = yield defer.Deferred.fromCoroutine(
            ZadarmaJournal(self.store).prune(NINETY_DAYS))
        self.assertEqual((pruned.events, pruned.bindings), (2, 1))
        self.assertEqual(self.journal(), [(recent, 1), (recent, 1)])
        self.assertEqual(self.calls(), calls_before, "the calls themselves stay")
        again = yield defer.Deferred.fromCoroutine(
            ZadarmaJournal(self.store).prune(NINETY_DAYS))
        self.assertEqual((again.events, again.bindings), (0, 0))

    @defer.inlineCallbacks
    def test_a_large_backlog_goes_in_batches_until_none_is_left(self) -> Any:
        for n in range(3):
            yield self.send(zadarma_call("+30691234567" + str(n), f"in_{n}" + "0" * 40,
                                         answered=True, start=f"2026-01-15 10:0{n}:00"))
            self.age(f"in_{n}" + "0" * 40, 200)
        batches: list[int] = []
        journal = ZadarmaJournal(self.store, batch=2)
        write_one = self.store.write_one

        def counted(sql: Any, params: Any = None) -> Any:
            batches.append(params[1])
            return write_one(sql, params)

        self.patch(self.store, "write_one", counted)
        pruned = yield defer.Deferred.fromCoroutine(journal.prune(NINETY_DAYS))
        self.assertEqual((pruned.events, pruned.bindings), (6, 3))
        self.assertEqual(self.journal(), [])
        # events: 2, 2, 2, then an empty batch; bindings: 2, then 1 (fewer: the last)
        self.assertEqual(len(batches), 6)

    @defer.inlineCallbacks
    def test_a_pruned_calls_event_delivered_again_is_refused_as_stale(self) -> Any:
        """Why pruning is safe: an event is judged against its call's journal only while
        it is fresh; by the time the journal is pruned, a late or replayed copy of one of
        its events is refused before the journal is read, and changes nothing."""
        pbx = "in_" + "3" * 40
        forms = zadarma_call("+306912345678", pbx, answered=False)
        yield self.send(forms)
        self.age(pbx, 91)
        yield defer.Deferred.fromCoroutine(ZadarmaJournal(self.store).prune(NINETY_DAYS))
        calls_before = self.calls()
        strict = ZadarmaContext(Dialling("GR"), self.context.zone, guard=GuardRules())
        yield self.send(forms, strict)  # its call_start is in January 2026: stale now
        self.assertEqual(self.journal(), [])
        self.assertEqual(self.calls(), calls_before)
        self.assertEqual(self.ingest.counters.zadarma_stale, 2)


class PlanTests(ZadarmaTestCase):
    """Years of webhooks: the hourly pass finds the few old rows through the BRIN indexes
    on the arrival, not by reading every row of the journal."""

    def test_the_old_rows_are_found_through_the_age_indexes(self) -> None:
        import psycopg2

        connection = psycopg2.connect(self.dsn)
        self.addCleanup(connection.close)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO dpvoip.zadarma_event (pbx_call_id, event, calltype, internal,"
                " destination, form, received_at) SELECT 'in_' || n, 'NOTIFY_START', '', '',"
                " '', '{}', now() - (200000 - n) * interval '1 minute'"
                " FROM generate_series(1, 200000) AS n")
            cursor.execute(
                "INSERT INTO dpvoip.zadarma_binding (signed_sha256, pbx_call_id, bound_at)"
                " SELECT sha256(n::text::bytea), 'in_' || n, now() - (200000 - n)"
                " * interval '1 minute' FROM generate_series(1, 200000) AS n")
            cursor.execute("ANALYZE dpvoip.zadarma_event")
            cursor.execute("ANALYZE dpvoip.zadarma_binding")
            for statement, index in ((PRUNE_EVENTS, "zadarma_event_by_arrival"),
                                     (PRUNE_BINDINGS, "zadarma_binding_by_age")):
                cursor.execute("EXPLAIN " + statement, (NINETY_DAYS, 5000))
                plan = "\n".join(row[0] for row in cursor.fetchall())
                self.assertIn(index, plan)


class NewestCrmPruneTests(PruneTests):
    crm_version = "2026-08"


class BeatTests(ZadarmaTestCase):
    @defer.inlineCallbacks
    def test_pruned_once_the_schema_is_prepared_then_every_hour(self) -> Any:
        clock = Clock()
        prepared: OneShotObserver[None] = OneShotObserver()
        service = JournalRetentionService(ZadarmaJournal(self.store), NINETY_DAYS, clock,
                                          prepared.when_fired)
        service.startService()
        self.addCleanup(service.stopService)
        first, second = "in_" + "4" * 40, "in_" + "5" * 40
        yield self.send(zadarma_call("+306912345678", first, answered=True))
        self.age(first, 100)

        def left(pbx: str) -> int:
            [(count,)] = self.crm.query(
                "SELECT count(*) FROM dpvoip.zadarma_event WHERE pbx_call_id = %s", (pbx,))
            return int(count)

        self.assertEqual(left(first), 2, "nothing before the schema is prepared")
        prepared.fire(None)  # the first pass at once
        yield defer.Deferred.fromCoroutine(until(lambda: left(first) == 0))
        yield self.send(zadarma_call("+306912345679", second, answered=True,
                                     start="2026-01-15 12:00:00"))
        self.age(second, 100)
        clock.advance(3599)
        self.assertEqual(left(second), 2, "not before the hour is up")
        clock.advance(1)
        yield defer.Deferred.fromCoroutine(until(lambda: left(second) == 0))
        self.assertEqual(service.failures, 0)

    def age(self, pbx: str, days: int) -> None:
        aged(self.crm, pbx, days)


class DaemonTests(ZadarmaTestCase):
    @defer.inlineCallbacks
    def test_the_daemon_prunes_at_start_once_its_spool_is_replayed(self) -> Any:
        old, recent = "in_" + "6" * 40, "in_" + "7" * 40
        yield self.send(zadarma_call("+306912345678", old, answered=True))
        yield self.send(zadarma_call("+306912345679", recent, answered=True,
                                     start="2026-01-15 12:00:00"))
        aged(self.crm, old, 91)
        folder = scratch(self)
        daemon = build(in_process(
            self.dsn, daemon=DaemonSettings(state_dir=str(folder / "state")),
            zadarma=replace(ZadarmaSettings(), secret=Secret("s"))), base=folder)
        yield defer.Deferred.fromCoroutine(running(self, daemon))

        def left() -> set[str]:
            return {pbx for (pbx,) in self.crm.query(
                "SELECT pbx_call_id FROM dpvoip.zadarma_event")}

        yield defer.Deferred.fromCoroutine(until(lambda: left() == {recent}))


def aged(crm: Any, pbx: str, days: int) -> None:
    """The call's journal as if it had arrived ``days`` ago."""
    crm.query("UPDATE dpvoip.zadarma_event SET received_at = now() - %s * interval '1 day'"
              " WHERE pbx_call_id = %s", (days, pbx))
    crm.query("UPDATE dpvoip.zadarma_binding SET bound_at = now() - %s * interval '1 day'"
              " WHERE pbx_call_id = %s", (days, pbx))
