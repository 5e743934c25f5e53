"""``dpvoip check`` beside a real daemon (the installed twistd and command, in
subprocesses), and the daemon as a database user with too few privileges.

The check finds the daemon's embedded server where the daemon's configuration puts it,
never starts it; it shows the boxes and the directory as the daemon has them, even when
its own environment says otherwise (an administrator's shell lacks the service's). A
daemon attached as a user without the grants exits at start naming them; with the
shipped grants (etc/grants.sql) it runs and records a missed call with its ticket.
"""

from __future__ import annotations

import re
import subprocess
import time

from dpvoip.store.embedded import EmbeddedPostgres
from dpvoip.store.migrations import MIGRATIONS
from test.support.crm import Crm
from test.support.daemon import BIN, PATIENCE, Daemon, clean_environment, twistd
from test.support.postgres import postgres, query
from test.test_daemon import DaemonTestCase
from test.test_privileges import as_user, database_of, grant, new_role

OWN = "2107654321"
#: Two missed calls, then a line an hour later: the box stays connected meanwhile. (Two:
#: a call ringing while the daemon is still replaying its spool at start may be closed as
#: "interrupted" by the start's clean-up; the second comes well after.)
SCRIPT = (f"2 {{now}};RING;0;6912345678;{OWN};SIP0;\n"
          "6 {now};DISCONNECT;0;0;\n"
          f"4 {{now}};RING;1;6987654321;{OWN};SIP0;\n"
          "6 {now};DISCONNECT;1;0;\n"
          f"3600 {{now}};RING;0;2101111111;{OWN};SIP0;\n")
_SERVING = re.compile(r"serving .* on 127\.0\.0\.1:(\d+)")


class CheckBesideTheDaemonTests(DaemonTestCase):
    def wait(self, condition: object, what: str, daemon: Daemon) -> None:
        """Poll ``condition()`` (a hang detector, not a speed requirement)."""
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            if condition():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise AssertionError(f"{what} never happened:\n{daemon.output()}")

    def fake_box(self) -> int:
        """``dpvoip fritz-sim`` on a port the system picks; the port it says it serves."""
        script = self.home / "office.txt"
        script.write_text(SCRIPT)
        output = self.home / "fritz-sim.log"
        with output.open("wb") as sink:
            simulator = subprocess.Popen(
                [str(BIN / "dpvoip"), "fritz-sim", str(script), "--port", "0"],
                cwd=self.home, env=clean_environment(), stdout=sink, stderr=subprocess.STDOUT)
        self.addCleanup(simulator.wait, PATIENCE)
        self.addCleanup(simulator.terminate)
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            found = _SERVING.search(output.read_text())
            if found:
                return int(found.group(1))
            if simulator.poll() is not None:
                raise AssertionError(f"fritz-sim exited:\n{output.read_text()}")
            time.sleep(0.05)
        raise AssertionError("fritz-sim never listened")

    def test_check_finds_the_daemons_embedded_server_and_never_starts_it(self) -> None:
        """The file names one state folder, the environment another (as systemd's unit
        does): the check, given both like the daemon, finds the daemon's server there;
        once the daemon has stopped it says so and leaves the server stopped."""
        config = self.write_config()
        config.write_text(config.read_text().replace(str(self.home / "state"), "from-file"))
        env = {"DPVOIP_DAEMON_STATE_DIR": str(self.home / "state"), "FRITZ_HOST": "127.0.0.1"}
        daemon = self.start([str(BIN / "dpvoip"), "run", "--config", str(config)], **env)
        daemon.wait_listening()
        daemon.wait_ready()
        running = self.run_command(str(BIN / "dpvoip"), "check", "--config", str(config),
                                   **env)
        self.assertEqual(running.returncode, 0, running.stdout + running.stderr)
        self.assertIn(f"state folder {self.home / 'state'}\n", running.stdout)
        self.assertIn(f"database: reachable, embedded PostgreSQL at dpvoip@socket"
                      f" {self.home / 'state' / 'pg' / 'run'}/dpvoip; mode: standalone",
                      running.stdout)
        self.assertIn(f"dpvoip schema: version {MIGRATIONS[-1].version} (current)",
                      running.stdout)
        self.assertEqual(daemon.terminate(), 0, daemon.output())
        cluster = EmbeddedPostgres(self.home / "state" / "pg")
        self.assertFalse(cluster.running())
        stopped = self.run_command(str(BIN / "dpvoip"), "check", "--config", str(config),
                                   **env)
        self.assertEqual(stopped.returncode, 0, stopped.stdout + stopped.stderr)
        self.assertIn(f"database: the embedded PostgreSQL in {self.home / 'state' / 'pg'} is"
                      " not running, so dpvoip is not running", stopped.stdout)
        self.assertFalse(cluster.running())
        self.assertFalse((self.home / "from-file").exists())

    def test_check_agrees_with_the_daemon_on_boxes_and_directory(self) -> None:
        """The daemon runs as a user with the shipped grants, reading a fake box given in
        its environment; the check, run without that environment, shows the box where
        the daemon reads it, and the directory the daemon built (as its /readyz does)."""
        dsn = postgres().new_database(crm="2025-12")
        crm = Crm(dsn)
        crm.client("Papadopoulos AE", kinito_tilefono="691 234 5678")
        crm.contact("Maria", "Ioannou", mobile="+30 210 555 1234")
        role = new_role()
        grant(dsn, role)
        url = as_user(dsn, role)
        port = self.fake_box()
        config = self.write_config()
        daemon = self.start(twistd("-n", "--pidfile=", "dpvoip", "--config", str(config)),
                            DATABASE_URL=url, DPVOIP_FRITZBOX_HOST="127.0.0.1",
                            DPVOIP_FRITZBOX_PORT=str(port), DPVOIP_DIRECTORY_OWN_NUMBERS=OWN)
        daemon.wait_listening()
        daemon.wait_ready()
        # A missed call made its ticket, as the dpvoip user: the grants are enough.
        self.wait(lambda: query(dsn, "SELECT count(*) > 0 FROM accounting_ticket") == [(True,)],
                  "the missed call's ticket", daemon)
        self.wait(lambda: query(dsn, "SELECT connected FROM dpvoip.box_status") == [(True,)],
                  "the box's report", daemon)
        _, ready = daemon.get("/readyz")
        directory = ready["directory"]
        assert isinstance(directory, dict)
        self.assertTrue(directory["built"])
        done = self.run_command(str(BIN / "dpvoip"), "check", "--config", str(config),
                                DATABASE_URL=url)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        lines = done.stdout.splitlines()
        self.assertIn("privileges: all dpvoip needs", lines[1])
        [box] = [line for line in lines if line.startswith("Fritz!Box office ")]
        self.assertTrue(box.startswith(f"Fritz!Box office (127.0.0.1:{port}): connected since"),
                        box)
        self.assertIn("this configuration says fritz.box:1012", box)
        [listing] = [line for line in lines if line.startswith("directory: ")]
        self.assertTrue(listing.startswith(
            f"directory: {directory['entries']} numbers indexed (client 1, contact 1);"
            " built for region GR"), listing)
        self.assertEqual(daemon.terminate(), 0, daemon.output())

    def test_a_daemon_without_the_grants_exits_naming_them(self) -> None:
        dsn = postgres().new_database(crm="2026-08")
        role = new_role()
        query(dsn, f"GRANT CONNECT ON DATABASE {database_of(dsn)} TO {role}")
        daemon = self.start(twistd("-n", "--pidfile=", "dpvoip", "--config",
                                   str(self.write_config())),
                            DATABASE_URL=as_user(dsn, role))
        self.assertEqual(daemon.wait_exit(), 1, daemon.output())
        output = daemon.output()
        # The exit line (on stderr; under twistd -n it is logged too), and nothing else.
        said = f"dpvoip: the database user '{role}' lacks privileges dpvoip needs: "
        found = [line for line in output.splitlines() if said in line]
        self.assertEqual(len(found), 1, output)
        line = found[0]
        self.assertIn(f"needs CREATE on database {database_of(dsn)} for schema dpvoip", line)
        self.assertIn("needs SELECT on public.accounting_clientprofile", line)
        self.assertTrue(line.endswith("(the grants: etc/grants.sql, also in the README)"), line)
        self.assertNotIn("Traceback", output)
        self.assertEqual(query(dsn, "SELECT to_regnamespace('dpvoip')"), [(None,)])
