"""The installed daemon, started as the README says (``dpvoip run``), on one state folder:
a second start refuses at once and harms nothing, a postmaster killed under it is started
again, SIGHUP stops it in order with its embedded PostgreSQL, and a data folder of another
PostgreSQL major version is one line, not a traceback.

Real processes on loopback and unix sockets only; every wait is bounded (``PATIENCE``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.store.embedded import EmbeddedPostgres, postmaster_alive
from test.support.daemon import BIN, PATIENCE, Daemon, clean_environment
from test.test_embedded_version import installed_major


class InstanceTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="dpvoip-instance-"))
        self.home.chmod(0o755)
        self.addCleanup(shutil.rmtree, self.home, True)
        self.state = self.home / "state"
        self.config = self.home / "dpvoip.toml"
        self.config.write_text(f'fritzbox = []\n[daemon]\nstate_dir = "{self.state}"\n'
                               '[web]\nlisten = "tcp:0:interface=127.0.0.1"\n')
        self.cluster = EmbeddedPostgres(self.state / "pg")

    def run_dpvoip(self) -> Daemon:
        daemon = Daemon([str(BIN / "dpvoip"), "run", "--config", str(self.config)],
                        self.home, clean_environment())
        self.addCleanup(daemon.kill)
        self.addCleanup(self._stop_embedded)
        return daemon

    def _stop_embedded(self) -> None:
        cluster = EmbeddedPostgres(self.state / "pg")
        if cluster.initialised():
            cluster.stop(mode="immediate")

    def postmaster(self) -> int:
        pid = self.cluster.server_pid()
        assert pid is not None and postmaster_alive(pid), "no embedded PostgreSQL runs"
        return pid

    def wait_new_postmaster(self, old: int) -> int:
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            pid = self.cluster.server_pid()
            if pid is not None and pid != old and postmaster_alive(pid):
                return pid
            time.sleep(0.1)
        raise AssertionError("the embedded PostgreSQL was not started again")

    def wait_gone(self, pid: int) -> None:
        deadline = time.monotonic() + PATIENCE
        while postmaster_alive(pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"postmaster {pid} still runs")
            time.sleep(0.1)


class SecondStartTests(InstanceTestCase):
    def test_a_second_start_refuses_at_once_and_the_first_stays_ready(self) -> None:
        first = self.run_dpvoip()
        first.wait_listening()
        first.wait_ready()
        postmaster = self.postmaster()
        log_size = (self.state / "pg" / "postgres.log").stat().st_size

        second = subprocess.run(
            [str(BIN / "dpvoip"), "run", "--config", str(self.config)], cwd=self.home,
            env=clean_environment(), capture_output=True, text=True, timeout=PATIENCE,
            check=False)
        self.assertEqual(second.returncode, 1)
        self.assertEqual(second.stdout + second.stderr,
                         f"dpvoip: another dpvoip (pid {first.process.pid}) is running on "
                         f"this state folder {self.state}\n")

        # The first: still ready, its PostgreSQL the same process, nothing asked of it.
        self.assertEqual(first.get("/readyz")[0], 200)
        self.assertEqual(self.postmaster(), postmaster)
        self.assertEqual((self.state / "pg" / "postgres.log").stat().st_size, log_size)
        self.assertEqual(first.terminate(), 0, first.output())
        self.assertFalse(postmaster_alive(postmaster))
        # Once the first has stopped, the folder is free again.
        again = self.run_dpvoip()
        again.wait_listening()
        self.assertEqual(again.terminate(), 0, again.output())


class EmbeddedServerTests(InstanceTestCase):
    def test_a_killed_postmaster_is_started_again(self) -> None:
        daemon = self.run_dpvoip()
        daemon.wait_listening()
        daemon.wait_ready()
        killed = self.postmaster()
        os.kill(killed, signal.SIGKILL)
        started = self.wait_new_postmaster(killed)
        self.assertEqual(daemon.wait_ready()["ready"], True)
        self.assertIn(f"the embedded PostgreSQL (pid {killed}) is gone; starting it again",
                      daemon.output())
        self.assertIn(f"the embedded PostgreSQL runs again (pid {started})", daemon.output())
        self.assertEqual(daemon.terminate(), 0, daemon.output())
        self.assertFalse(postmaster_alive(started), "the restarted server is stopped too")

    def test_sighup_stops_in_order_with_the_embedded_postgresql(self) -> None:
        daemon = self.run_dpvoip()
        daemon.wait_listening()
        daemon.wait_ready()
        postmaster = self.postmaster()
        daemon.process.send_signal(signal.SIGHUP)
        self.assertEqual(daemon.wait_exit(), 0, daemon.output())
        output = daemon.output()
        self.assertIn("SIGHUP received", output)
        self.assertLess(output.index("SIGHUP received"), output.index("Main loop terminated"))
        self.assertFalse(postmaster_alive(postmaster), "the embedded PostgreSQL is stopped")
        self.assertFalse(self.cluster.running())

    def test_a_data_folder_of_another_major_version_is_one_line(self) -> None:
        data = self.state / "pg" / "data"
        data.mkdir(parents=True)
        (data / "PG_VERSION").write_text("9.4\n")
        daemon = self.run_dpvoip()
        self.assertEqual(daemon.wait_exit(), 1)
        output = daemon.output()
        self.assertNotIn("Traceback", output)
        self.assertNotIn("listening on", output)
        self.assertNotIn("pg_ctl", output)
        # One line (logged as critical, and on stderr, which twistd's log carries too).
        said = [line.split("] ", 1)[1] for line in output.splitlines()
                if "was made by PostgreSQL" in line]
        self.assertEqual(said[0], "dpvoip cannot run: embedded PostgreSQL failed to start: "
                                  f"the embedded database {data} was made by PostgreSQL 9.4, "
                                  "which is not installed (found: PostgreSQL "
                                  f"{installed_major()}): "
                                  "install PostgreSQL 9.4 to run it as it is, or dump it with "
                                  "PostgreSQL 9.4's pg_dumpall and move "
                                  f"{data.parent} aside (dpvoip then makes a new, empty one)")
        self.assertEqual(sorted(p.name for p in data.iterdir()), ["PG_VERSION"])
