"""``dpvoip check`` looks and creates nothing; it finds the daemon's state folder; it shows
what the daemon wrote (each box's real address and state, the directory it built); it
tells a refused connection apart and names missing privileges, never the password.

The check's body runs here in the test's process, on the real reactor, against the test
suite's real PostgreSQL; ``test_check_daemon`` runs the installed command beside a real
daemon.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.check import NO_EMBEDDED_YET, box_lines, check, directory_line
from dpvoip.config import FritzBoxSettings, load
from dpvoip.store.boxes import BoxReport
from dpvoip.store.inspection import DaemonBox, DirectoryBuilt
from test.support.daemon import PATIENCE
from test.support.postgres import postgres, query
from test.test_privileges import PASSWORD, as_user, database_of, grant, new_role


def scratch_folder(case: Any) -> Path:
    """An empty folder of the test's own (never in the working directory), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="dpvoip-check-"))
    case.addCleanup(shutil.rmtree, folder, True)
    return folder


def tree(folder: Path) -> list[str]:
    """Everything under ``folder``, to show that nothing was created."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


class CheckCase(TestCase):
    timeout = 2 * PATIENCE  # a hang detector

    def setUp(self) -> None:
        self.base = scratch_folder(self)

    async def check(self, environ: dict[str, str], path: Path | None = None
                    ) -> tuple[int, list[str]]:
        config = load(path, environ)
        lines: list[str] = []
        status = await check(reactor, config, str(path) if path else None, self.base,
                             lines.append)
        for line in lines:
            self.assertNotIn(PASSWORD, line)
        return status, lines

    def line(self, lines: list[str], prefix: str) -> str:
        found = [line for line in lines if line.startswith(prefix)]
        self.assertEqual(len(found), 1, lines)
        return found[0]


class OnlyLooksTests(CheckCase):
    async def test_a_fresh_folder_gets_no_cluster_and_no_folder(self) -> None:
        status, lines = await self.check({})
        self.assertEqual(status, 0)
        self.assertEqual(lines[0], f"config: valid (defaults); state folder {self.base / 'var'}"
                                   " (not created yet)")
        self.assertEqual(lines[1], f"database: {NO_EMBEDDED_YET} (it creates it in"
                                   f" {self.base / 'var' / 'pg'})")
        self.assertEqual(tree(self.base), [])

    async def test_an_empty_state_folder_stays_empty(self) -> None:
        state = self.base / "state"
        state.mkdir()
        status, lines = await self.check({"DPVOIP_DAEMON_STATE_DIR": str(state)})
        self.assertEqual(status, 0)
        self.assertIn(NO_EMBEDDED_YET, lines[1])
        self.assertEqual(tree(self.base), ["state"])

    async def test_a_stopped_embedded_server_is_not_started(self) -> None:
        data = self.base / "var" / "pg" / "data"
        data.mkdir(parents=True)
        (data / "PG_VERSION").write_text("15\n")  # a cluster as initdb leaves it, stopped
        before = tree(self.base)
        status, lines = await self.check({})
        self.assertEqual(status, 0)
        self.assertEqual(lines[1], f"database: the embedded PostgreSQL in {self.base}/var/pg"
                                   " is not running, so dpvoip is not running: start it with"
                                   " `make start` (or `dpvoip run`)")
        self.assertEqual(tree(self.base), before)  # no socket folder, no log, no server

    async def test_an_attached_database_gets_no_schema(self) -> None:
        dsn = postgres().new_database(crm="2026-08")
        status, lines = await self.check({"DATABASE_URL": dsn})
        self.assertEqual(status, 0, lines)
        self.assertIn("; mode: attached; privileges: all dpvoip needs",
                      self.line(lines, "database: reachable, PostgreSQL at "))
        self.assertEqual(self.line(lines, "dpvoip schema: "), "dpvoip schema: version 0 (not"
                         " created yet: the daemon creates it at start, or `dpvoip migrate`)")
        self.assertIn("CRM version: 2026-08 or newer", lines)
        self.assertEqual(query(dsn, "SELECT to_regnamespace('dpvoip')"), [(None,)])
        self.assertEqual(tree(self.base), [])

    async def test_each_provider_from_its_settings(self) -> None:
        """The providers are said from their settings (a PBX's: one login); a Zadarma
        account without its secret is told refused, and no secret is ever shown."""
        dsn = postgres().new_database(crm="2026-08")
        status, lines = await self.check({"DATABASE_URL": dsn})
        self.assertEqual(status, 0, lines)
        self.assertIn("webhooks at /voip/zd/ REFUSED (401): no secret",
                      self.line(lines, "provider zadarma (Zadarma): "))
        _, lines = await self.check({"DATABASE_URL": dsn, "DPVOIP_ZADARMA_SECRET": PASSWORD,
                                     "DPVOIP_ZADARMA_KEY": "k"})
        self.assertIn("webhooks at /voip/zd/ from ",
                      self.line(lines, "provider zadarma (Zadarma): "))


class StateFolderTests(SynchronousTestCase):
    def test_the_folder_the_daemon_would_use(self) -> None:
        """The file says one folder, the environment another: the environment wins, for
        the check as for the daemon (built here, not started)."""
        from dpvoip.service import build
        from dpvoip.tap import load_or_exit

        home = scratch_folder(self)
        path = home / "dpvoip.toml"
        path.write_text('[daemon]\nstate_dir = "from-the-file"\n')
        environ = {"DPVOIP_CONFIG": str(path), "DPVOIP_DAEMON_STATE_DIR": "from-the-env"}
        config = load_or_exit(None, environ)
        daemon = build(config, MemoryReactorClock(), home)
        assert daemon.embedded is not None
        lines: list[str] = []
        coroutine = check(reactor, config, str(path), home, lines.append)
        try:
            coroutine.send(None)  # no cluster there: it answers without waiting
        except StopIteration as done:
            self.assertEqual(done.value, 0)
        self.assertEqual(lines[0], f"config: valid ({path}); state folder"
                                   f" {daemon.embedded.folder.parent} (not created yet)")
        self.assertEqual(daemon.embedded.folder, home / "from-the-env" / "pg")
        self.assertEqual(tree(home), ["dpvoip.toml"])


class RefusedTests(CheckCase):
    """Each refusal in words, with what to do; exit status 1; never the password."""

    async def refused(self, url: str) -> str:
        status, lines = await self.check({"DATABASE_URL": url})
        self.assertEqual(status, 1, lines)
        self.assertEqual(len(lines), 2, lines)
        return lines[1]

    async def test_wrong_password(self) -> None:
        dsn = postgres().new_database()
        role = new_role(password=PASSWORD)
        line = await self.refused(as_user(dsn, role, PASSWORD[::-1]))
        self.assertTrue(line.startswith(f"database: cannot connect: wrong password ({role}@"),
                        line)
        self.assertIn(f"is not the one of user '{role}'", line)

    async def test_no_such_database(self) -> None:
        dsn = postgres().new_database()
        line = await self.refused(dsn.replace(database_of(dsn), "crm_typo"))
        self.assertIn('no such database (dpvoip@socket ', line)
        self.assertIn('database "crm_typo" does not exist', line)

    async def test_permission_denied(self) -> None:
        dsn = postgres().new_database()
        query(dsn, f"REVOKE CONNECT ON DATABASE {database_of(dsn)} FROM PUBLIC")
        role = new_role()
        line = await self.refused(as_user(dsn, role))
        self.assertIn("permission denied", line)
        self.assertIn(f"GRANT CONNECT ON DATABASE {database_of(dsn)} TO {role}", line)

    async def test_not_reachable(self) -> None:
        # A socket folder of this test's own with no server in it: no socket file, and no
        # other process can bind one there (a TCP port closed and bound again could be
        # taken by another test run meanwhile).
        folder = Path(tempfile.mkdtemp(prefix="dpvoip-no-server-"))  # short: a socket path
        self.addCleanup(folder.rmdir)
        line = await self.refused(f"postgresql://dpvoip:{PASSWORD}@/crm?host={folder}")
        self.assertTrue(line.startswith(f"database: NOT reachable (dpvoip@socket {folder}/crm):"
                                        " No such file or directory; nothing answers there"),
                        line)


class PrivilegeTests(CheckCase):
    async def test_a_user_without_grants_is_told_which(self) -> None:
        dsn = postgres().new_database()
        role = new_role()
        status, lines = await self.check({"DATABASE_URL": as_user(dsn, role)})
        self.assertEqual(status, 1)
        self.assertIn("privileges: MISSING (below)", self.line(lines, "database: reachable"))
        missing = self.line(lines, "privileges MISSING: ")
        self.assertIn(f"the database user '{role}' lacks privileges dpvoip needs: ", missing)
        self.assertIn("needs SELECT on public.accounting_clientprofile", missing)
        self.assertIn(f"needs CREATE on database {database_of(dsn)} for schema dpvoip",
                      missing)
        # Tables it cannot read are no "missing table": they are there.
        self.assertIn("CRM tables present: 0 of 12 (none); not readable by this user: ",
                      self.line(lines, "CRM tables present"))
        self.assertEqual([line for line in lines if line.startswith("CRM MISSING")], [])

    async def test_with_the_shipped_grants_nothing_is_missing(self) -> None:
        dsn = postgres().new_database(crm="2026-08")
        role = new_role()
        grant(dsn, role)
        status, lines = await self.check({"DATABASE_URL": as_user(dsn, role)})
        self.assertEqual(status, 0, lines)
        self.assertIn("privileges: all dpvoip needs", self.line(lines, "database: reachable"))
        self.assertIn("CRM tables present: 12 of 12", self.line(lines, "CRM tables present"))


class DaemonAccountTests(CheckCase):
    """What the daemon wrote is what the check shows (the daemon itself: test_check_daemon)."""

    async def test_each_box_as_the_daemon_reports_it(self) -> None:
        dsn = postgres().new_database()
        _, before = await self.check({"DATABASE_URL": dsn})
        self.assertEqual(self.line(before, "directory: "), "directory: not built yet (the"
                         " daemon builds it once its schema is ready)")
        await migrate(dsn)
        query(dsn, "INSERT INTO dpvoip.box_status (box, host, port, connected, since,"
                   " last_line_at, reconnects, lines, bad_lines, open_calls) VALUES"
                   " ('office', '127.0.0.1', 10120, true, now(), now(), 2, 9, 0, 0),"
                   " ('annex', '10.0.0.2', 1012, false, NULL, NULL, 5, 0, 0, 0)")
        status, lines = await self.check({"DATABASE_URL": dsn})
        self.assertEqual(status, 0, lines)
        office = self.line(lines, "Fritz!Box office ")
        self.assertTrue(office.startswith("Fritz!Box office (127.0.0.1:10120): connected"
                                          " since "), office)
        self.assertIn(", 2 reconnects, 0 bad lines; this configuration says fritz.box:1012"
                      " (the daemon runs with another configuration or environment than"
                      " this check)", office)
        self.assertEqual(self.line(lines, "Fritz!Box annex "),
                         "Fritz!Box annex (10.0.0.2:1012): NOT connected (since never), last"
                         " line none, 5 reconnects, 0 bad lines; reported by a daemon, not in"
                         " this configuration")


# -- what the lines say, from plain data -----------------------------------------------

NOON = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def report(connected: bool = True, age: float = 3.0) -> BoxReport:
    return BoxReport(connected, NOON, NOON, 0, 0, age)


class LinesTests(SynchronousTestCase):
    def test_a_configured_box_not_reported_yet(self) -> None:
        box = replace(FritzBoxSettings(), name="annex", host="10.0.0.2")
        self.assertEqual(box_lines([box], {}), [
            "Fritz!Box annex (10.0.0.2:1012): no state reported yet (is the daemon running?)"])

    def test_the_same_address_is_not_pointed_out(self) -> None:
        box = replace(FritzBoxSettings(), host="127.0.0.1", port=10120)
        seen = {"office": DaemonBox("office", "127.0.0.1", 10120, report())}
        [line] = box_lines([box], seen)
        self.assertEqual(line, "Fritz!Box office (127.0.0.1:10120): connected since"
                               " 2026-03-02 12:00:00 UTC, last line 2026-03-02 12:00:00 UTC,"
                               " 0 reconnects, 0 bad lines")

    def test_a_stale_report_says_the_daemon_may_be_gone(self) -> None:
        seen = {"office": DaemonBox("office", "fritz.box", 1012, report(False, 600))}
        [line] = box_lines([FritzBoxSettings()], seen)
        self.assertTrue(line.endswith("; last report 600s ago: daemon not running?"), line)

    def test_no_box_anywhere(self) -> None:
        self.assertEqual(box_lines([], {}), ["Fritz!Boxes: none configured"])

    def test_the_directory_as_built(self) -> None:
        built = DirectoryBuilt({"client": 3, "contact": 1}, {
            name: ("GR", NOON) for name in ("client", "contact", "lead", "company")})
        self.assertEqual(directory_line(built), "directory: 4 numbers indexed (client 3,"
                         " contact 1); built for region GR, refreshed up to 2026-03-02"
                         " 12:00:00 UTC")

    def test_a_directory_never_built_is_not_an_empty_one(self) -> None:
        self.assertEqual(directory_line(DirectoryBuilt({}, {})),
                         "directory: not built yet, 0 numbers indexed (none); the daemon"
                         " builds it once its schema is ready")
        empty = DirectoryBuilt({}, {name: ("GR", NOON) for name in (
            "client", "contact", "lead", "company")})
        self.assertTrue(directory_line(empty).startswith("directory: 0 numbers indexed (none);"
                                                         " built for region GR"))


async def migrate(dsn: str) -> None:
    """dpvoip's schema, as the daemon prepares it at start."""
    from dpvoip.config import DatabaseSettings
    from dpvoip.store.database import Store
    from dpvoip.store.dsn import connection_dsn
    from dpvoip.store.migrations import prepare
    from dpvoip.store.pool import HealingPool

    pool = HealingPool(reactor, connection_dsn(dsn, DatabaseSettings()), 1)
    await pool.start()
    try:
        await Store(pool, reactor).write(
            lambda cursor: prepare(cursor, standalone=False, crm_schema="public"))
    finally:
        pool.close()
