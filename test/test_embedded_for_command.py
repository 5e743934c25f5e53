"""A one-off command (``dpvoip migrate``, ``lookup``, ``token``) on a state folder's
embedded PostgreSQL never pulls the server from under a daemon: without a daemon, the
command holds the folder's lock while it runs (a daemon started meanwhile refuses) and
stops the server it started; with one, it uses the daemon's server and leaves it
running. It used to start the server whenever it was down and stop it at the end, even
when a daemon had started on the folder and begun using it meanwhile."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.state_folder import AlreadyRunning, InstanceLock
from dpvoip.store.embedded import EmbeddedError, EmbeddedPostgres, for_command


class ForCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="dpvoip-for-command-"))
        self.state.chmod(0o755)
        self.addCleanup(shutil.rmtree, self.state, True)
        self.cluster = EmbeddedPostgres(self.state / "pg")
        self.addCleanup(self.stop_if_running)

    def stop_if_running(self) -> None:
        if self.cluster.running():
            self.cluster.stop("immediate")

    def daemon_holds_the_folder(self) -> None:
        lock = InstanceLock.acquire(self.state)  # as a running daemon does
        self.addCleanup(lock.release)

    def test_alone_it_holds_the_folder_and_stops_the_server_it_started(self) -> None:
        with for_command(self.state) as embedded:
            self.assertTrue(embedded.running())
            with self.assertRaises(AlreadyRunning):
                InstanceLock.acquire(self.state)  # a daemon starting now refuses
        self.assertFalse(self.cluster.running())
        InstanceLock.acquire(self.state).release()  # free again

    def test_a_server_it_found_running_is_left_running(self) -> None:
        self.cluster.start()
        with for_command(self.state) as embedded:
            self.assertTrue(embedded.running())
        self.assertTrue(self.cluster.running())

    def test_beside_a_daemon_it_uses_the_daemons_server_and_leaves_it_running(self) -> None:
        self.cluster.start()
        self.daemon_holds_the_folder()
        with for_command(self.state) as embedded:
            self.assertEqual(embedded.dsn(), self.cluster.dsn())
        self.assertTrue(self.cluster.running())

    def test_beside_a_daemon_whose_server_is_not_up_it_refuses_and_starts_nothing(self) -> None:
        self.daemon_holds_the_folder()
        with self.assertRaises(EmbeddedError) as raised, for_command(self.state):
            self.fail("no server to use")
        self.assertIn("another dpvoip", str(raised.exception))
        self.assertIn("its PostgreSQL is not up yet", str(raised.exception))
        self.assertFalse(self.cluster.running())
