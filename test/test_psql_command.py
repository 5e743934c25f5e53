"""``dpvoip psql``: psql on the database dpvoip uses, psql's own arguments passed on.

The embedded case runs for real: the command, as a process, against the test suite's own
server (dpvoip's embedded-cluster code in a folder laid out as a state folder is). The
attached case: what psql is given, and that a password never reaches its command line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.config import Config, DaemonSettings, DatabaseSettings, Secret
from dpvoip.psql_command import split_config
from dpvoip.store.embedded import EmbeddedPostgres
from dpvoip.store.psql import PsqlError, psql_invocation, url_environment
from test.support.daemon import PATIENCE, REPO, clean_environment
from test.support.postgres import postgres


def attached(url: str) -> Config:
    return Config(database=replace(DatabaseSettings(), url=Secret(url)))


class ArgumentsTests(SynchronousTestCase):
    def test_a_leading_config_is_dpvoips_and_everything_else_psqls(self) -> None:
        self.assertEqual(split_config(["--config", "a.toml", "-c", "select 1"]),
                         ("a.toml", ["-c", "select 1"]))
        self.assertEqual(split_config(["--config=a.toml", "-At"]), ("a.toml", ["-At"]))
        self.assertEqual(split_config(["-c", "select 1", "--config", "x"]),
                         (None, ["-c", "select 1", "--config", "x"]))
        self.assertEqual(split_config([]), (None, []))


class AttachedTests(SynchronousTestCase):
    URL = "postgresql://crm:s3cr%40t@db.example:6543/crm?sslmode=require"

    def test_the_url_goes_through_the_environment_never_the_command_line(self) -> None:
        inherited = {"PATH": os.environ.get("PATH", ""), "PGPORT": "1", "PGPASSWORD": "old",
                     "PGSERVICE": "elsewhere", "LANG": "C"}
        invocation = psql_invocation(attached(self.URL), Path("/"), ["-c", "select 1"],
                                     inherited)
        self.assertEqual(invocation.argv[1:], ["-c", "select 1"])
        self.assertTrue(invocation.argv[0].endswith("psql"))
        self.assertNotIn("s3cr@t", " ".join(invocation.argv))
        self.assertEqual({k: v for k, v in invocation.env.items() if k.startswith("PG")},
                         {"PGHOST": "db.example", "PGPORT": "6543", "PGUSER": "crm",
                          "PGPASSWORD": "s3cr@t", "PGDATABASE": "crm",
                          "PGSSLMODE": "require"})
        self.assertEqual(invocation.env["LANG"], "C")

    def test_a_key_value_string_and_the_pool_settings_psql_does_without(self) -> None:
        self.assertEqual(url_environment("host=/run/pg dbname=crm keepalives=1"),
                         {"PGHOST": "/run/pg", "PGDATABASE": "crm"})

    def test_what_cannot_be_passed_is_named_without_its_value(self) -> None:
        with self.assertRaises(PsqlError) as refused:
            url_environment("host=db dbname=crm sslpassword=topsecret")
        self.assertIn("sslpassword", str(refused.exception))
        self.assertNotIn("topsecret", str(refused.exception))

    def test_an_unreadable_url_is_refused_without_its_password(self) -> None:
        with self.assertRaises(PsqlError) as refused:
            url_environment("postgresql://crm:hunter2@[db/crm")
        self.assertIn("cannot be read", str(refused.exception))
        self.assertNotIn("hunter2", str(refused.exception))


class EmbeddedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="dpvoip-psql-"))
        self.addCleanup(shutil.rmtree, self.home, True)

    def config_file(self, state: Path) -> Path:
        path = self.home / "dpvoip.toml"
        path.write_text(f'[daemon]\nstate_dir = "{state}"\n')
        return path

    def psql(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """``dpvoip psql ...`` as a user types it (this checkout's code)."""
        env = clean_environment(PGPORT="1", PGHOST="/nonexistent", PGDATABASE="nothing",
                                PYTHONPATH=str(REPO))
        return subprocess.run([sys.executable, "-m", "dpvoip.cli", "psql", *argv],
                              cwd=self.home, env=env, capture_output=True, text=True,
                              timeout=PATIENCE, check=False)

    def test_it_runs_a_query_on_the_embedded_server_with_psqls_arguments(self) -> None:
        server = postgres()  # a running embedded cluster in <folder>/pg: a state folder's
        config = self.config_file(server.folder)
        done = self.psql("--config", str(config), "-At", "-c",
                         "select current_database(), current_user", "-c", "select 1 + 1")
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(done.stdout.splitlines(), ["dpvoip|dpvoip", "2"])
        # psql's exit status is the command's.
        failed = self.psql("--config", str(config), "-v", "ON_ERROR_STOP=1", "-c",
                           "select nonsense")
        self.assertNotEqual(failed.returncode, 0)
        self.assertIn("nonsense", failed.stderr)

    def test_no_server_running_is_one_line_saying_what_to_do(self) -> None:
        state = self.home / "state"
        data = state / "pg" / "data"
        data.mkdir(parents=True)
        shutil.copy(postgres().folder / "pg" / "data" / "PG_VERSION", data / "PG_VERSION")
        done = self.psql("--config", str(self.config_file(state)), "-c", "select 1")
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stderr, f"dpvoip: the embedded PostgreSQL in {state / 'pg'} is "
                                      "not running: start dpvoip first (make start)\n")

    def test_no_embedded_database_yet(self) -> None:
        config = Config(daemon=DaemonSettings(state_dir=str(self.home / "state")))
        with self.assertRaises(PsqlError) as refused:
            psql_invocation(config, self.home, [], {})
        self.assertIn("no embedded database", str(refused.exception))
        self.assertFalse((self.home / "state").exists(), "psql creates nothing")

    def test_the_embedded_servers_own_psql_and_socket(self) -> None:
        cluster = postgres().cluster
        config = Config(daemon=DaemonSettings(state_dir=str(postgres().folder)))
        invocation = psql_invocation(config, Path("/"), ["-l"], {"PGUSER": "someone"},
                                     cluster=EmbeddedPostgres(cluster.folder))
        if (cluster.bindir / "psql").exists():
            self.assertEqual(invocation.program, str(cluster.bindir / "psql"))
        self.assertEqual(invocation.env, {"PGHOST": str(cluster.socket_dir), "PGPORT": "5432",
                                          "PGDATABASE": "dpvoip", "PGUSER": "dpvoip"})
