"""Two or more installed daemons on one PostgreSQL, and one fake Fritz!Box they share.

``SharedBox`` is ``dpvoip.testing.fritzbox.FritzSimulator`` (the real CallMonitor line
protocol, on 127.0.0.1, every line to every connected client, as a box does) run by a
reactor of its own in a thread, so that a synchronous test of subprocess daemons can
place calls on it: ``play`` hands it a script and waits until it has been played.

``Instance`` is one daemon (``test.support.daemon.Daemon``) with its own state folder and
``[instance] name``; ``peek`` asks its ``/readyz`` with a short timeout, because a frozen
daemon (SIGSTOP) answers nothing. Each takes Zadarma's webhooks signed with
``WEBHOOK_SECRET``, with missed-call tickets.

``HealthCheckingProxy`` is the reverse proxy in front of the instances, as far as
webhooks go: each request to the next instance in turn, and when that one does not answer
(refused, reset, no answer within a few seconds, 5xx) the same request to the other.
``ZadarmaTraffic`` is Zadarma's PBX behind it: signed calls, START to END, played in a
thread until stopped, each event sent again until an instance acknowledges it (Zadarma
retries too), with what happened to each call kept for the test to compare with the rows.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit
from zoneinfo import ZoneInfo

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads
from twisted.internet.selectreactor import SelectReactor

from dpvoip.store.leases import NAMESPACE, box_key, instance_of
from dpvoip.testing.fritzbox import FritzSimulator, parse_script
from dpvoip.zadarma.signing import webhook_signature
from test.support.daemon import PATIENCE, Daemon, clean_environment, twistd
from test.support.postgres import query
from test.test_zadarma_webhook import ZADARMA, incoming

#: The Zadarma account's secret the instances check the webhooks' signatures with.
WEBHOOK_SECRET = "two-instances-zadarma-secret"
#: The account's time zone (``call_start`` is local to it).
ZONE = "Europe/Athens"


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
            'clock_tolerance_seconds = 0\n'
            f'[zadarma]\nsecret = "{WEBHOOK_SECRET}"\ntimezone = "{ZONE}"\n'
            'create_tickets = true\n')
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

    def webhooks(self) -> dict[str, float]:
        """This daemon's Zadarma webhook counters (``/metrics``): received, recorded,
        duplicates, unknown."""
        assert self.daemon is not None
        with urllib.request.urlopen(self.daemon.url + "/metrics",  # noqa: S310
                                    timeout=PATIENCE) as response:
            text = response.read().decode()
        return {sample.labels["outcome"]: sample.value
                for family in text_string_to_metric_families(text)
                if family.name == "dpvoip_zadarma_webhooks"
                for sample in family.samples if sample.name.endswith("_total")}

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


# -- Zadarma's webhooks through a reverse proxy with health checks ---------------------------


@dataclass
class Attempt:
    """One try of one request on one instance: who, and what came of it."""

    instance: str
    outcome: str  # "200", another status, "refused", "reset", "no answer", "down"


class HealthCheckingProxy:
    """The reverse proxy in front of the instances (its health checks passive, as
    nginx's ``max_fails``/``fail_timeout``): each request goes to the next instance in
    turn; one that does not answer (connection refused or reset, no answer within
    ``timeout`` seconds, a 5xx) is skipped for ``down_seconds`` and the same request
    goes at once to the other. It adds the sender's address as ``X-Forwarded-For``, as
    the deployment's proxy does (loopback is a trusted proxy by default)."""

    def __init__(self, instances: list[Instance], timeout: float = 3.0,
                 down_seconds: float = 5.0) -> None:
        self.instances = instances
        self.timeout = timeout
        self.down_seconds = down_seconds
        self._turn = itertools.count()
        self._down_until: dict[str, float] = {}

    def _order(self) -> list[Instance]:
        """The instances in the order this request tries them: the one whose turn it is
        first, unless it was marked down and its time is not up."""
        first = next(self._turn) % len(self.instances)
        turn = self.instances[first:] + self.instances[:first]
        now = time.monotonic()
        return sorted(turn, key=lambda i: self._down_until.get(i.name, 0.0) > now)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> list[Attempt]:
        """One round of the request over the instances, until one answers below 500;
        every attempt, in order (the last one answered, or none did)."""
        attempts = []
        for instance in self._order():
            outcome = self._post_to(instance, path, body, headers)
            attempts.append(Attempt(instance.name, outcome))
            if outcome.isdigit() and int(outcome) < 500:
                break
            self._down_until[instance.name] = time.monotonic() + self.down_seconds
        return attempts

    def _post_to(self, instance: Instance, path: str, body: bytes,
                 headers: dict[str, str]) -> str:
        daemon = instance.daemon
        if daemon is None or not daemon.url:
            return "down"  # not started, or started again and not listening yet
        where = urlsplit(daemon.url)
        connection = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port,
                                                timeout=self.timeout)
        try:
            connection.request("POST", path, body, {**headers, "X-Forwarded-For": ZADARMA})
            response = connection.getresponse()
            response.read()
            return str(response.status)
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "no answer"
        except (ConnectionError, http.client.HTTPException):
            return "reset"
        finally:
            connection.close()


@dataclass
class WebhookCall:
    """One call Zadarma placed: its id, caller, whether it was answered, and for each of
    its events the attempts it took."""

    pbx_call_id: str
    caller: str
    answered: bool
    events: list[list[Attempt]] = field(default_factory=list)

    @property
    def call_id(self) -> str:
        """Its ``accounting_voipcall.call_id``."""
        return f"zd-{self.pbx_call_id}"

    @property
    def status(self) -> str:
        """The status its row must have."""
        return "completed" if self.answered else "missed"

    @property
    def acknowledged(self) -> int:
        """Its events an instance answered 200."""
        return sum(1 for tries in self.events if tries and tries[-1].outcome == "200")

    @property
    def rerouted(self) -> int:
        """Its events that an instance did not answer and the other one took."""
        return sum(1 for tries in self.events if len(tries) > 1)


class ZadarmaTraffic:
    """Zadarma's PBX calling the office through ``proxy``, in a thread: incoming calls
    one after another (every other one answered on extension 100, the others missed:
    a ticket each), ``pause`` seconds between a call's events. Each event is sent again,
    round after round, until an instance acknowledges it or ``patience`` runs out.
    ``stop`` lets the call under way finish (its END sent) and returns."""

    def __init__(self, proxy: HealthCheckingProxy, numbers: itertools.count[int],
                 pause: float = 0.4, patience: float = PATIENCE) -> None:
        self.proxy = proxy
        self.numbers = numbers
        self.pause = pause
        self.patience = patience
        self.calls: list[WebhookCall] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def away(self, instance: str) -> int:
        """Requests that found ``instance`` not answering (or answering 5xx) so far."""
        return sum(1 for call in list(self.calls) for tries in list(call.events)
                   for a in tries if a.instance == instance and a.outcome != "200")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._call()
        except BaseException as error:  # said by ``stop``, in the test's thread
            self.error = error

    def _call(self) -> None:
        n = next(self.numbers)
        call = WebhookCall(f"in_{n:040x}", f"693{n:07d}", answered=n % 2 == 0)
        self.calls.append(call)
        start = datetime.now(ZoneInfo(ZONE)).strftime("%Y-%m-%d %H:%M:%S")
        events = incoming(call.caller, answered=call.answered, pbx=call.pbx_call_id,
                          start=start)
        for number, form in enumerate(events):
            if number:
                self._stop.wait(self.pause)  # a stop still sends the rest of the call
            call.events.append(self._deliver(form))

    def _deliver(self, form: dict[str, str]) -> list[Attempt]:
        signature = webhook_signature(WEBHOOK_SECRET, form)
        assert signature is not None, form
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "Signature": signature}
        body = urlencode(form).encode()
        attempts: list[Attempt] = []
        deadline = time.monotonic() + self.patience
        while True:
            attempts += self.proxy.post("/voip/zd/", body, headers)
            if attempts[-1].outcome.isdigit() and int(attempts[-1].outcome) < 500:
                return attempts
            if time.monotonic() > deadline:
                return attempts  # never acknowledged: the test says so
            time.sleep(0.2)  # both instances away: Zadarma sends it again a little later

    def stop(self) -> list[WebhookCall]:
        """Stop after the call under way; every call placed."""
        self._stop.set()
        self._thread.join(self.patience * 5)
        assert not self._thread.is_alive(), "Zadarma's traffic did not stop"
        if self.error is not None:
            raise AssertionError(f"Zadarma's traffic failed: {self.error!r}") from self.error
        return self.calls
