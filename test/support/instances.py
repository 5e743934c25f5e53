"""Two or more installed daemons on one PostgreSQL, and one fake Fritz!Box they share.

``SharedBox`` is ``dpvoip.testing.fritzbox.FritzSimulator`` (the real CallMonitor line
protocol, on 127.0.0.1, every line to every connected client, as a box does) run by a
reactor of its own in a thread, so that a synchronous test of subprocess daemons can
place calls on it: ``play`` hands it a script and waits until it has been played.

``Instance`` is one daemon (``test.support.daemon.Daemon``) with its own state folder and
``[instance] name``; ``peek`` asks its ``/readyz`` with a short timeout, because a frozen
daemon (SIGSTOP) answers nothing.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.internet.selectreactor import SelectReactor

from dpvoip.store.leases import NAMESPACE, box_key, instance_of
from dpvoip.testing.fritzbox import FritzSimulator, parse_script
from test.support.daemon import PATIENCE, Daemon, clean_environment, twistd
from test.support.postgres import query


class SharedBox:
    """A fake box served from a private reactor in a thread (the test's own thread
    stays free to drive the daemons)."""

    def __init__(self, timezone: str = "Europe/Athens") -> None:
        self.reactor = SelectReactor()
        self.simulator = FritzSimulator(self.reactor, parse_script(""), timezone)
        self._thread = threading.Thread(
            target=self.reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        self._thread.start()
        self.port = int(self._call(lambda: self.simulator.listen(0)))

    def _call(self, work: Any) -> Any:
        return threads.blockingCallFromThread(self.reactor, work)

    @property
    def connections(self) -> int:
        """Connections accepted so far (a new leader's connection adds one)."""
        return self.simulator.connections

    @property
    def connected(self) -> int:
        return self.simulator.connected

    def play(self, script: str) -> None:
        """Play ``script`` (the simulator's format, ``{now}`` for the box's time) to the
        clients connected now; returns once it has been played."""
        def run() -> Any:
            self.simulator.script = parse_script(script)
            return self.simulator.run()

        self._call(run)

    def close(self) -> None:
        try:
            self._call(self.simulator.stop)
        finally:
            self.reactor.callFromThread(self.reactor.stop)
            self._thread.join(PATIENCE)


class Instance:
    """One installed daemon among several: its name, its own state folder."""

    def __init__(self, home: Path, name: str, dsn: str, box_port: int) -> None:
        self.name = name
        self.home = home / name
        self.home.mkdir(parents=True, exist_ok=True)
        self.config = self.home / "dpvoip.toml"
        self.config.write_text(
            f'[daemon]\nstate_dir = "{self.home / "state"}"\n'
            f'[instance]\nname = "{name}"\n'
            '[web]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            '[directory]\nown_numbers = ["2107654321"]\n'
            f'[[fritzbox]]\nname = "office"\nhost = "127.0.0.1"\nport = {box_port}\n'
            'reconnect_initial_seconds = 0.1\nreconnect_max_seconds = 1.0\n'
            'clock_tolerance_seconds = 0\n')
        self.dsn = dsn
        self.daemon: Daemon | None = None

    def start(self) -> Daemon:
        self.daemon = Daemon(
            twistd("-n", "--pidfile=", "dpvoip", "--config", str(self.config)), self.home,
            clean_environment(DATABASE_URL=self.dsn))
        self.daemon.wait_listening()
        return self.daemon

    def peek(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The box as this daemon's ``/readyz`` shows it; None when it does not answer
        (stopped, frozen, killed)."""
        if (self.daemon is None or not self.daemon.url
                or self.daemon.process.poll() is not None):
            return None
        try:
            with urllib.request.urlopen(self.daemon.url + "/readyz",  # noqa: S310
                                        timeout=timeout) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = json.loads(error.read())
        except OSError:
            return None
        [box] = body["fritzbox"]
        return dict(box)

    def wait_role(self, role: str, timeout: float = PATIENCE) -> None:
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = self.peek()
            if seen is not None and seen.get("role") == role:
                return
            time.sleep(0.1)
        assert self.daemon is not None
        raise AssertionError(f"{self.name} never became {role}: {seen}\n"
                             f"{self.daemon.output()[-4000:]}")


def lock_holders(dsn: str, box: str) -> list[str]:
    """The lease sessions holding ``box``'s lock now, by instance name (pg_locks)."""
    rows = query(dsn, "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a"
                      " ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.objsubid = 2"
                      " AND l.granted AND l.classid = %s::oid AND l.objid = %s::oid",
                 (NAMESPACE, box_key(box)))
    return [instance_of(name) or str(name) for (name,) in rows]


class Sampler:
    """Samples, every ``every`` seconds in a thread, who leads the box: the lock's
    holders in ``pg_locks`` and each answering instance's ``/readyz``."""

    def __init__(self, dsn: str, instances: list[Instance], every: float = 0.2) -> None:
        self.dsn = dsn
        self.instances = instances
        self.every = every
        self.samples = 0
        self.too_many: list[str] = []  # what was seen at a moment with two leaders
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            holders = lock_holders(self.dsn, "office")
            saying = [i.name for i in self.instances
                      if (seen := i.peek(0.5)) is not None and seen.get("leader")]
            self.samples += 1
            if len(holders) > 1 or len(saying) > 1:
                self.too_many.append(f"locks held by {holders}, leaders by /readyz {saying}")
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(PATIENCE)
