"""The privileges dpvoip needs in the CRM's database: the list, the shipped grants that give
exactly it (etc/grants.sql, the README's snippet), and which ones a user lacks, asked of
the test suite's real PostgreSQL; and why a connection failed, told apart."""

from __future__ import annotations

import itertools
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import psycopg2
from twisted.internet import reactor
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.config import DatabaseSettings
from dpvoip.crm.schema import REQUIRED
from dpvoip.store.database import Store
from dpvoip.store.dsn import ConnectProblem, classify, connection_dsn, reach
from dpvoip.store.pool import HealingPool
from dpvoip.store.privileges import NEEDS, MissingPrivileges, PrivilegeCheck, missing_privileges
from test.support.daemon import PATIENCE, REPO
from test.support.postgres import postgres, query
from test.support.waiting import until

GRANTS_SQL = REPO / "etc" / "grants.sql"
PASSWORD = "s3cret-Pw-42"  # what no message may ever show
_roles = itertools.count(1)

#: Members of this role must log in with their password (pg_hba.conf, added once to the
#: test server: everyone else keeps trusting the socket).
PASSWORD_GROUP = "dpvoip_test_password_users"


# -- the test server: roles, grants, password logins -----------------------------------


def new_role(password: str | None = None, login: bool = True) -> str:
    """A fresh role (cluster-wide, so named per process and test); with ``password``, one
    that must give it (see ``PASSWORD_GROUP``)."""
    name = f"dpvoip_t{os.getpid()}_{next(_roles)}"
    server = postgres()
    options = ("LOGIN" if login else "NOLOGIN") + (
        f" PASSWORD '{password}' IN ROLE {PASSWORD_GROUP}" if password else "")
    if password:
        require_passwords()
    query(server.cluster.dsn("postgres"), f"CREATE ROLE {name} {options}")
    return name


def require_passwords() -> None:
    """Put the password rule for ``PASSWORD_GROUP`` in front of the test server's
    pg_hba.conf (once) and wait until the server applies it: a reload is asynchronous."""
    server = postgres()
    hba = server.cluster.data / "pg_hba.conf"
    rule = f"local all +{PASSWORD_GROUP} scram-sha-256\n"
    if hba.read_text().startswith(rule):
        return
    admin = server.cluster.dsn("postgres")
    query(admin, f"DO $$ BEGIN CREATE ROLE {PASSWORD_GROUP} NOLOGIN; EXCEPTION WHEN"
                 " duplicate_object THEN NULL; END $$")
    probe = f"dpvoip_probe_{os.getpid()}"
    query(admin, f"CREATE ROLE {probe} LOGIN PASSWORD 'right' IN ROLE {PASSWORD_GROUP}")
    hba.write_text(rule + hba.read_text())
    query(admin, "SELECT pg_reload_conf()")
    deadline = time.monotonic() + PATIENCE  # a hang detector: the reload takes a moment
    while time.monotonic() < deadline:
        try:
            psycopg2.connect(f"host={server.cluster.socket_dir} dbname=postgres user={probe}"
                             " password=wrong").close()
        except psycopg2.OperationalError as error:
            if "password authentication failed" in str(error):
                return
            raise
        time.sleep(0.05)
    raise AssertionError("the test server never applied its pg_hba.conf")


def as_user(dsn: str, user: str, password: str | None = None) -> str:
    """``dsn`` (one of the test server's) for ``user`` instead of its superuser."""
    swapped = re.sub(r"\buser=\S+", f"user={user}", dsn)
    return swapped + (f" password={password}" if password is not None else "")


def database_of(dsn: str) -> str:
    found = re.search(r"\bdbname=(\S+)", dsn)
    assert found is not None
    return found.group(1)


def grant(dsn: str, role: str) -> None:
    """etc/grants.sql, run in ``dsn``'s database as its owner, for ``role`` (the file's
    ``dpvoip`` user: the test server's superuser has that name) and that database."""
    text = GRANTS_SQL.read_text()
    text = text.replace("ON DATABASE crm ", f"ON DATABASE {database_of(dsn)} ")
    text = re.sub(r"\bdpvoip\b(?![.'])", role, text)
    text = text.replace(f"CREATE ROLE {role} LOGIN PASSWORD 'change-me';", "")
    query(dsn, text)


def missing(dsn: str, schema: str = "public") -> list[str]:
    """What ``missing_privileges`` says the user of ``dsn`` lacks (blocking, for tests)."""
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            lacking = _run(missing_privileges(_SyncCursor(cursor), schema))
        return list(lacking.items)
    finally:
        connection.close()


class _SyncCursor:
    """A blocking psycopg2 cursor dressed as txpostgres' (``await cursor.execute``)."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    async def execute(self, sql: Any, params: Any = None) -> None:
        self._cursor.execute(sql, params)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> Any:
        return self._cursor.fetchall()


def _run(coroutine: Any) -> Any:
    """Run a coroutine that never waits on anything but ``_SyncCursor``."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine waited on something real")


# -- the list and the shipped grants ---------------------------------------------------


class NeedsTests(SynchronousTestCase):
    def test_every_crm_table_dpvoip_reads_is_granted(self) -> None:
        selected = {n.table for n in NEEDS if n.kind == "table" and n.privilege == "SELECT"}
        self.assertEqual(selected, set(REQUIRED))

    def test_every_write_in_the_store_is_in_the_list(self) -> None:
        """A new statement that writes a CRM table (or takes its ids) without its
        privilege in the list fails here, naming the file, the table and the operation."""
        granted = {(n.table, n.privilege) for n in NEEDS if n.kind == "table"}
        sequences = {n.table for n in NEEDS if n.kind == "sequence"}
        writes = re.compile(r"(INSERT INTO|UPDATE|DELETE FROM)\s+\{(?:self\._crm|crm)\}\.(\w+)"
                            r"|FOR (?:NO KEY )?UPDATE OF (\w+)")
        found: list[str] = []
        for path in sorted((REPO / "dpvoip" / "store").glob("*.py")):
            text = path.read_text()
            for match in writes.finditer(text):
                operation, table, locked = match.groups()
                if locked:
                    continue  # a row lock on a table the same statement updates
                privilege = operation.split()[0]
                if (table, privilege) not in granted:
                    found.append(f"{path.name}: {privilege} on {table}")
            if "pg_get_serial_sequence" in text and path.name != "privileges.py":
                for table in re.findall(r'f"\{crm_schema\}\.(\w+)"', text):
                    if table not in sequences:
                        found.append(f"{path.name}: USAGE on the id sequence of {table}")
        self.assertEqual(found, [])

    def test_the_readme_shows_the_shipped_grants(self) -> None:
        grants = GRANTS_SQL.read_text()
        statements = grants[grants.index("CREATE ROLE"):].rstrip("\n").splitlines()
        readme = (REPO / "README.md").read_text().splitlines()
        shown = [line.removeprefix("  ") for line in readme]
        start = shown.index(statements[0])
        self.assertEqual(shown[start:start + len(statements)], statements)
        self.assertEqual(shown[start - 1].strip(), "```sql")
        self.assertEqual(shown[start + len(statements)].strip(), "```")

    def test_the_grants_name_every_privilege_of_the_list(self) -> None:
        text = " ".join(GRANTS_SQL.read_text().split())
        for need in NEEDS:
            if need.kind == "table":
                statement = re.search(
                    rf"GRANT ([A-Z, ]+) ON [^;]*\bpublic\.{need.table}\b[^;]*;", text)
                self.assertIsNotNone(statement, need)
                assert statement is not None
                self.assertIn(need.privilege, statement.group(1).split(", "), need)
        self.assertIn("GRANT USAGE ON SEQUENCE public.accounting_voipcall_id_seq", text)
        self.assertIn("GRANT CONNECT, CREATE ON DATABASE crm", text)
        self.assertIn("GRANT USAGE ON SCHEMA public", text)


# -- which privileges a user lacks, asked of PostgreSQL ---------------------------------


class MissingPrivilegesTests(SynchronousTestCase):
    crm_version = "2025-12"

    def setUp(self) -> None:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.role = new_role()
        self.mine = as_user(self.dsn, self.role)

    def test_a_user_without_grants_is_told_each_one(self) -> None:
        lacking = missing(self.mine)
        database = database_of(self.dsn)
        self.assertIn(f"needs CREATE on database {database} for schema dpvoip", lacking)
        self.assertIn("needs SELECT on public.accounting_clientprofile", lacking)
        self.assertIn("needs SELECT, INSERT, UPDATE, DELETE on public.accounting_ticket",
                      lacking)
        self.assertIn("needs USAGE on sequence public.accounting_voipcall_id_seq (the old"
                      " monitor's endpoints reserve call ids)", lacking)
        # USAGE on public is PUBLIC's by default on PostgreSQL 15: not said when it is there.
        self.assertEqual(len(lacking), len({(n.kind, n.table) for n in NEEDS}) - 1)

    def test_the_shipped_grants_give_everything(self) -> None:
        grant(self.dsn, self.role)
        self.assertEqual(missing(self.mine), [])

    def test_one_revoked_privilege_is_named_alone(self) -> None:
        grant(self.dsn, self.role)
        query(self.dsn, f"REVOKE UPDATE ON public.crm_deal FROM {self.role}")
        self.assertEqual(missing(self.mine), ["needs UPDATE on public.crm_deal"])

    def test_a_missing_table_is_left_to_the_schema_check(self) -> None:
        grant(self.dsn, self.role)
        query(self.dsn, "DROP TABLE public.voip_connection")
        self.assertEqual(missing(self.mine), [])

    def test_dpvoip_own_schema_made_by_another_user(self) -> None:
        grant(self.dsn, self.role)
        query(self.dsn, "CREATE SCHEMA dpvoip; CREATE TABLE dpvoip.box_status (box text)")
        self.assertEqual(missing(self.mine), [
            "needs USAGE, CREATE on schema dpvoip",
            "needs SELECT, INSERT, UPDATE, DELETE on dpvoip.box_status"])

    def test_a_superuser_lacks_nothing(self) -> None:
        self.assertEqual(missing(self.dsn), [])


class MissingPrivilegesNewestCrmTests(MissingPrivilegesTests):
    crm_version = "2026-08"


# -- why a connection failed ------------------------------------------------------------

DSN = f"host=db.example port=5432 dbname=crm user=dpvoip password={PASSWORD}"


class ClassifyTests(SynchronousTestCase):
    """libpq's real messages (PostgreSQL 15, libpq 17), each told apart."""

    def kind(self, message: str) -> ConnectProblem:
        problem = classify(message, DSN)
        self.assertNotIn(PASSWORD, problem.line())
        return problem

    def test_each_kind_with_what_to_do(self) -> None:
        socket = 'connection to server on socket "/run/pg/.s.PGSQL.5432" failed: '
        cases = {
            socket + 'FATAL:  password authentication failed for user "dpvoip"\n':
                ("wrong password", "put the right one"),
            socket + "fe_sendauth: no password supplied\n": ("wrong password", "password"),
            socket + 'FATAL:  role "dpvoip" does not exist\n': ("no such user", "create it"),
            socket + 'FATAL:  database "crm" does not exist\n':
                ("no such database", "database name"),
            socket + 'FATAL:  permission denied for database "crm"\nDETAIL:  User does not'
                     " have CONNECT privilege.\n":
                ("permission denied", "GRANT CONNECT ON DATABASE crm TO dpvoip"),
            socket + 'FATAL:  role "dpvoip" is not permitted to log in\n':
                ("permission denied", "GRANT CONNECT"),
            'connection to server at "10.0.0.5", port 5432 failed: FATAL:  no pg_hba.conf'
            ' entry for host "10.0.0.9", user "dpvoip", database "crm", no encryption\n':
                ("permission denied", "pg_hba.conf"),
            'connection to server at "127.0.0.1", port 1 failed: Connection refused\n\tIs'
            " the server running on that host and accepting TCP/IP connections?\n":
                ("not reachable", "is PostgreSQL running"),
            socket + "No such file or directory\n\tIs the server running locally and"
                     " accepting connections on that socket?\n":
                ("not reachable", "listen_addresses"),
            'could not translate host name "db.example" to address: Name or service not'
            " known\n": ("not reachable", "host and port"),
            "timeout while connecting to PostgreSQL": ("not reachable", "firewall"),
            socket + "FATAL:  sorry, too many clients already\n":
                ("other", "PostgreSQL's own message"),
        }
        for message, (kind, advice) in cases.items():
            problem = self.kind(message)
            self.assertEqual(problem.kind, kind, message)
            self.assertIn(advice, problem.advice, message)
            self.assertEqual(problem.where, "dpvoip@db.example:5432/crm")
            self.assertNotIn("connection to server", problem.detail)
            self.assertNotIn("FATAL", problem.detail)

    def test_a_password_libpq_quotes_is_masked(self) -> None:
        problem = self.kind(f'invalid connection option "x" in "password={PASSWORD}"')
        self.assertEqual(problem.kind, "other")
        self.assertNotIn(PASSWORD, problem.detail)


class ReachTests(TestCase):
    """The real server's refusals, through the connection dpvoip makes (txpostgres)."""

    timeout = 2 * PATIENCE  # a hang detector

    async def problem(self, dsn: str) -> ConnectProblem:
        reached = await reach(reactor, connection_dsn(dsn, DatabaseSettings()), 5.0)
        if not isinstance(reached, ConnectProblem):
            reached.close()
            raise AssertionError(f"{dsn} connected")
        self.assertNotIn(PASSWORD, reached.line())
        return reached

    async def test_wrong_password(self) -> None:
        dsn = postgres().new_database()
        role = new_role(password=PASSWORD)
        problem = await self.problem(as_user(dsn, role, "not-" + PASSWORD))
        self.assertEqual(problem.kind, "wrong password")
        self.assertEqual(problem.detail, f'password authentication failed for user "{role}"')
        right = await reach(reactor, as_user(dsn, role, PASSWORD), 5.0)
        self.assertNotIsInstance(right, ConnectProblem)
        right.close()

    async def test_no_such_database(self) -> None:
        dsn = postgres().new_database()
        problem = await self.problem(dsn.replace(f"dbname={database_of(dsn)}",
                                                 "dbname=no_such_crm"))
        self.assertEqual(problem.kind, "no such database")
        self.assertIn("'no_such_crm'", problem.advice)

    async def test_permission_denied(self) -> None:
        dsn = postgres().new_database()
        query(dsn, f"REVOKE CONNECT ON DATABASE {database_of(dsn)} FROM PUBLIC")
        problem = await self.problem(as_user(dsn, new_role()))
        self.assertEqual(problem.kind, "permission denied")
        self.assertIn(f"GRANT CONNECT ON DATABASE {database_of(dsn)}", problem.advice)

    async def test_not_reachable(self) -> None:
        # A socket folder with no server in it: libpq finds no socket file there. Nothing
        # can appear in it (the folder is this test's own), so, unlike a TCP port closed
        # and bound again, no other process can answer in its place.
        folder = Path(tempfile.mkdtemp(prefix="dpvoip-no-server-"))  # short: a socket path
        self.addCleanup(folder.rmdir)  # fails if anything appeared in it
        problem = await self.problem(f"host={folder.absolute()} dbname=crm user=dpvoip"
                                     f" password={PASSWORD}")
        self.assertEqual(problem.kind, "not reachable")
        self.assertEqual(problem.detail, "No such file or directory")
        self.assertEqual(list(folder.iterdir()), [])

    async def test_missing_privileges_through_the_pool(self) -> None:
        dsn = postgres().new_database()
        role = new_role()
        pool = HealingPool(reactor, connection_dsn(as_user(dsn, role), DatabaseSettings()), 1)
        self.addCleanup(pool.close)
        await pool.start()
        lacking = await Store(pool, reactor).write(
            lambda cursor: missing_privileges(cursor, "public"))
        self.assertIn(f"the database user '{role}' lacks privileges dpvoip needs: ",
                      lacking.line())
        self.assertIn("needs SELECT, UPDATE on public.crm_contact", lacking.line())
        self.assertIn("etc/grants.sql", lacking.line())


class PrivilegeCheckTests(TestCase):
    """The daemon's check at start (attached mode), on the real server."""

    timeout = 2 * PATIENCE  # a hang detector

    def service(self, dsn: str, store: Any = None) -> tuple[PrivilegeCheck, list[str],
                                                             list[Any]]:
        said: list[str] = []
        listeners: list[Any] = []
        check = PrivilegeCheck(reactor, connection_dsn(dsn, DatabaseSettings()), "public", 5.0,
                               store, listeners.append, said.append)
        self.addCleanup(check.stopService)
        return check, said, listeners

    async def test_a_missing_grant_stops_the_start_with_its_line(self) -> None:
        dsn = postgres().new_database()
        role = new_role()
        grant(dsn, role)
        query(dsn, f"REVOKE SELECT ON public.django_session FROM {role}")
        check, said, _ = self.service(as_user(dsn, role))
        with self.assertRaises(MissingPrivileges):
            await check.startService()
        self.assertEqual(said, [f"the database user '{role}' lacks privileges dpvoip needs:"
                                " needs SELECT on public.django_session (the grants:"
                                " etc/grants.sql, also in the README)"])

    async def test_the_shipped_grants_pass(self) -> None:
        dsn = postgres().new_database(crm="2026-08")
        role = new_role()
        grant(dsn, role)
        check, said, _ = self.service(as_user(dsn, role))
        await check.startService()
        self.assertEqual(said, [])

    async def test_unreachable_at_start_checked_when_the_pool_connects(self) -> None:
        """PostgreSQL away at start: the reason is logged (no password), the start goes
        on, and the check runs on the daemon's pool when the pool says it is back."""
        folder = Path(tempfile.mkdtemp(prefix="dpvoip-no-server-"))  # short: a socket path
        self.addCleanup(folder.rmdir)
        dsn = postgres().new_database()
        pool = HealingPool(reactor, connection_dsn(as_user(dsn, new_role()),
                                                   DatabaseSettings()), 1)
        self.addCleanup(pool.close)
        logged: list[str] = []

        observe = cast(ILogObserver, lambda event: logged.append(formatEvent(event)))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        check, said, listeners = self.service(
            f"host={folder} dbname=crm user=dpvoip password={PASSWORD}", Store(pool, reactor))
        await check.startService()
        self.assertEqual(said, [])
        [line] = [text for text in logged if text.startswith("database: not reachable")]
        self.assertIn("No such file or directory", line)
        self.assertNotIn(PASSWORD, "\n".join(logged))
        await pool.start()
        [listener] = listeners
        listener()  # the pool's news: a connection is back
        await until(lambda: said)
        self.assertIn("needs SELECT on public.accounting_clientprofile", said[0])
