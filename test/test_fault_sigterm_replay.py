"""Fault test: SIGTERM while the spool is being replayed (issue 14, point 5).

The installed daemon (twistd) in a subprocess, on a PostgreSQL cluster of its own. With
the database stopped, thousands of signed webhooks are acknowledged from the spool; the
database comes back, the replay begins, and the daemon gets SIGTERM in the middle of it.
It must save its progress and exit cleanly within the systemd unit's stop timeout; the
next start replays exactly the rest: nothing acknowledged is lost, nothing applied twice,
and the records applied before the stop are not replayed again.

The steps follow the events, not the clock: SIGTERM is sent as soon as the database
holds the first replayed events, however long that takes on a busy machine.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from test.support.daemon import PATIENCE, Daemon, clean_environment, twistd
from test.support.postgres import private_cluster, query
from test.test_fault_kill import SECRET, Load

#: Events acknowledged from the spool while the database is down: enough that a replay
#: takes a few seconds even on a quick machine.
SPOOLED = 4000
UNIT = Path(__file__).parent.parent / "etc" / "dpvoip.service"


def stop_timeout() -> float:
    """The systemd unit's TimeoutStopSec: what an administrator's stop waits for."""
    found = re.search(r"^TimeoutStopSec=(\d+)", UNIT.read_text(), re.MULTILINE)
    assert found, "the unit sets TimeoutStopSec"
    return float(found.group(1))


class SigtermDuringReplayTest(SynchronousTestCase):
    def setUp(self) -> None:
        self.home, self.cluster, self.dsn = private_cluster(self, "dpvoip-fault-term-")
        self.config = self.home / "dpvoip.toml"
        self.config.write_text(
            f'[daemon]\nstate_dir = "{self.home / "state"}"\n'
            '[web]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            f'[zadarma]\nsecret = "{SECRET}"\ntimezone = "Europe/Athens"\n'
            'allowed_networks = ["127.0.0.1/32"]\n'
            '[spool]\ndeadline_seconds = 1.0\n'
            '[[fritzbox]]\nname = "office"\nhost = "127.0.0.1"\nport = 9\n'
        )

    def start(self) -> Daemon:
        daemon = Daemon(twistd("-n", "--pidfile=", "dpvoip", "--config", str(self.config)),
                        self.home, clean_environment(DATABASE_URL=self.dsn))
        self.addCleanup(daemon.kill)
        daemon.wait_listening()
        return daemon

    def journalled(self) -> list[tuple[Any, ...]]:
        return query(self.dsn, "SELECT pbx_call_id, event FROM dpvoip.zadarma_event")

    def test_sigterm_saves_the_replays_progress_and_the_next_start_replays_the_rest(
        self,
    ) -> None:
        daemon = self.start()
        daemon.wait_ready()
        self.cluster.stop(mode="fast")
        load = Load(int(daemon.url.rsplit(":", 1)[1]), rate=4000.0, threads=8)
        load.start()
        self.addCleanup(load.stop)
        load.wait_acknowledged(SPOOLED, timeout=4 * PATIENCE)
        load.stop()
        acknowledged = set(load.acknowledged)
        _, body = daemon.get("/readyz")
        spooled = body.get("spool", {})
        assert isinstance(spooled, dict)
        pending = spooled.get("pending")
        assert isinstance(pending, int), spooled
        self.assertGreaterEqual(pending, len(acknowledged), spooled)
        self.cluster.start()

        deadline = time.monotonic() + PATIENCE
        while not query(self.dsn, "SELECT 1 FROM dpvoip.zadarma_event LIMIT 1"):
            self.assertLess(time.monotonic(), deadline, "the replay never began")
            time.sleep(0.02)
        asked = time.monotonic()
        self.assertEqual(daemon.terminate(timeout=2 * stop_timeout()), 0)
        took = time.monotonic() - asked
        applied = self.journalled()
        output = daemon.output()

        again = self.start()
        again.wait_ready()
        deadline = time.monotonic() + 4 * PATIENCE
        spool: dict[str, object] = {}
        while time.monotonic() < deadline:
            _, body = again.get("/readyz")
            found = body.get("spool", {})
            assert isinstance(found, dict)
            spool = found
            if spool.get("pending") == 0 and not spool.get("spooling"):
                break
            time.sleep(0.2)
        stored = self.journalled()
        lost = acknowledged - set(stored)
        doubled = len(stored) - len(set(stored))
        replayed_again = spool.get("replayed")
        print(f"\nSIGTERM during replay: acknowledged {len(acknowledged)} from the spool,"
              f" applied before the stop {len(applied)}, stop took {took:.2f} s"
              f" (unit allows {stop_timeout():.0f} s), replayed by the next start"
              f" {replayed_again}, stored {len(set(stored))}, lost {len(lost)},"
              f" duplicated {doubled}")
        self.assertLess(took, stop_timeout(), output)
        self.assertGreater(len(applied), 0)
        self.assertLess(len(applied), len(acknowledged),
                        "SIGTERM came after the replay had finished: nothing was tested")
        self.assertEqual(lost, set())
        self.assertEqual(doubled, 0)
        self.assertEqual(replayed_again, len(acknowledged) - len(applied),
                         "the next start replays exactly what was not applied:\n" + output[-9000:])
        self.assertEqual(again.terminate(), 0)
