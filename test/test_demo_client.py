"""``dpvoip demo-client``: the demos' client added in one command, on both CRM versions.

The options are checked before anything is written; the row is the CRM's own (every text
field with ``default=''`` written as '', the NOT NULL columns as Django fills them, a tax
number the CRM's checksum accepts); a second run updates the same client; and once the
command has run, a call from the demo number (sent as Zadarma's webhooks to a daemon that
was already running) is recorded as that client's. The command line refuses a CRM's own
database unless told otherwise, and writes nothing then.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from dpvoip.config import (
    Config,
    DatabaseSettings,
    DirectorySettings,
    Secret,
    SpoolSettings,
    ZadarmaSettings,
)
from dpvoip.core.numbers import Dialling
from dpvoip.demo_client import (
    BLANK_TEXT,
    DEMO_AFM,
    DEMO_EMAIL,
    DEMO_NAME,
    DEMO_NUMBER,
    DemoClientError,
    add_demo_client,
    afm_valid,
    checked,
    demo_row,
)
from dpvoip.service import Daemon, build
from dpvoip.store.database import Store
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.pool import HealingPool
from dpvoip.testing.zadarma_caller import ZadarmaCaller, parse_script, plan
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.daemon import PATIENCE, REPO, clean_environment, scratch
from test.support.postgres import postgres
from test.support.wiring import in_process
from test.test_database import eventually

GR = Dialling("GR")
SECRET = "demo-secret"
#: One answered call from the demo number, as Zadarma sends it.
CALL = ("0 c NOTIFY_START caller_id=6912345678 called_did=302107654321\n"
        "1 c NOTIFY_ANSWER destination=302107654321 internal=100\n"
        "30 c NOTIFY_END duration=30 disposition=answered internal=100 status_code=16\n")


class OptionTests(SynchronousTestCase):
    def test_the_demo_tax_number_passes_the_crms_checksum(self) -> None:
        self.assertTrue(afm_valid(DEMO_AFM))
        self.assertFalse(afm_valid("123456784"))
        self.assertFalse(afm_valid("12345678"))

    def test_options_dpvoip_could_not_match_or_the_crm_would_refuse_are_refused(self) -> None:
        for number, name, email, problem in [
            ("anonymous", DEMO_NAME, "", "not a number dpvoip matches"),
            ("+30 691 234 5678 000 1", DEMO_NAME, "", "is not a number"),
            ("+30 (691) 234 - 56 - 78", DEMO_NAME, "", "longer than the CRM's 20"),
            ("2107654321", DEMO_NAME, "", "one of the office's own numbers"),
            (DEMO_NUMBER, "  ", "", "the name must be"),
            (DEMO_NUMBER, "x" * 201, "", "the name must be"),
            (DEMO_NUMBER, DEMO_NAME, "not-an-address", "is not an email address"),
        ]:
            with self.assertRaises(DemoClientError, msg=number) as raised:
                checked(number, name, email, GR, own_numbers=["2107654321"])
            self.assertIn(problem, str(raised.exception))

    def test_the_row_is_the_crms_with_only_the_tables_columns(self) -> None:
        client = checked(" 691 234 5678 ", " Demo ", "", GR)
        self.assertEqual((client.number, client.e164, client.name),
                         ("691 234 5678", "+306912345678", "Demo"))
        newest = set(BLANK_TEXT) - {"kodikos_taxisnet"} | {"afm", "eponimia", "agrotis"}
        row = demo_row(client, newest)
        self.assertNotIn("kodikos_taxisnet", row)  # not a column of this version
        self.assertEqual(row["doy"], "")
        self.assertEqual(
            {k: row[k] for k in ("afm", "eponimia", "kinito_tilefono", "eidos_ipoxreou",
                                 "agrotis", "is_active")},
            {"afm": DEMO_AFM, "eponimia": "Demo", "kinito_tilefono": "691 234 5678",
             "eidos_ipoxreou": "professional", "agrotis": False, "is_active": True})


class DemoClientTests(TestCase):
    """The command's body against a CRM of ``crm_version``, a daemon already running."""

    timeout = 2 * PATIENCE
    crm_version = "2025-12"

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)
        zadarma = replace(ZadarmaSettings(), secret=Secret(SECRET), timezone="Europe/Athens",
                          allowed_networks=("127.0.0.1/32",))
        self.config = in_process(
            self.dsn, zadarma=zadarma, spool=replace(SpoolSettings(), deadline_seconds=60.0),
            directory=replace(DirectorySettings(), own_numbers=("2107654321",)))
        self.daemon: Daemon = build(self.config, reactor, scratch(self))
        # The command's own connection, as `dpvoip demo-client` in another terminal has.
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()), 1)
        self.addCleanup(pool.close)
        self.store = Store(pool, reactor)

        async def start() -> None:
            self.daemon.service.startService()
            self.addCleanup(self.daemon.service.stopService)
            await self.daemon.service.started
            await eventually(lambda: self.daemon.directory.state.built, PATIENCE)
            await pool.start()

        return defer.Deferred.fromCoroutine(start())

    def tearDown(self) -> None:
        self.assertEqual(crm_findings(self.dsn), [])

    async def command(self, number: str = DEMO_NUMBER, name: str = DEMO_NAME,
                      config: Config | None = None) -> tuple[int, list[str]]:
        said: list[str] = []
        code = await add_demo_client(self.store, config or self.config, number, name,
                                     DEMO_EMAIL, out=said.append)
        return code, said

    async def call_from_demo_number(self) -> list[tuple[Any, ...]]:
        port = self.daemon.web.port.getHost().port  # type: ignore[union-attr]
        script = parse_script(CALL)
        caller = ZadarmaCaller(f"http://127.0.0.1:{port}/voip/zd/", SECRET, treq,
                               lambda s: defer.succeed(None), pool=self.http)
        start = reactor.seconds() - script.duration - 1
        deliveries = await caller.play(plan(script, start, self.daemon_zone()))
        self.assertEqual([d.status for d in deliveries], [200, 200, 200])
        return self.crm.query("SELECT phone_number, status, client_id FROM accounting_voipcall")

    def daemon_zone(self) -> Any:
        from zoneinfo import ZoneInfo

        return ZoneInfo("Europe/Athens")

    def clients(self) -> list[tuple[Any, ...]]:
        return self.crm.query(
            "SELECT id, afm, eponimia, kinito_tilefono, email, eidos_ipoxreou, agrotis,"
            " is_active, doy, onoma, iban, imerominia_gennisis, company_id,"
            " created_at IS NOT NULL AND created_at = updated_at"
            " FROM accounting_clientprofile ORDER BY id")

    @defer.inlineCallbacks
    def test_after_the_command_a_call_from_the_demo_number_is_the_clients(self) -> Any:
        code, said = yield defer.Deferred.fromCoroutine(self.command())
        self.assertEqual(code, 0, said)
        [(client_id, *row)] = self.clients()
        self.assertEqual(row, [DEMO_AFM, DEMO_NAME, DEMO_NUMBER, DEMO_EMAIL, "professional",
                               False, True, "", "", "", None, None, True])
        self.assertEqual(said, [
            f"created CRM client {client_id}: {DEMO_NAME}, mobile {DEMO_NUMBER}, "
            f"tax number {DEMO_AFM}",
            f"a call from +306912345678 now matches: {DEMO_NAME}"])
        calls = yield defer.Deferred.fromCoroutine(self.call_from_demo_number())
        self.assertEqual(calls, [("+306912345678", "completed", client_id)])

    @defer.inlineCallbacks
    def test_a_second_run_updates_the_same_client(self) -> Any:
        yield defer.Deferred.fromCoroutine(self.command())
        code, said = yield defer.Deferred.fromCoroutine(
            self.command(number="6977000001", name="Demo two"))
        self.assertEqual(code, 0, said)
        [(client_id, afm, name, number, *_)] = self.clients()
        self.assertEqual((afm, name, number), (DEMO_AFM, "Demo two", "6977000001"))
        self.assertIn(f"updated CRM client {client_id}", said[0])
        self.assertEqual(said[1], "a call from +306977000001 now matches: Demo two")

    @defer.inlineCallbacks
    def test_a_bad_number_changes_nothing(self) -> Any:
        code, said = yield defer.Deferred.fromCoroutine(self.command(number="2107654321"))
        self.assertEqual(code, 1)
        self.assertIn("one of the office's own numbers", said[0])
        self.assertEqual(self.clients(), [])


class DemoClientNewestCrmTests(DemoClientTests):
    crm_version = "2026-08"


class CommandLineTests(SynchronousTestCase):
    """``dpvoip demo-client`` as typed (this source tree's, run in a subprocess)."""

    def run_command(self, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dpvoip.cli", *argv], cwd=REPO,
            env=clean_environment(**env), capture_output=True, text=True,
            timeout=PATIENCE, check=False)

    def test_a_crms_own_database_is_refused_unless_asked_for(self) -> None:
        for version in ("2025-12", "2026-08"):
            dsn = postgres().new_database(crm=version)
            refused = self.run_command("demo-client", DATABASE_URL=dsn)
            self.assertEqual(refused.returncode, 2, refused.stderr)
            self.assertIn("add --attached", refused.stderr)
            self.assertEqual(Crm(dsn).query("SELECT count(*) FROM accounting_clientprofile"),
                             [(0,)])
            done = self.run_command("demo-client", "--attached", DATABASE_URL=dsn)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn(f"now matches: {DEMO_NAME}", done.stdout)
            found = self.run_command("lookup", DEMO_NUMBER, DATABASE_URL=dsn)
            self.assertIn(f"+306912345678: {DEMO_NAME} (1 record(s))", found.stdout)
