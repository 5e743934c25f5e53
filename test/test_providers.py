"""Providers as plugins, in memory: how a kind is found, which provider a connection
dials through, the Zadarma kind built behind the interface (its webhook URLs, dialling,
health and figures), and a provider's web part served beside dpvoip's own routes."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry, generate_latest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from dpvoip.calls.ingest import Origin, ZadarmaContext
from dpvoip.click_to_call.callbacks import ClickToCall, NoRecording
from dpvoip.click_to_call.logins import CrmUser
from dpvoip.config import Secret, ZadarmaSettings
from dpvoip.core.dialling_policy import DiallingPolicy
from dpvoip.core.happenings import Happening
from dpvoip.core.numbers import Dialling
from dpvoip.providers import discovery
from dpvoip.providers.assembly import (
    ProvidersCollector,
    WiringError,
    build_all,
    check_lines,
    choice,
    senders,
)
from dpvoip.providers.choice import ProviderChoice
from dpvoip.providers.interface import (
    DialRequest,
    Provider,
    ProviderConfig,
    ProviderError,
    ProviderHealth,
    ProviderTools,
    RecordingGone,
    WebPart,
)
from dpvoip.readiness import ReadinessReport
from dpvoip.testing.memory import MemoryCallbacks, MemoryRecorder, MemoryZadarmaApi
from dpvoip.web.app import Readiness, WebApp
from dpvoip.zadarma.dialling import ZadarmaDialler
from dpvoip.zadarma.provider import KIND, SpoolContext, ZadarmaProvider, main_provider
from dpvoip.zadarma.signing import webhook_signature
from test.test_service import (
    FakeBox,
    FakeBoxStatus,
    FakeDatabase,
    FakeDirectory,
    FakeDurable,
    FakeSpool,
)

PLUGINS = Path(__file__).parent / "plugins"
ANNA = CrmUser(1, "anna", "Anna Papa", "jwt")
CLIENT = "2101234567"
EVENT = {"event": "NOTIFY_START", "pbx_call_id": "in_" + "b" * 40,
         "call_start": "2026-01-15 10:00:00", "caller_id": "6912345678",
         "called_did": "302107654321"}


def with_plugins(case: SynchronousTestCase) -> None:
    """``test/plugins`` on ``sys.path`` for this test: its dist-infos found as installed."""
    sys.path.insert(0, str(PLUGINS))
    case.addCleanup(sys.path.remove, str(PLUGINS))


@dataclass
class Recorder(MemoryRecorder):
    """The durable ingest as providers see it: happenings and Zadarma's events."""

    happenings: list[tuple[Happening, Origin]] = field(default_factory=list)

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]:
        self.happenings.append((happening, origin))
        return succeed(None)


def tools(recorder: Any = None, reactor: Any = None) -> ProviderTools:
    return ProviderTools(
        reactor=reactor or MemoryReactorClock(), recorder=recorder or Recorder(),
        store=cast(Any, None), crm_schema="public", region=Dialling("GR"),
        own_numbers=frozenset(), office_zone=ZoneInfo("Europe/Athens"),
        trusted_proxies=(), state_folder=Path("/nonexistent"),
        schema_prepared=lambda: succeed(None), spool_replayed=lambda: succeed(None))


def zadarma(name: str, secret: str, recorder: Any = None,
            **settings: Any) -> ZadarmaProvider:
    configured = replace(ZadarmaSettings(), secret=Secret(secret),
                         allowed_networks=("127.0.0.1/32",), **settings)
    return KIND.build(name, configured, tools(recorder))


class DiscoveryTests(SynchronousTestCase):
    def test_a_kind_packaged_outside_dpvoip_is_found_by_its_entry_point(self) -> None:
        self.assertNotIn("echo", discovery.installed())
        with_plugins(self)
        kinds = discovery.installed()
        self.assertEqual(sorted(kinds), ["asterisk", "echo", "zadarma"])
        echo = discovery.load("echo", kinds)
        self.assertEqual(echo.kind, "echo")
        self.assertEqual(type(echo).__module__, "dpvoip_echo_provider")

    def test_the_built_in_kind_needs_no_entry_point(self) -> None:
        self.patch(discovery, "entry_points", lambda group: [])
        kinds = discovery.installed()
        self.assertEqual(list(kinds), ["zadarma", "asterisk"])
        self.assertIs(discovery.load("zadarma", kinds), KIND)

    def test_unknown_and_wrong_kinds_are_refused(self) -> None:
        with self.assertRaises(LookupError) as unknown:
            discovery.load("asterisk", {"zadarma": lambda: KIND})
        self.assertEqual(str(unknown.exception.args[0]),
                         "unknown kind 'asterisk' (installed: zadarma)")
        with self.assertRaises(TypeError):
            discovery.load("sip", {"sip": lambda: KIND})


@dataclass
class FakeDialler:
    """A dialler of these tests: what it was asked, or the refusal or failure it gives."""

    refuses: str | None = None
    fails: ProviderError | None = None
    dialled: list[DialRequest] = field(default_factory=list)

    def refusal(self, call: DialRequest) -> str | None:
        return self.refuses

    async def dial(self, call: DialRequest) -> None:
        if self.fails is not None:
            raise self.fails
        self.dialled.append(call)


class Teapot(ProviderError):
    status = 418


@dataclass
class Links:
    known: dict[str, str]
    asked: list[str] = field(default_factory=list)

    async def recording_link(self, recording: str) -> str:
        self.asked.append(recording)
        if recording not in self.known:
            raise RecordingGone(f"gone from {sorted(self.known)}")
        return self.known[recording]


class ChoiceTests(SynchronousTestCase):
    def test_the_connections_provider_is_matched_by_name_whatever_its_case(self) -> None:
        zd, pbx = FakeDialler(), FakeDialler()
        chosen = ProviderChoice([("zadarma", zd), ("office-pbx", pbx)])
        for written, name in (("Zadarma", "zadarma"), (" ZADARMA ", "zadarma"),
                              ("Office-PBX", "office-pbx")):
            found = chosen.for_connection(written)
            assert found is not None
            self.assertEqual(found.name, name)
        for unknown in ("Asterisk", "", "zadarma2"):
            self.assertIsNone(chosen.for_connection(unknown))
        self.assertEqual(
            chosen.refusal(3, "Asterisk"),
            "your connection 3 calls through the provider 'Asterisk', which dpvoip is not "
            "configured for (it has: office-pbx, zadarma); ask your administrator")


class ClickToCallTests(SynchronousTestCase):
    """``ClickToCall`` over the in-memory tables: the connection's provider dials."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.records = MemoryCallbacks()
        self.api = MemoryZadarmaApi(self.clock)
        self.pbx = FakeDialler()
        self.zadarma = FakeDialler()

    def calls(self, providers: Any) -> ClickToCall:
        return ClickToCall(self.records, providers,
                           DiallingPolicy(frozenset({"GR"}), (), False), Dialling("GR"),
                           100, self.clock)

    def dial(self, calls: ClickToCall, connection: int, sip: str = "") -> Any:
        done = Deferred.fromCoroutine(calls.dial(ANNA, str(connection), CLIENT, sip))
        return self.successResultOf(done)

    def test_each_connection_dials_through_its_own_provider(self) -> None:
        calls = self.calls(ProviderChoice([("zadarma", ZadarmaDialler(self.api)),
                                           ("pbx", self.pbx)]))
        desk = self.records.add_connection(ANNA.id, "210-765 4321", provider="PBX",
                                           type="sip")
        cloud = self.records.add_connection(ANNA.id, "100", provider="Zadarma")
        outcome = self.dial(calls, desk, sip="100")
        self.assertEqual((outcome.status, outcome.number), (200, "+302101234567"))
        [asked] = self.pbx.dialled
        self.assertEqual((asked.line, asked.ring_first, asked.number, asked.sip,
                          asked.connection_type, asked.user),
                         ("210-765 4321", "2107654321", "+302101234567", "100", "sip",
                          "anna"))
        self.assertEqual(self.api.callbacks, [])
        self.assertEqual(self.dial(calls, cloud).status, 200)
        self.assertEqual([(c.from_number, c.to_number) for c in self.api.callbacks],
                         [("100", "+302101234567")])
        self.assertEqual(len(self.pbx.dialled), 1)

    def test_a_provider_dpvoip_does_not_have_is_refused_and_nothing_is_dialled(self) -> None:
        calls = self.calls(ProviderChoice([("zadarma", ZadarmaDialler(self.api))]))
        connection = self.records.add_connection(ANNA.id, "100", provider="Asterisk")
        outcome = self.dial(calls, connection)
        self.assertEqual((outcome.status, outcome.message), (
            400, f"your connection {connection} calls through the provider 'Asterisk', "
            "which dpvoip is not configured for (it has: zadarma); ask your administrator"))
        self.assertEqual(self.api.callbacks, [])
        [record] = self.records.records
        self.assertEqual((record.connection_id, record.result, record.http_status,
                          record.number_dialled), (connection, "refused", 400, None))

    def test_the_zadarma_api_alone_serves_the_crms_zadarma_connections(self) -> None:
        calls = self.calls(self.api)
        zadarma = self.records.add_connection(ANNA.id, "100", provider="Zadarma")
        other = self.records.add_connection(ANNA.id, "101", provider="OnlinePBX")
        self.assertEqual(self.dial(calls, zadarma).status, 200)
        self.assertEqual(self.dial(calls, other).status, 400)
        self.assertEqual(len(self.api.callbacks), 1)

    def test_a_providers_refusal_and_failure_are_the_users_answer(self) -> None:
        self.pbx.refuses = "this PBX cannot ring that line"
        calls = self.calls(ProviderChoice([("pbx", self.pbx)]))
        connection = self.records.add_connection(ANNA.id, "100", provider="pbx")
        outcome = self.dial(calls, connection)
        self.assertEqual((outcome.status, outcome.message),
                         (400, "this PBX cannot ring that line"))
        self.pbx.refuses, self.pbx.fails = None, Teapot("the PBX is busy", retry_after=7.0)
        outcome = self.dial(calls, connection)
        self.assertEqual((outcome.status, outcome.message, outcome.retry_after),
                         (418, "the PBX is busy", 7.0))
        self.assertEqual(self.pbx.dialled, [])
        self.assertEqual([r.http_status for r in self.records.records], [400, 418])

    def test_zadarmas_own_checks_still_come_before_it_is_asked(self) -> None:
        calls = self.calls(self.api)
        connection = self.records.add_connection(ANNA.id, "12", provider="Zadarma")
        outcome = self.dial(calls, connection)
        self.assertEqual((outcome.status, outcome.message), (
            400, "your connection's number '12' is not a phone, SIP number or extension "
            "Zadarma can ring"))
        good = self.records.add_connection(ANNA.id, "100", provider="Zadarma")
        self.assertEqual(self.dial(calls, good, sip="12").message,
                         "sip must be a 3- or 5-digit extension or SIP number")
        self.assertEqual(self.api.callbacks, [])

    def test_a_recording_is_asked_of_each_provider_until_one_has_it(self) -> None:
        first, second = Links({}), Links({"rec-9": "https://pbx.example/rec-9.mp3"})
        self.records.staff.add(ANNA.id)
        self.records.add_call("pbx-1", "rec-9")
        self.records.add_call("pbx-2", "rec-404")
        calls = self.calls(ProviderChoice([], [first, second]))
        link = self.successResultOf(Deferred.fromCoroutine(
            calls.recording_link(ANNA, "pbx-1")))
        self.assertEqual(link, "https://pbx.example/rec-9.mp3")
        self.assertEqual((first.asked, second.asked), (["rec-9"], ["rec-9"]))
        failure = self.failureResultOf(Deferred.fromCoroutine(
            calls.recording_link(ANNA, "pbx-2")), NoRecording)
        self.assertEqual(str(failure.value), "gone from ['rec-9']")


class ZadarmaKindTests(SynchronousTestCase):
    """The Zadarma kind builds what ``service.py`` used to wire by hand."""

    def setUp(self) -> None:
        self.recorder = Recorder()
        self.main = zadarma("zadarma", "s1", self.recorder)
        self.branch = zadarma("branch", "s2", self.recorder, create_tickets=True)
        app = WebApp(lambda: succeed(Readiness(True)), "test",
                     parts=[*self.main.web, *self.branch.web])
        self.http: Any = StubTreq(app.resource())

    def post(self, path: str, secret: str, call: str = "b") -> Any:
        form = {**EVENT, "pbx_call_id": "in_" + call * 40}
        headers = {"Content-Type": ["application/x-www-form-urlencoded"],
                   "Signature": [webhook_signature(secret, form)]}
        return self.successResultOf(self.http.post(
            f"http://dpvoip.test{path}", data=urlencode(form).encode(), headers=headers))

    def test_each_zadarma_provider_has_its_url_and_its_secret(self) -> None:
        self.assertEqual([part.path for part in (*self.main.web, *self.branch.web)],
                         ["zd", "zd/branch"])
        self.assertEqual(self.post("/voip/zd/", "s1", "a").code, 200)
        self.assertEqual(self.post("/voip/zd/branch/", "s2", "b").code, 200)
        self.assertEqual(self.post("/voip/zd/branch", "s2", "c").code, 200)
        self.assertEqual(self.post("/voip/zd/branch/", "s1").code, 401)
        self.assertEqual(self.post("/voip/zd/", "s2").code, 401)
        contexts = [context for _, _, context in self.recorder.events]
        self.assertEqual([c.tickets for c in contexts], [False, True, True])

    def test_another_zadarma_url_answers_as_the_first_one_does(self) -> None:
        echo = self.successResultOf(self.http.get(
            "http://dpvoip.test/voip/zd/branch/?zd_echo=a1b2"))
        self.assertEqual((echo.code, self.successResultOf(echo.content())), (200, b"a1b2"))
        put = self.successResultOf(self.http.put("http://dpvoip.test/voip/zd/branch/"))
        self.assertEqual((put.code, put.headers.getRawHeaders("Allow")),
                         (405, ["GET, HEAD, POST"]))
        self.assertEqual(json.loads(self.successResultOf(put.content())),
                         {"error": "method PUT not allowed here", "status": 405})
        below = self.successResultOf(self.http.get("http://dpvoip.test/voip/zd/branch/x"))
        self.assertEqual(below.code, 404)
        self.assertEqual(self.post("/voip/zd/nobody/", "s1").code, 404)

    def test_its_parts_health_figures_and_check_lines(self) -> None:
        built = [self.main, self.branch]
        self.assertIs(main_provider(built), self.main)
        self.assertEqual([p.services for p in built], [(self.main.account,),
                                                       (self.branch.account,)])
        self.assertEqual(senders(built), ["127.0.0.1/32", "127.0.0.1/32"])
        self.assertEqual(self.main.health().details, {
            "webhook": "/voip/zd/", "webhook_secret": True, "api_keys": False,
            "account_zone": None})
        self.post("/voip/zd/branch/", "wrong")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ProvidersCollector(built))
        text = generate_latest(registry).decode()
        self.assertEqual(text.count("# TYPE dpvoip_zadarma_webhooks_refused_total counter"), 1)
        self.assertIn('dpvoip_zadarma_webhooks_refused_total{provider="branch",status="401"}'
                      ' 1.0', text)
        self.assertIn('dpvoip_zadarma_webhooks_total{outcome="received"} 0.0', text)
        self.assertIn('dpvoip_zadarma_webhooks_total{outcome="received",provider="branch"} '
                      '1.0', text)
        lines = check_lines([ProviderConfig("zadarma", KIND, ZadarmaSettings()),
                             ProviderConfig("branch", KIND, replace(
                                 ZadarmaSettings(), key=Secret("KEY-VALUE-1"),
                                 secret=Secret("SECRET-VALUE-2"), timezone="Europe/Athens"))])
        self.assertEqual(lines, [
            "provider zadarma (Zadarma): webhooks at /voip/zd/ REFUSED (401): no secret "
            "(ZADARMA_SECRET); no API keys: click-to-call through it answers 503; call "
            "times in the account's (asked), else [crm] timezone",
            "provider branch (Zadarma): webhooks at /voip/zd/branch/ from 185.45.152.40/30;"
            " API keys set (click-to-call, recordings); call times in Europe/Athens"])
        self.assertNotIn("VALUE", "".join(lines))

    def test_the_spool_reads_zadarma_events_as_the_main_provider_does(self) -> None:
        default = ZadarmaContext(Dialling("GR"), ZoneInfo("UTC"))
        replay = SpoolContext(default)
        self.assertIs(replay.current(), default)
        replay.follow([self.branch, self.main])
        self.assertIs(replay.current(), self.main.context.current())
        # A record names the provider its webhook came to: read as that one's.
        self.assertIs(replay.current("branch"), self.branch.context.current())
        self.assertIs(replay.current("zadarma"), self.main.context.current())
        self.assertIs(replay.current("gone"), self.main.context.current(),
                      "a provider no longer configured: as the main one's")
        replay.follow([self.branch])
        self.assertTrue(replay.current().tickets, "no main one: the first Zadarma provider")
        replay.follow([])
        self.assertIs(replay.current(), default)


@implementer(IResource)
class Hello:
    isLeaf = True

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError

    def render(self, request: IRequest) -> bytes:
        method: bytes = request.method
        path: bytes = request.path
        return b"hello " + method + b" " + path


class WebPartTests(SynchronousTestCase):
    def test_a_part_gets_its_path_and_below_and_nothing_else(self) -> None:
        app = WebApp(lambda: succeed(Readiness(True)), "test",
                     parts=[WebPart("pbx", Hello()), WebPart("pbx/deep", Hello())])
        http: Any = StubTreq(app.resource())
        for path in ("/voip/pbx", "/voip/pbx/", "/voip/pbx/calls/7", "/voip/pbx/deep/"):
            answer = self.successResultOf(http.post(f"http://dpvoip.test{path}"))
            self.assertEqual(self.successResultOf(answer.content()),
                             b"hello POST " + path.encode())
        for path in ("/voip/pbxx", "/voip/zd/"):
            answer = self.successResultOf(http.post(f"http://dpvoip.test{path}"))
            self.assertEqual(answer.code, 404, path)
        self.assertEqual(self.successResultOf(http.get("http://dpvoip.test/healthz")).code,
                         200)

    def test_a_part_may_not_take_a_path_of_dpvoips_own_routes(self) -> None:
        for path in ("events", "static/x", "zd", "get-callback", ""):
            with self.assertRaises(ValueError) as refused:
                WebApp(lambda: succeed(Readiness(True)), "test",
                       parts=[WebPart(path, Hello())])
            self.assertIn(f"/voip/{path}/", str(refused.exception))


def _provider(name: str, **parts: Any) -> Provider:
    return Provider(name=name, kind="test", **parts)


@dataclass
class AKind:
    kind: str = "test"
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def read_settings(self, table: Any, where: str) -> None:
        return None

    def check_lines(self, name: str, settings: None) -> list[str]:
        return []

    def build(self, name: str, settings: None, tools: ProviderTools) -> Provider:
        return _provider(name, **self.parts.get(name, {}))


class AssemblyTests(SynchronousTestCase):
    def configured(self, kind: AKind, *names: str) -> list[ProviderConfig]:
        return [ProviderConfig(name, kind, None) for name in names]

    def test_providers_are_built_in_order_and_dial_by_name(self) -> None:
        dialler = FakeDialler()
        kind = AKind(parts={"b": {"dialler": dialler}})
        built = build_all(self.configured(kind, "a", "b"), tools())
        self.assertEqual([p.name for p in built], ["a", "b"])
        found = choice(built).for_connection("B")
        assert found is not None
        self.assertIs(found.dialler, dialler)
        self.assertIsNone(choice(built).for_connection("a"), "a does not dial")

    def test_two_providers_on_one_path_or_origin_are_refused(self) -> None:
        kind = AKind(parts={"a": {"web": [WebPart("x", Hello())]},
                               "b": {"web": [WebPart("x/", Hello())]}})
        with self.assertRaises(WiringError) as path:
            build_all(self.configured(kind, "a", "b"), tools())
        self.assertEqual(str(path.exception), "providers 'a' and 'b' both serve /voip/x/")
        origin = Origin("pbx", Dialling("GR"), source="pbx")
        kind = AKind(parts={"a": {"origins": [origin]}, "b": {"origins": [origin]}})
        with self.assertRaises(WiringError):
            build_all(self.configured(kind, "a", "b"), tools())

    def test_readyz_shows_each_provider_and_its_warnings(self) -> None:
        def health() -> ProviderHealth:
            return ProviderHealth({"connected": False}, ("login refused: check the secret",))

        built = [_provider("pbx", health=health), _provider("quiet")]
        probe = ReadinessReport(FakeDatabase(), cast(Any, _Prepared()), False, False,
                                FakeDirectory(), FakeSpool(), FakeDurable(),
                                [FakeBox(FakeBoxStatus("office"))], built)
        report = self.successResultOf(probe())
        self.assertTrue(report.ready, "a provider is said, never failed")
        self.assertEqual(report.checks["providers"], [
            {"name": "pbx", "kind": "test", "connected": False},
            {"name": "quiet", "kind": "test"}])
        self.assertEqual(report.checks["warnings"],
                         ["provider pbx: login refused: check the secret"])


class _Prepared:
    """A prepared schema as the readiness probe peeks at it."""

    def peek(self) -> Any:
        from test.test_service import prepared_schema

        return prepared_schema()
