"""The installed daemon as an administrator runs it: twistd, the .tac, the dpvoip command.

Each test starts real processes (twistd, the embedded PostgreSQL) listening on loopback
or unix sockets only, and stops them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.store.embedded import EmbeddedPostgres
from test.support.daemon import BIN, PATIENCE, REPO, Daemon, clean_environment, twistd
from test.support.postgres import postgres, query


def _alive(pid: int) -> bool:
    """Running, not merely an unreaped zombie (containers' init may not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class DaemonTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="dpvoip-daemon-"))
        self.home.chmod(0o755)
        self.addCleanup(shutil.rmtree, self.home, True)

    def write_config(self, text: str = "", web: str = "") -> Path:
        path = self.home / "dpvoip.toml"
        path.write_text(
            f'[daemon]\nstate_dir = "{self.home / "state"}"\n'
            '[web]\nlisten = "tcp:0:interface=127.0.0.1"\n' + web + text
        )
        return path

    def start(self, argv: list[str], **env: str) -> Daemon:
        daemon = Daemon(argv, self.home, clean_environment(**env))
        self.addCleanup(daemon.kill)
        self.addCleanup(self._stop_embedded)
        return daemon

    def _stop_embedded(self) -> None:
        cluster = EmbeddedPostgres(self.home / "state" / "pg")
        if cluster.initialised():
            cluster.stop(mode="immediate")

    def run_command(self, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), cwd=self.home, env=clean_environment(**env), capture_output=True,
            text=True, timeout=PATIENCE, check=False,
        )


class TwistdTests(DaemonTestCase):
    def test_help_lists_the_options(self) -> None:
        done = self.run_command(*twistd("dpvoip", "--help"))
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("--config", done.stdout)
        self.assertIn("DATABASE_URL", done.stdout)

    def test_plugin_cache_is_fresh_so_a_non_root_run_logs_no_cache_error(self) -> None:
        # Twisted rewrites a stale dropin.cache on every plugin lookup; a non-root user may
        # not, and logs an error each start. A fresh cache is never rewritten: prove it by
        # running twistd and checking that the installed cache did not change.
        site = Path(subprocess.check_output(
            [str(BIN / "python"), "-c", "import twisted, os; print(os.path.dirname("
             "twisted.__file__))"], text=True, cwd="/").strip())
        cache = site / "plugins" / "dropin.cache"
        self.assertTrue((site / "plugins" / "dpvoip_plugin.py").exists())
        self.assertTrue(cache.exists(), "the install step must build the plugin cache")
        before = cache.stat().st_mtime_ns, cache.read_bytes()
        self.assertIn(b"dpvoip", before[1])
        done = subprocess.run([*twistd("dpvoip", "--help")], cwd="/", capture_output=True,
                              text=True, timeout=PATIENCE, check=False,
                              env=clean_environment())
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual((cache.stat().st_mtime_ns, cache.read_bytes()), before)
        self.assertNotIn("cache", (done.stdout + done.stderr).lower())

    def test_standalone_start_ready_sigterm_and_reuse(self) -> None:
        config = self.write_config()
        daemon = self.start(twistd("-n", "--pidfile=", "dpvoip", "--config", str(config)))
        url = daemon.wait_listening()
        self.assertTrue(url.startswith("http://127.0.0.1:"))
        self.assertEqual(daemon.get("/healthz")[0], 200)
        ready = daemon.wait_ready()
        database = ready["database"]
        assert isinstance(database, dict)
        self.assertEqual(database["mode"], "standalone")
        self.assertTrue(database["embedded"])

        cluster = EmbeddedPostgres(self.home / "state" / "pg")
        server_pid = cluster.server_pid()
        assert server_pid is not None
        if os.geteuid() == 0:
            self.assertNotEqual(os.stat(f"/proc/{server_pid}").st_uid, 0,
                                "the embedded PostgreSQL must not run as root")
        tables = query(cluster.dsn(), "SELECT count(*) FROM information_schema.tables"
                                      " WHERE table_schema = 'public'")
        self.assertEqual(tables, [(12,)])

        self.assertEqual(daemon.terminate(), 0, daemon.output())
        self.assertFalse(cluster.running(), "the embedded PostgreSQL is stopped at shutdown")
        self.assertFalse(_alive(server_pid))
        self.assertIn("created the CRM tables", daemon.output())

        # The next start reuses the cluster and its data.
        again = self.start(twistd("-n", "--pidfile=", "dpvoip", "--config", str(config)))
        again.wait_listening()
        again.wait_ready()
        self.assertNotIn("created the CRM tables", again.output())
        self.assertEqual(again.terminate(), 0)

    def test_the_tac_file_starts_the_same_service_with_json_logs(self) -> None:
        config = self.write_config('[log]\nformat = "json"\n')
        daemon = self.start(
            twistd("-ny", str(REPO / "etc" / "dpvoip.tac"), "--pidfile="),
            DPVOIP_CONFIG=str(config),
        )
        daemon.wait_listening()
        self.assertEqual(daemon.wait_ready()["ready"], True)
        self.assertEqual(daemon.terminate(), 0)
        events = [json.loads(line) for line in daemon.output().splitlines()
                  if line.startswith("{")]
        self.assertTrue(any("listening on http://127.0.0.1:" in e["message"] for e in events))
        self.assertTrue(all({"time", "level", "namespace", "message"} <= set(e) for e in events))
        ready = [e for e in events if e["message"].startswith("database ready")]
        self.assertEqual(ready[0]["mode"], "standalone")

    def test_a_bad_config_stops_before_anything_starts_and_prints_no_secret(self) -> None:
        config = self.write_config(web='max_body_bytes = "big"\n')
        done = self.run_command(*twistd("-n", "dpvoip", "--config", str(config)),
                                ZADARMA_SECRET="zd-very-secret", SECRET_KEY="django-secret")
        self.assertEqual(done.returncode, 2)
        message = done.stderr.strip()
        self.assertEqual(len(message.splitlines()), 1, message)
        self.assertIn("[web] max_body_bytes", message)
        self.assertIn("expected an integer", message)
        self.assertNotIn("zd-very-secret", done.stdout + done.stderr)
        self.assertFalse((self.home / "state").exists(), "nothing may start")

    def test_an_unreadable_config_file_is_named(self) -> None:
        done = self.run_command(*twistd("-n", "dpvoip", "--config", str(self.home / "nope.toml")))
        self.assertEqual(done.returncode, 2)
        self.assertIn("nope.toml: cannot read the config file", done.stderr)

    def test_a_bad_secret_value_is_rejected_without_echoing_it(self) -> None:
        config = self.write_config()
        done = self.run_command(*twistd("-n", "dpvoip", "--config", str(config)),
                                DPVOIP_DATABASE_MODE="attached")
        self.assertEqual(done.returncode, 2)
        self.assertIn("mode 'attached' needs url", done.stderr)


class AttachedTests(DaemonTestCase):
    def test_refuses_to_start_on_a_crm_database_missing_tables(self) -> None:
        dsn = postgres().new_database(crm="2025-12")
        query(dsn, "DROP TABLE crm_deal CASCADE; ALTER TABLE auth_user DROP COLUMN password")
        daemon = self.start(
            twistd("-n", "--pidfile=", "dpvoip", "--config", str(self.write_config())),
            DATABASE_URL=dsn,
        )
        code = daemon.wait_exit()
        self.assertEqual(code, 1, daemon.output())
        output = daemon.output()
        self.assertIn("column auth_user.password; table crm_deal", output)
        self.assertEqual(query(dsn, "SELECT to_regclass('public.crm_deal')"), [(None,)])

    def test_starts_not_ready_while_postgres_is_down(self) -> None:
        url = "postgresql://crm:secret-pw@127.0.0.1:1/crm"
        daemon = self.start(
            twistd("-n", "--pidfile=", "dpvoip", "--config", str(self.write_config())),
            DATABASE_URL=url,
        )
        daemon.wait_listening()
        self.assertEqual(daemon.get("/healthz")[0], 200)
        status, body = daemon.get("/readyz")
        self.assertEqual(status, 503)
        database = body["database"]
        assert isinstance(database, dict)
        self.assertEqual(database["reachable"], False)
        self.assertEqual(database["mode"], "attached")
        self.assertEqual(daemon.terminate(), 0, daemon.output())
        self.assertNotIn("secret-pw", daemon.output())
        self.assertFalse((self.home / "state" / "pg").exists(), "no embedded server when attached")

    def test_attached_to_the_2026_08_crm_is_ready(self) -> None:
        dsn = postgres().new_database(crm="2026-08")
        daemon = self.start(
            twistd("-n", "--pidfile=", "dpvoip", "--config", str(self.write_config())),
            DATABASE_URL=dsn,
        )
        daemon.wait_listening()
        daemon.wait_ready()
        self.assertIn("CRM 2026-08 or newer", daemon.output())
        self.assertEqual(daemon.terminate(), 0)


class CommandTests(DaemonTestCase):
    def test_check_and_migrate_on_an_attached_crm(self) -> None:
        dsn = postgres().new_database(crm="2026-08")
        dpvoip = str(BIN / "dpvoip")
        before = self.run_command(dpvoip, "check", DATABASE_URL=dsn)
        self.assertEqual(before.returncode, 0, before.stderr)
        self.assertIn("mode: attached", before.stdout)
        self.assertIn("dpvoip schema: version 0", before.stdout)
        self.assertIn("CRM tables present: 12 of 12", before.stdout)
        self.assertIn("CRM version: 2026-08 or newer", before.stdout)
        migrated = self.run_command(dpvoip, "migrate", DATABASE_URL=dsn)
        self.assertEqual(migrated.returncode, 0, migrated.stderr)
        after = self.run_command(dpvoip, "check", DATABASE_URL=dsn)
        self.assertIn("(current)", after.stdout)
        self.assertIn("provider zadarma (Zadarma): ", after.stdout)
        self.assertLessEqual(len(after.stdout.splitlines()), 9)  # one line per thing

    def test_check_reports_missing_crm_tables_and_fails(self) -> None:
        dsn = postgres().new_database(crm="2025-12")
        query(dsn, "DROP TABLE voip_connection")
        done = self.run_command(str(BIN / "dpvoip"), "check", DATABASE_URL=dsn)
        self.assertEqual(done.returncode, 1)
        self.assertIn("CRM MISSING: table voip_connection", done.stdout)

    def test_check_says_when_the_database_is_unreachable(self) -> None:
        done = self.run_command(str(BIN / "dpvoip"), "check",
                                DATABASE_URL="postgresql://u:pw-123@127.0.0.1:1/db")
        self.assertEqual(done.returncode, 1)
        self.assertIn("database: NOT reachable", done.stdout)
        self.assertNotIn("pw-123", done.stdout + done.stderr)

    def test_migrate_in_standalone_mode_uses_the_embedded_server(self) -> None:
        config = self.write_config()
        done = self.run_command(str(BIN / "dpvoip"), "migrate", "--config", str(config))
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("mode: standalone", done.stdout)
        self.assertIn("created the CRM tables", done.stdout)
        self.assertFalse(EmbeddedPostgres(self.home / "state" / "pg").running())


class LookupCommandTests(DaemonTestCase):
    def test_lookup_finds_the_client_and_check_counts_the_directory(self) -> None:
        from test.support.crm import Crm

        dsn = postgres().new_database(crm="2025-12")
        crm = Crm(dsn)
        client = crm.client("Papadopoulos AE", email="info@example.gr",
                            kinito_tilefono="691 234 5678")
        crm.contact("Maria", "Ioannou", mobile="+30 210 555 1234")
        dpvoip = str(BIN / "dpvoip")
        self.assertEqual(self.run_command(dpvoip, "migrate", DATABASE_URL=dsn).returncode, 0)
        found = self.run_command(dpvoip, "lookup", "0030 6912345678", DATABASE_URL=dsn)
        self.assertEqual(found.returncode, 0, found.stderr)
        self.assertIn("+306912345678: Papadopoulos AE (1 record(s))", found.stdout)
        self.assertIn(f"client {client}: Papadopoulos AE <info@example.gr>", found.stdout)
        nobody = self.run_command(dpvoip, "lookup", "2109999999", DATABASE_URL=dsn)
        self.assertEqual(nobody.returncode, 1)
        self.assertIn("+302109999999: no CRM record", nobody.stdout)
        withheld = self.run_command(dpvoip, "lookup", "anonymous", DATABASE_URL=dsn)
        self.assertIn("not a number dpvoip matches", withheld.stdout)
        check = self.run_command(dpvoip, "check", DATABASE_URL=dsn)
        self.assertIn("directory: 2 numbers indexed (client 1, contact 1)", check.stdout)


class TokenCommandTests(DaemonTestCase):
    def test_create_list_and_revoke_a_token_for_a_crm_user(self) -> None:
        from test.support.crm import Crm

        dsn = postgres().new_database(crm="2025-12")
        anna = Crm(dsn).user("anna", password="x")
        dpvoip = str(BIN / "dpvoip")
        created = self.run_command(dpvoip, "token", "create", "--user", "anna", "--label",
                                   "crm script", DATABASE_URL=dsn)
        self.assertEqual(created.returncode, 0, created.stderr)
        token = created.stdout.strip().splitlines()[-1]
        self.assertTrue(token.startswith("dpv_"))
        stored = query(dsn, "SELECT user_id, label, token_sha256 FROM dpvoip.api_token")
        self.assertEqual([row[:2] for row in stored], [(anna, "crm script")])
        self.assertNotIn(token, str(stored))  # only the hash is kept
        listed = self.run_command(dpvoip, "token", "list", DATABASE_URL=dsn)
        self.assertRegex(listed.stdout, r"1\tanna\tcrm script\tcreated .*\tlast used never"
                                        r"\tactive")
        self.assertNotIn(token, listed.stdout)
        revoked = self.run_command(dpvoip, "token", "revoke", "1", DATABASE_URL=dsn)
        self.assertEqual((revoked.returncode, revoked.stdout.strip()), (0, "token 1 revoked"))
        again = self.run_command(dpvoip, "token", "revoke", "1", DATABASE_URL=dsn)
        self.assertEqual(again.returncode, 1)
        self.assertIn("revoked", self.run_command(dpvoip, "token", "list",
                                                  DATABASE_URL=dsn).stdout)

    def test_an_unknown_user_gets_no_token(self) -> None:
        dsn = postgres().new_database(crm="2025-12")
        done = self.run_command(str(BIN / "dpvoip"), "token", "create", "--user", "nobody",
                                DATABASE_URL=dsn)
        self.assertEqual(done.returncode, 1)
        self.assertIn("no active CRM user named 'nobody'", done.stderr)
        self.assertEqual(query(dsn, "SELECT count(*) FROM dpvoip.api_token"), [(0,)])
