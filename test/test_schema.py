"""Migrations and the CRM check against a real PostgreSQL, with both shipped CRM versions."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.config import DatabaseSettings
from dpvoip.crm.schema import REQUIRED, capabilities, missing
from dpvoip.store.database import Store
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.migrations import MIGRATIONS, SHIPPED_DDL, SchemaMismatch, SchemaReport, prepare
from dpvoip.store.pool import HealingPool
from test.support.postgres import postgres, query

#: The SHA-256 of each DDL file as the CRM publishes it (``shared/crm/*.sql`` beside the
#: project's checkout), so that a clean clone, which has no CRM beside it, still checks the
#: shipped copies. A new CRM release: ship its file and record its published hash here.
CRM_DDL_SHA256 = {
    "dpeconomy-2025-12.sql": "1cb59c591be75b6d7cd86e2d9f88984e3b4fc98e2e4941a3846e609c9d2797e5",
    "dpeconomy-2026-08.sql": "11a1876e01300ff79e8402a6b212a85c773ecd13dae00686c985992f3ddfbfc5",
}
PACKAGED_DDL = Path(__file__).resolve().parents[1] / "dpvoip" / "crm" / "sql"
#: Where the CRM's own files are, in the project's shared folder (absent in a clone).
PUBLISHED_DDL = Path(__file__).resolve().parents[2] / "shared" / "crm"

_COLUMNS = (
    "SELECT table_name, column_name, data_type, is_nullable, character_maximum_length"
    " FROM information_schema.columns WHERE table_schema = 'public'"
    " ORDER BY table_name, column_name"
)


class RequirementTests(SynchronousTestCase):
    """The pure rules: what is missing, which optional columns exist."""

    def test_everything_present_means_nothing_missing(self) -> None:
        self.assertEqual(missing({t: set(c) for t, c in REQUIRED.items()}), [])

    def test_missing_tables_and_columns_are_each_named(self) -> None:
        present = {t: set(c) for t, c in REQUIRED.items()}
        del present["crm_deal"]
        present["accounting_voipcall"].discard("resolution")
        self.assertEqual(
            missing(present),
            ["column accounting_voipcall.resolution", "table crm_deal"],
        )

    def test_the_2026_08_call_log_columns_are_detected(self) -> None:
        old = capabilities({"accounting_voipcalllog": {"id", "call_id"}})
        new = capabilities(
            {"accounting_voipcalllog": {"id", "client_id", "call_reference", "phone_number"}}
        )
        self.assertEqual(old.version, "2025-12")
        self.assertFalse(old.call_log_call_reference)
        self.assertEqual(new.version, "2026-08 or newer")
        self.assertTrue(new.call_log_client_id and new.call_log_phone_number)

    def test_shipped_ddl_is_the_crms_own(self) -> None:
        self.assertEqual(sorted(SHIPPED_DDL), sorted(CRM_DDL_SHA256))
        self.assertEqual(sorted(p.name for p in PACKAGED_DDL.glob("*.sql")), sorted(SHIPPED_DDL))
        for name in SHIPPED_DDL:
            self.assertEqual(_sha256(PACKAGED_DDL / name), CRM_DDL_SHA256[name],
                             f"dpvoip/crm/sql/{name} is not the CRM's published file")
        # Beside the CRM's own files (the project's shared folder), they are these too.
        if PUBLISHED_DDL.is_dir():
            for name in SHIPPED_DDL:
                self.assertEqual(_sha256(PUBLISHED_DDL / name), CRM_DDL_SHA256[name],
                                 f"the CRM published a new {name}: ship it, record its hash")


class PrepareTests(TestCase):
    timeout = 60

    def _store(self, dsn: str, size: int = 2) -> Store:
        pool = HealingPool(reactor, connection_dsn(dsn, DatabaseSettings()), size)
        self.addCleanup(pool.close)
        return Store(pool, reactor)

    async def _prepare(self, dsn: str, standalone: bool) -> SchemaReport:
        store = self._store(dsn)
        await store.pool.start()
        return await store.write(
            lambda c: prepare(c, standalone=standalone, crm_schema="public")
        )

    def run_prepare(self, dsn: str, standalone: bool) -> defer.Deferred[SchemaReport]:
        return defer.Deferred.fromCoroutine(self._prepare(dsn, standalone))

    @defer.inlineCallbacks
    def test_standalone_creates_the_crm_tables_exactly_as_the_crm_does(self) -> Any:
        dsn = postgres().new_database(crm=None)
        report = yield self.run_prepare(dsn, standalone=True)
        self.assertTrue(report.created_crm_tables)
        self.assertEqual(report.mode, "standalone")
        self.assertEqual(report.schema_version, MIGRATIONS[-1].version)
        reference = postgres().new_database(crm="2025-12")
        self.assertEqual(query(dsn, _COLUMNS), query(reference, _COLUMNS))

    @defer.inlineCallbacks
    def test_the_ddl_session_settings_do_not_stick_to_the_connection(self) -> Any:
        dsn = postgres().new_database(crm=None)
        store = self._store(dsn, size=1)
        yield store.pool.start()
        yield store.write(lambda c: prepare(c, standalone=True, crm_schema="public"))
        rows = yield store.read("SHOW search_path")
        self.assertEqual(rows, [('"$user", public',)])
        rows = yield store.read("SHOW statement_timeout")
        self.assertEqual(rows, [("10s",)])

    @defer.inlineCallbacks
    def test_prepare_twice_changes_nothing(self) -> Any:
        dsn = postgres().new_database(crm=None)
        first = yield self.run_prepare(dsn, standalone=True)
        ledger = "SELECT version, name FROM dpvoip.schema_migration"
        before = query(dsn, _COLUMNS), query(dsn, ledger)
        second = yield self.run_prepare(dsn, standalone=True)
        after = query(dsn, _COLUMNS), query(dsn, ledger)
        self.assertEqual(first.applied_now, tuple(m.version for m in MIGRATIONS))
        self.assertEqual(second.applied_now, ())
        self.assertFalse(second.created_crm_tables)
        self.assertEqual(before, after)

    @defer.inlineCallbacks
    def test_two_instances_migrating_at_once_migrate_once(self) -> Any:
        dsn = postgres().new_database(crm="2026-08")
        reports = yield defer.gatherResults(
            [self.run_prepare(dsn, standalone=False), self.run_prepare(dsn, standalone=False)]
        )
        applied = sorted(len(r.applied_now) for r in reports)
        self.assertEqual(applied, [0, len(MIGRATIONS)])
        count = query(dsn, "SELECT count(*) FROM dpvoip.schema_migration")
        self.assertEqual(count, [(len(MIGRATIONS),)])

    @defer.inlineCallbacks
    def test_attached_to_each_crm_version_creates_no_crm_table(self) -> Any:
        for version, expected in [("2025-12", "2025-12"), ("2026-08", "2026-08 or newer")]:
            dsn = postgres().new_database(crm=version)
            before = query(dsn, _COLUMNS)
            report = yield self.run_prepare(dsn, standalone=False)
            self.assertEqual(report.mode, "attached")
            self.assertFalse(report.created_crm_tables)
            self.assertEqual(report.crm.version, expected)
            self.assertEqual(len(report.crm_tables), 12)
            self.assertEqual(query(dsn, _COLUMNS), before)
            self.assertEqual(
                query(dsn, "SELECT value FROM dpvoip.instance_fact WHERE key = 'mode'"),
                [("attached",)],
            )

    @defer.inlineCallbacks
    def test_attached_refuses_with_everything_missing_listed_and_writes_nothing(self) -> Any:
        dsn = postgres().new_database(crm="2025-12")
        query(dsn, "DROP TABLE public.crm_deal CASCADE")
        query(dsn, "ALTER TABLE public.voip_connection DROP COLUMN callerid")
        query(dsn, "ALTER TABLE public.accounting_ticket DROP COLUMN priority")
        with self.assertRaises(SchemaMismatch) as caught:
            yield self.run_prepare(dsn, standalone=False)
        self.assertEqual(
            caught.exception.problems,
            ["column accounting_ticket.priority", "table crm_deal",
             "column voip_connection.callerid"],
        )
        self.assertIn("table crm_deal", str(caught.exception))
        self.assertEqual(query(dsn, "SELECT to_regnamespace('dpvoip') IS NULL"), [(True,)])

    @defer.inlineCallbacks
    def test_attached_to_an_empty_database_creates_nothing(self) -> Any:
        dsn = postgres().new_database(crm=None)
        with self.assertRaises(SchemaMismatch) as caught:
            yield self.run_prepare(dsn, standalone=False)
        self.assertEqual(len(caught.exception.problems), 12)
        tables = query(dsn, "SELECT count(*) FROM information_schema.tables"
                            " WHERE table_schema IN ('public', 'dpvoip')")
        self.assertEqual(tables, [(0,)])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
