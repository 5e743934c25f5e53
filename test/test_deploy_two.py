"""The two-instance recipe's reverse proxy (``etc/haproxy/dpvoip.cfg``, docs/deployment.md
section 8), checked by HAProxy itself.

* ``haproxy -c`` on the shipped file, beside Debian's own ``haproxy.cfg`` as the recipe
  loads it, without a warning; and the check can fail.
* The shipped file live on 127.0.0.1 (its listener a socket the test bound and HAProxy
  inherited: ``bind fd@N``), in front of two stand-ins of dpvoip whose ``/readyz`` the
  test sets: the one answering 503 gets no request, it gets requests again once ready,
  and when neither is ready both still take them (their spools keep the webhooks).
  ``X-Forwarded-For`` reaches dpvoip as nginx sent it.

HAProxy is installed from Debian's package when missing (``test.support.
system_packages``); a machine that cannot have it fails the test, naming the package.
Its health checks run on its own clock (every 2 s, as shipped): the live tests wait for
the checks to arrive, never for a fixed time.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IListeningPort
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site

from dpvoip.config import LiveSettings
from test.support.system_packages import ensure
from test.support.waiting import until

reactor: Any = _reactor
ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "etc" / "haproxy" / "dpvoip.cfg"
DEBIAN_CFG = Path("/etc/haproxy/haproxy.cfg")
#: The addresses the shipped file names, which the live test points at its stand-ins.
LISTEN, HOST_A, HOST_B = "bind 127.0.0.1:8080", "10.0.0.11:8080", "10.0.0.12:8080"


def haproxy() -> str:
    return ensure("haproxy", "haproxy")


def check(*files: Path) -> subprocess.CompletedProcess[str]:
    arguments = [item for f in files for item in ("-f", str(f))]
    return subprocess.run([haproxy(), "-c", *arguments], capture_output=True, text=True,
                          timeout=60, check=False)


def seconds(value: str) -> float:
    """An HAProxy time (``60s``, ``2m``, ``500ms``, a bare number of ms) in seconds."""
    found = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert found is not None, value
    unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 0.001}[found.group(2)]
    return int(found.group(1)) * unit


class SyntaxTests(SynchronousTestCase):
    def test_the_shipped_file_passes_haproxy_c_beside_debians_own(self) -> None:
        if not DEBIAN_CFG.exists():
            self.fail(f"{DEBIAN_CFG} is missing: reinstall Debian's package "
                      "(`apt-get install --reinstall haproxy`)")
        done = check(DEBIAN_CFG, SHIPPED)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNotIn("[WARNING]", done.stderr)
        self.assertNotIn("[ALERT]", done.stderr)

    def test_haproxy_c_fails_on_a_broken_copy(self) -> None:
        """The check can fail: a health check expecting a status without a number."""
        with tempfile.TemporaryDirectory() as folder:
            broken = Path(folder) / "dpvoip.cfg"
            broken.write_text(SHIPPED.read_text().replace(
                "http-check expect status 200", "http-check expect status"))
            done = check(DEBIAN_CFG, broken) if DEBIAN_CFG.exists() else check(broken)
            self.assertNotEqual(done.returncode, 0)
            self.assertIn("[ALERT]", done.stderr)

    def test_idle_event_streams_outlive_the_heartbeat_and_only_failed_connects_retry(
            self) -> None:
        text = SHIPPED.read_text()
        code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        heartbeat = LiveSettings().heartbeat_seconds
        for side in ("client", "server"):
            found = re.search(rf"^\s*timeout {side} (\S+)", code, re.M)
            assert found is not None, side
            self.assertGreaterEqual(seconds(found.group(1)), 3 * heartbeat, side)
        self.assertIn("option httpchk GET /readyz", code)
        # a click-to-call POST that reached an instance may have dialled: never resent
        self.assertNotIn("retry-on", code)
        self.assertNotIn("forwardfor", code)


# -- HAProxy live in front of two stand-ins of dpvoip -------------------------------------


class StandIn(Resource):
    """A dpvoip as HAProxy sees it: ``/readyz`` answers 200 or 503 as the test sets
    ``ready``; any other request is counted, with the X-Forwarded-For it carried, and
    answered with the stand-in's name."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.ready = True
        self.checks = 0
        self.requests: list[tuple[bytes, str | None]] = []

    def render(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        if request.path == b"/readyz":
            self.checks += 1
            request.setResponseCode(200 if self.ready else 503)
            return b'{"ready": true}' if self.ready else b'{"ready": false}'
        forwarded = request.getHeader(b"X-Forwarded-For")
        self.requests.append((request.uri, forwarded.decode() if forwarded else None))
        return self.name.encode()


class LiveTests(TestCase):
    """The shipped file with its listener and servers pointed at the test's sockets."""

    timeout = 180  # a hang detector: HAProxy's checks run every 2 s on its own clock

    def setUp(self) -> None:
        program = haproxy()
        self.a, self.b = StandIn("a"), StandIn("b")
        ports = []
        for stand_in in (self.a, self.b):
            port: IListeningPort = reactor.listenTCP(0, Site(stand_in), interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            ports.append(port.getHost().port)  # type: ignore[attr-defined]
        self.http = HTTPConnectionPool(reactor, persistent=False)  # a connection a request
        self.addCleanup(self.http.closeCachedConnections)

        # HAProxy inherits a socket the test bound: no port is released and bound again.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        text = SHIPPED.read_text()
        for shipped in (LISTEN, HOST_A, HOST_B):
            self.assertIn(shipped, text, "etc/haproxy/dpvoip.cfg no longer names it")
        pointed = (text.replace(LISTEN, f"bind fd@{listener.fileno()}")
                   .replace(HOST_A, f"127.0.0.1:{ports[0]}")
                   .replace(HOST_B, f"127.0.0.1:{ports[1]}"))
        folder = Path(tempfile.mkdtemp(prefix="dpvoip-haproxy-"))
        self.addCleanup(shutil.rmtree, folder, True)  # after HAProxy stops (added later)
        (folder / "global.cfg").write_text("global\n    log stderr format raw local0 info\n")
        (folder / "dpvoip.cfg").write_text(pointed)
        self.log = folder / "haproxy.log"
        with self.log.open("w") as log:
            process = subprocess.Popen(
                [program, "-db", "-f", str(folder / "global.cfg"), "-f",
                 str(folder / "dpvoip.cfg")],
                stdout=log, stderr=subprocess.STDOUT, pass_fds=(listener.fileno(),))
        self.addCleanup(self._stop, process)

    def _stop(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.returncode not in (0, 143, -signal.SIGTERM):
            self.fail(f"haproxy exited {process.returncode}: {self.log.read_text()}")

    async def checked_again(self, *stand_ins: StandIn) -> None:
        """Wait until HAProxy has acted on what each stand-in's /readyz says now: three
        more checks (two decide, ``fall 2`` / ``rise 2``; the third shows the second's
        verdict was taken)."""
        marks = [(s, s.checks) for s in stand_ins]
        await until(lambda: all(s.checks >= seen + 3 for s, seen in marks), 90.0)

    async def request(self, forwarded: str = "203.0.113.5") -> tuple[int, str]:
        headers: dict[bytes | str, list[bytes | str]] = {
            "X-Forwarded-For": [forwarded],
            "Content-Type": ["application/x-www-form-urlencoded"]}
        response = await treq.post(f"http://127.0.0.1:{self.port}/voip/zd/",
                                   data=b"event=NOTIFY_START", headers=headers,
                                   pool=self.http)
        return int(response.code), (await response.content()).decode()

    async def served(self, count: int) -> Counter[str]:
        answers = [await self.request() for _ in range(count)]
        self.assertEqual({code for code, _ in answers}, {200}, self.log.read_text())
        return Counter(body for _, body in answers)

    async def test_the_instance_not_ready_gets_no_request_until_it_is(self) -> None:
        self.b.ready = False
        await self.checked_again(self.a, self.b)
        self.assertEqual(await self.served(10), {"a": 10})
        self.assertEqual(self.b.requests, [])  # only HAProxy's checks reached it
        self.b.ready = True
        await self.checked_again(self.b)
        self.assertEqual(await self.served(10), {"a": 5, "b": 5})

    async def test_with_neither_ready_both_still_take_requests_for_their_spools(self) -> None:
        self.a.ready = self.b.ready = False
        await self.checked_again(self.a, self.b)
        self.assertEqual(await self.served(6), {"a": 3, "b": 3})

    async def test_forwarded_for_reaches_dpvoip_as_nginx_sent_it(self) -> None:
        await self.checked_again(self.a, self.b)
        await self.request("198.51.100.7, 203.0.113.5")
        [(_, forwarded)] = self.a.requests + self.b.requests
        self.assertEqual(forwarded, "198.51.100.7, 203.0.113.5")
        # The access log names the path. HAProxy writes its line as the transaction ends,
        # which may be just after the client has read the answer: wait for it.
        await until(lambda: "/voip/zd/" in self.log.read_text())
        self.assertIn("/voip/zd/", self.log.read_text())
