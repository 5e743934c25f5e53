"""Fault test: dpvoip killed with SIGKILL under load, its database down, then started again.

The installed daemon (twistd) in a subprocess, on a PostgreSQL cluster of its own that the
test stops, so that events are spooled, and then the daemon is killed in the middle of a
load of signed webhooks. Started again with the database back, it replays its spool:
every event that got a 200 is in the database exactly once, and the Fritz!Box call the
kill left open is closed when the box reports its end.

The steps follow the events, not the clock: the database is stopped once the daemon has
acknowledged a number of events, and the daemon killed once it has acknowledged as many
more from its spool, however long that takes on a busy machine. About 10 s when idle.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.testing.fritzbox import box_time
from dpvoip.zadarma.signing import webhook_signature
from test.support.daemon import PATIENCE, Daemon, clean_environment, twistd
from test.support.postgres import private_cluster, query

SECRET = "kill-secret"
ZONE = ZoneInfo("Europe/Athens")
#: Events acknowledged with the database up, then as many again from the spool.
ACKNOWLEDGED_EACH_WAY = 60


class FakeBox:
    """A CallMonitor port served from a thread: lines go to the newest connection."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(connection)

    def wait_connections(self, count: int, timeout: float = PATIENCE) -> None:
        deadline = time.monotonic() + timeout
        while len(self.connections) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon never connected to the box ({count})")
            time.sleep(0.05)

    def send(self, line: str) -> None:
        self.connections[-1].sendall(line.encode() + b"\n")

    def close(self) -> None:
        self.server.close()
        for connection in self.connections:
            connection.close()


class Load:
    """Signed webhooks from a few threads; remembers which got a 200."""

    def __init__(self, port: int, rate: float = 150.0, threads: int = 4) -> None:
        self.port = port
        self.rate = rate
        self.threads = threads
        self.sent: list[tuple[str, str]] = []
        self.acknowledged: list[tuple[str, str]] = []
        self.answers: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._starts: dict[int, str] = {}  # a call's events share call_start, as Zadarma's

    def start(self) -> None:
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, args=(n,), daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(PATIENCE)

    def wait_acknowledged(self, count: int, timeout: float = PATIENCE) -> None:
        """Until ``count`` events in all got a 200."""
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.acknowledged)} of {count} events"
                                     f" acknowledged (answers {self.answers})")
            time.sleep(0.05)

    def _run(self, offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        n = offset
        while not self._stop.is_set():
            call, kind = divmod(n, 2)
            with self._lock:
                start = self._starts.setdefault(call, time.strftime("%Y-%m-%d %H:%M:%S"))
            form = {"event": "NOTIFY_START" if kind == 0 else "NOTIFY_END",
                    "pbx_call_id": f"in_kill{call:035d}",
                    "call_start": start,
                    "caller_id": f"69{call:08d}", "called_did": "302107654321"}
            if kind:
                form.update(duration="0", disposition="no answer", status_code="19",
                            is_recorded="0", calltype="normal")
            with self._lock:
                self.sent.append((form["pbx_call_id"], form["event"]))
            try:
                connection.request("POST", "/voip/zd/", body=urlencode(form), headers={
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Signature": webhook_signature(SECRET, form) or ""})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                status = 0
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                time.sleep(0.05)
            with self._lock:
                self.answers[status] = self.answers.get(status, 0) + 1
                if status == 200:
                    self.acknowledged.append((form["pbx_call_id"], form["event"]))
            n += self.threads
            time.sleep(self.threads / self.rate)
        connection.close()


class KillTest(SynchronousTestCase):
    def setUp(self) -> None:
        self.home, self.cluster, self.dsn = private_cluster(self, "dpvoip-fault-kill-")
        self.box = FakeBox()
        self.addCleanup(self.box.close)
        self.config = self.home / "dpvoip.toml"
        self.config.write_text(
            f'[daemon]\nstate_dir = "{self.home / "state"}"\n'
            '[web]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            f'[zadarma]\nsecret = "{SECRET}"\ntimezone = "Europe/Athens"\n'
            'allowed_networks = ["127.0.0.1/32"]\n'
            '[spool]\ndeadline_seconds = 1.0\n'
            f'[[fritzbox]]\nname = "office"\nhost = "127.0.0.1"\nport = {self.box.port}\n'
            'reconnect_initial_seconds = 0.1\nreconnect_max_seconds = 1.0\n'
        )

    def start(self) -> Daemon:
        daemon = Daemon(twistd("-n", "--pidfile=", "dpvoip", "--config", str(self.config)),
                        self.home, clean_environment(DATABASE_URL=self.dsn))
        self.addCleanup(daemon.kill)
        daemon.wait_listening()
        return daemon

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return query(self.dsn, sql)

    def test_acknowledged_events_survive_a_kill_and_the_open_call_is_recovered(self) -> None:
        daemon = self.start()
        daemon.wait_ready()
        self.box.wait_connections(1)
        self.box.send(f"{box_time(time.time(), ZONE)};RING;7;6911111111;2107654321;SIP0;")
        port = int(daemon.url.rsplit(":", 1)[1])
        load = Load(port)
        load.start()
        self.addCleanup(load.stop)
        load.wait_acknowledged(ACKNOWLEDGED_EACH_WAY)  # committed straight away
        self.cluster.stop(mode="fast")  # from now on the daemon spools
        down = len(load.acknowledged)  # every later 200 is an event in the spool
        load.wait_acknowledged(down + ACKNOWLEDGED_EACH_WAY)
        daemon.process.kill()  # SIGKILL, in the middle of the load
        daemon.process.wait(PATIENCE)
        load.stop()
        from_the_spool = len(load.acknowledged) - down
        self.cluster.start()

        again = self.start()
        again.wait_ready()
        self.box.wait_connections(2)
        self.box.send(f"{box_time(time.time(), ZONE)};DISCONNECT;7;0;")
        deadline = time.monotonic() + PATIENCE
        spool: dict[str, object] = {}
        while time.monotonic() < deadline:
            _, body = again.get("/readyz")
            found = body.get("spool", {})
            assert isinstance(found, dict)
            spool = found
            box_call = self.query("SELECT status, ended_at IS NOT NULL FROM"
                                  " accounting_voipcall WHERE phone_number = '+306911111111'")
            if spool.get("pending") == 0 and not spool.get("spooling") and box_call and \
                    box_call[0][1]:
                break
            time.sleep(0.2)
        journal = self.query("SELECT pbx_call_id, event, count(*) FROM dpvoip.zadarma_event"
                             " GROUP BY 1, 2")
        stored = {(pbx, event): count for pbx, event, count in journal}
        lost = [e for e in load.acknowledged if e not in stored]
        doubled = [e for e, count in stored.items() if count > 1]
        box_calls = self.query("SELECT call_id, status, ended_at IS NOT NULL FROM"
                               " accounting_voipcall WHERE phone_number = '+306911111111'")
        spooled = self.query("SELECT count(*) FROM dpvoip.zadarma_event")[0][0]
        print(f"\nSIGKILL under load: webhook events sent {len(load.sent)}, acknowledged"
              f" {len(load.acknowledged)} (answers {load.answers}), stored {len(stored)}"
              f" ({spooled} journal rows), lost {len(lost)}, duplicated {len(doubled)};"
              f" box call left open by the kill: {box_calls}")
        replayed = spool.get("replayed")
        assert isinstance(replayed, int), spool
        self.assertGreaterEqual(replayed, from_the_spool, "each spooled 200 came back")
        self.assertEqual(lost, [])
        self.assertEqual(doubled, [])
        self.assertEqual(len(box_calls), 1, "the open Fritz!Box call, once")
        self.assertTrue(box_calls[0][2], "and closed")
        self.assertIn("spool: ", again.output())  # it said what it replayed
        self.assertEqual(again.terminate(), 0)
