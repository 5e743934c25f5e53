"""The Asterisk provider kind in memory: its ``[[provider]]`` table read through the
configuration, its dial strings, its dialler's refusals and failures as the user's
answers, what it tells ``/readyz`` and ``/metrics``, the calls the last run left open
closed after the replay, ``dpvoip check``'s lines from one login; and the recording
route answering any provider's error (not only Zadarma's) clearly."""

from __future__ import annotations

import tomllib
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

from prometheus_client.core import Metric
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.asterisk.dialling import (
    AsteriskDialler,
    PbxRefused,
    PbxUnavailable,
    dial_string,
)
from dpvoip.asterisk.messages import Message
from dpvoip.asterisk.provider import (
    KIND,
    LISTING_WAIT_SECONDS,
    NO_RECORDINGS,
    AsteriskProvider,
)
from dpvoip.asterisk.service import OriginateRefused
from dpvoip.asterisk.settings import AsteriskSettings
from dpvoip.calls.ingest import Origin
from dpvoip.click_to_call.callbacks import ClickToCall
from dpvoip.click_to_call.logins import Logins
from dpvoip.config import ConfigError, Secret, from_toml
from dpvoip.core.dialling_policy import DiallingPolicy
from dpvoip.core.happenings import Happening
from dpvoip.core.numbers import Dialling
from dpvoip.core.outcomes import Reason
from dpvoip.protocols.ami import ActionTimedOut, NotConnected
from dpvoip.providers import discovery
from dpvoip.providers.choice import ProviderChoice
from dpvoip.providers.interface import DialRequest, ProviderError, ProviderTools
from dpvoip.testing.asterisk import SCENARIOS, Account, ChannelTable, FakeAsterisk, Pbx
from dpvoip.web.app import Readiness, WebApp
from dpvoip.web.callback import CallbackPages
from dpvoip.web.sources import networks
from test.test_routes_memory import ORIGIN, SECRET_KEY, RoutesCase

SECRET = "s3cr3t-of-the-manager-user"  # never in any output


def table(**keys: Any) -> str:
    lines = ['fritzbox = []', '[[provider]]', 'kind = "asterisk"', 'name = "office"']
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def settings(**keys: Any) -> AsteriskSettings:
    config = from_toml(tomllib.loads(table(secret=SECRET, **keys)))
    [provider] = config.all_providers
    return cast(AsteriskSettings, provider.settings)


class Recorder:
    """The durable recorder as the kind sees it: submit, and close the left-open calls."""

    def __init__(self) -> None:
        self.happened: list[tuple[Happening, Origin]] = []
        self.closed: list[tuple[str, Reason, datetime, datetime | None, frozenset[str]]] = []

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]:
        self.happened.append((happening, origin))
        return succeed(None)

    async def close_open_calls(self, box: str, reason: Reason, at: datetime,
                               started_before: datetime | None = None,
                               keep: Collection[str] = ()) -> int:
        self.closed.append((box, reason, at, started_before, frozenset(keep)))
        return 2


class ListingProtocol:
    """The AMI connection as ``AsteriskPbx`` uses it at a login: the actions it sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def new_action_id(self) -> str:
        return f"dpvoip-{len(self.sent) + 1}"

    def send_action(self, name: str, fields: Any = (), action_id: str = "") -> Deferred[Any]:
        self.sent.append((name, action_id))
        return Deferred()


def tools(clock: Clock, recorder: Any, replayed: Deferred[None]) -> ProviderTools:
    return ProviderTools(
        reactor=clock, recorder=recorder, store=cast(Any, None), crm_schema="public",
        region=Dialling("GR"), own_numbers=frozenset(), office_zone=ZoneInfo("Europe/Athens"),
        trusted_proxies=(), state_folder=Path("/nonexistent"),
        schema_prepared=lambda: succeed(None), spool_replayed=lambda: replayed)


class TableTests(SynchronousTestCase):
    def test_a_provider_table_is_read_by_the_built_in_kind(self) -> None:
        config = from_toml(tomllib.loads(table(host="pbx.office.lan", secret=SECRET,
                                               trunk_patterns=["PJSIP/provider-*"])))
        [provider] = config.all_providers
        self.assertEqual((provider.name, provider.kind), ("office", "asterisk"))
        self.assertEqual(provider.settings.host, "pbx.office.lan")
        self.assertNotIn(SECRET, repr(config))

    def test_bad_keys_are_refused_naming_the_provider_and_the_key(self) -> None:
        for keys, said in (
            ({"secret": SECRET, "port": 70000}, "[[provider]] 'office' port: must be between"),
            ({}, "[[provider]] 'office' secret: must be set"),
            ({"secret": SECRET, "originate_number": "intl"},
             "[[provider]] 'office' originate_number: must be one of"),
            ({"secret": SECRET, "colour": "red"}, "[[provider]] 'office' unknown key 'colour'"),
        ):
            with self.assertRaises(ConfigError) as refused:
                from_toml(tomllib.loads(table(**keys)))
            self.assertIn(said, str(refused.exception))
            self.assertNotIn(SECRET, str(refused.exception))

    def test_the_kind_is_built_in_without_an_entry_point(self) -> None:
        self.patch(discovery, "entry_points", lambda group: [])
        self.assertIs(discovery.load("asterisk", discovery.installed()), KIND)


class DialStringTests(SynchronousTestCase):
    def test_numbers_are_written_as_the_offices_phones_dial_them(self) -> None:
        self.assertEqual(dial_string("+302101234567", "GR"), "2101234567")
        self.assertEqual(dial_string("+306912345678", "GR"), "6912345678")
        self.assertEqual(dial_string("+4930123456", "GR"), "004930123456")
        self.assertEqual(dial_string("+302101234567", "DE"), "00302101234567")
        self.assertEqual(dial_string("+4930123456", "DE"), "030123456")
        self.assertEqual(dial_string("+302101234567", "GR", "e164"), "+302101234567")
        self.assertIsNone(dial_string("not a number", "GR"))


class Originating:
    """``asterisk.service.Dialler`` as the adapter sees it: what it was asked, or a
    failure."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure
        self.asked: list[tuple[str, str, str]] = []

    def dial(self, extension: str, number: str, caller_id: str = "") -> Deferred[str]:
        self.asked.append((extension, number, caller_id))
        return fail(self.failure) if self.failure else succeed("dpvoip-1")


def request(line: str = "201", number: str = "+302101234567", **more: Any) -> DialRequest:
    return DialRequest(line, number, user="anna", **more)


class DiallerTests(SynchronousTestCase):
    def test_the_extension_rings_first_then_the_number(self) -> None:
        originating = Originating()
        dialler = AsteriskDialler("office", originating, "GR")
        self.assertIsNone(dialler.refusal(request("20 1")))
        self.successResultOf(Deferred.fromCoroutine(dialler.dial(request("20 1"))))
        self.assertEqual(originating.asked, [("201", "2101234567", "Click-to-call")])

    def test_what_the_pbx_cannot_do_is_refused_before_it_is_asked(self) -> None:
        dialler = AsteriskDialler("office", Originating(), "GR")
        self.assertEqual(dialler.refusal(request("+30 210 765 4321")),
                         "your connection's number '+30 210 765 4321' is not an extension "
                         "of the PBX office (2-8 digits)")
        self.assertIn("predicted", dialler.refusal(request(predicted=True)) or "")

    def test_failures_are_the_users_answers(self) -> None:
        for failure, kind, status, said in (
            (NotConnected("x"), PbxUnavailable, 503,
             "the PBX office is not connected now; nothing was dialled, try again shortly"),
            (ActionTimedOut("x"), PbxUnavailable, 503, "did not answer the call request"),
            (OriginateRefused("the PBX office refused to call 201 for 2101234567: "
                              "Permission denied"), PbxRefused, 502,
             "refused to call 201 for 2101234567: Permission denied"),
            (ValueError("the caller id must be one line"), PbxRefused, 502,
             "cannot be asked that: the caller id must be one line"),
        ):
            dialler = AsteriskDialler("office", Originating(failure), "GR")
            failed = self.failureResultOf(Deferred.fromCoroutine(dialler.dial(request())),
                                          ProviderError)
            self.assertIsInstance(failed.value, kind)
            error = cast(ProviderError, failed.value)
            self.assertEqual(error.status, status)
            self.assertIn(said, error.message)


class BuiltProviderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.recorder = Recorder()
        self.replayed: Deferred[None] = Deferred()
        self.provider: AsteriskProvider = KIND.build(
            "office", settings(country="GR"), tools(self.clock, self.recorder, self.replayed))

    def test_its_parts(self) -> None:
        provider = self.provider
        [origin] = provider.origins
        self.assertEqual((origin.name, origin.source), ("office", "asterisk"))
        self.assertEqual(provider.pbx.settings.name, "office", "the table's name")
        self.assertEqual(list(provider.services), [provider.client, provider.left_open])
        self.assertIsNone(provider.recordings)
        self.assertIsNotNone(provider.dialler)

    def test_calls_left_open_are_closed_once_the_spool_is_replayed(self) -> None:
        left_open = self.provider.left_open
        assert left_open is not None
        born = left_open.born
        self.clock.advance(30)
        left_open.startService()
        self.assertEqual(self.recorder.closed, [], "not before the replay")
        self.replayed.callback(None)
        self.clock.advance(LISTING_WAIT_SECONDS - 1)
        self.assertEqual(self.recorder.closed, [], "not before the PBX's channels are listed")
        self.clock.advance(1)  # the PBX out of reach: closed all the same
        assert left_open.closed is not None
        self.assertEqual(self.successResultOf(left_open.closed), 2)
        [(name, reason, at, before, keep)] = self.recorder.closed
        self.assertEqual((name, reason, before, keep),
                         ("office", Reason.RESTARTED, born, frozenset()))
        self.assertEqual(at, datetime.fromtimestamp(1_800_000_060, UTC))

    def test_stopped_while_waiting_for_the_list_nothing_is_closed_or_left_pending(
            self) -> None:
        left_open = self.provider.left_open
        assert left_open is not None
        left_open.startService()
        self.replayed.callback(None)
        left_open.stopService()
        assert left_open.closed is not None
        self.assertEqual(self.successResultOf(left_open.closed), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(LISTING_WAIT_SECONDS)
        self.assertEqual(self.recorder.closed, [], "they stay for the next run")

    def test_a_call_the_pbx_still_has_is_not_closed(self) -> None:
        """The first login's list shows a call of before the restart still going on: it
        is followed, and kept open for its real end."""
        left_open, pbx = self.provider.left_open, self.provider.pbx
        assert left_open is not None
        table = ChannelTable()
        for beat in SCENARIOS["incoming-answered"](Pbx(epoch=1_799_999_000))[:11]:
            table.follow(beat.fields, 1_799_999_990)
        left_open.startService()
        self.replayed.callback(None)
        connection = ListingProtocol()
        pbx.logged_in(cast(Any, connection), "9.0.0")
        [(action, action_id)] = connection.sent
        self.assertEqual(action, "CoreShowChannels")
        for fields in table.listing(action_id, self.clock.seconds()):
            pbx.event_received(Message(tuple(fields)))
        self.assertEqual(self.recorder.closed, [], "the list is not over yet")
        pbx.event_received(Message((("Event", "CoreShowChannelsComplete"),
                                    ("ActionID", action_id))))
        assert left_open.closed is not None
        self.successResultOf(left_open.closed)
        [(_, _, _, _, keep)] = self.recorder.closed
        self.assertEqual(keep, {"ast-office-1799999000.0"})
        self.assertEqual(pbx.status.calls_adopted, 1)

    def test_health_says_the_last_error_without_the_secret(self) -> None:
        health = self.provider.health()
        self.assertEqual((health.details["connected"], health.warnings), (False, ()))
        self.assertEqual(health.details["recordings"], NO_RECORDINGS)
        self.provider.pbx.login_refused("Authentication failed")
        health = self.provider.health()
        [warning] = health.warnings
        self.assertIn("not logged in to the PBX at 127.0.0.1:5038: the PBX refused the "
                      "login of user 'dpvoip' (Authentication failed)", warning)
        self.assertNotIn(SECRET, repr(health))

    def test_metrics(self) -> None:
        pbx = self.provider.pbx
        pbx.login_refused("Authentication failed")
        pbx.status.events = 7
        pbx.status.calls_evicted = 3
        pbx.status.calls_resumed, pbx.status.orphans_closed = 2, 1
        pbx.status.calls_adopted = 4
        families: dict[str, Metric] = {f.name: f for f in self.provider.metrics()}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in families.values() for s in f.samples}
        office = (("provider", "office"),)
        self.assertEqual(samples[("dpvoip_asterisk_connected", office)], 0)
        self.assertEqual(samples[("dpvoip_asterisk_logins_failed_total", office)], 1)
        self.assertEqual(samples[("dpvoip_asterisk_events_total", office)], 7)
        self.assertEqual(samples[("dpvoip_asterisk_open_calls", office)], 0)
        self.assertEqual(samples[("dpvoip_asterisk_calls_evicted_total", office)], 3)
        for what, count in (("resumed", 2), ("closed", 1), ("adopted", 4)):
            self.assertEqual(samples[("dpvoip_asterisk_reconnect_calls_total",
                                      (*office, ("what", what)))], count)


class CheckLinesTests(TestCase):
    """``dpvoip check``'s lines: a blocking login, run here in a thread while the fake
    answers on the reactor."""

    def setUp(self) -> None:
        self.fake = FakeAsterisk(reactor, Account("dpvoip", SECRET))
        self.port = self.fake.listen(0)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.fake.stop()))

    async def lines(self, **keys: Any) -> list[str]:
        keys.setdefault("action_timeout_seconds", 5)
        looked = settings(host="127.0.0.1", port=self.port, **keys)
        lines: list[str] = await threads.deferToThread(KIND.check_lines, "office", looked)
        for line in lines:
            self.assertNotIn(SECRET, line)
        return lines

    async def test_a_good_login(self) -> None:
        first, second = await self.lines(auth="plain")
        self.assertEqual(first, f"provider office (Asterisk): AMI at 127.0.0.1:{self.port} "
                                "(plain TCP, plain login): logged in as 'dpvoip' (AMI 9.0.0); "
                                "calls followed on through a reconnect, and the ones "
                                "begun meanwhile recorded")
        self.assertIn("ast-office-<Linkedid>", second)
        self.assertIn(f"recordings: {NO_RECORDINGS}", second)
        logins = [a for a in self.fake.actions if a.get("Action") == "Login"]
        self.assertEqual(logins[0].get("Events"), "off")
        self.assertIn("Logoff", [a.get("Action") for a in self.fake.actions])

    async def test_a_user_that_may_not_list_the_channels_is_told_what_it_costs(self) -> None:
        self.fake.account = Account("dpvoip", SECRET, reporting=False)
        first, _ = await self.lines(auth="plain")
        self.assertIn("logged in as 'dpvoip' (AMI 9.0.0); the channels cannot be listed (add"
                      " reporting to write in manager.conf): a reconnect closes the calls in"
                      " progress as interrupted, and the calls begun while the link was down"
                      " are not recorded", first)

    async def test_nothing_listening(self) -> None:
        await self.fake.stop()
        first, _ = await self.lines()
        self.assertIn(f"NOT LOGGED IN: cannot connect to 127.0.0.1:{self.port}", first)

    async def test_a_silent_peer(self) -> None:
        self.fake.silent = True
        first, _ = await self.lines(action_timeout_seconds=1)
        self.assertIn("NOT LOGGED IN: 127.0.0.1", first)
        self.assertIn("did not answer within 1 s", first)


class AnyProvidersRecordingErrorTests(RoutesCase):
    """The recording route answers a provider's error with its status and message, not
    only Zadarma's: a provider that is not Zadarma failing is not a 500."""

    class Failing:
        async def recording_link(self, recording: str) -> str:
            raise Unreachable("the recordings server of provider 'office' does not answer",
                              retry_after=30)

    def setUp(self) -> None:
        super().setUp()
        self.callbacks.add_call("ast-office-1", "rec-1", crm_call_id=41, legs=("100",))
        policy = DiallingPolicy(frozenset({"GR"}), (), True)
        pages = CallbackPages(
            Logins(self.accounts, Secret(SECRET_KEY), Secret(""), "sessionid", self.clock),
            ClickToCall(self.callbacks, ProviderChoice([], [self.Failing()]), policy,
                        Dialling("GR"), 5, self.clock),
            (), "/login/", self.clock, proxies=networks(["127.0.0.1/32"]))
        from treq.testing import StubTreq

        self.http = StubTreq(WebApp(lambda: succeed(Readiness(True)), "test", None,
                                    pages).resource())

    def test_a_providers_error_is_a_clear_answer(self) -> None:
        answer = self.get(url=f"{ORIGIN}/voip/calls/41/recording", bearer=self.jwt())
        self.assertEqual((answer.code, answer.json()["error"]), (
            504, "the recordings server of provider 'office' does not answer"))
        self.assertEqual(answer.headers["retry-after"], "30")


class Unreachable(ProviderError):
    status = 504


class ReadmeTests(SynchronousTestCase):
    def test_the_readmes_provider_table_works_as_written(self) -> None:
        readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
        section = readme.split("## Connecting a real Asterisk/FreePBX", 1)[1]
        block = section.split("```toml\n", 1)[1].split("```", 1)[0]
        config = from_toml(tomllib.loads(block), "README")  # beside the default box
        [provider] = config.all_providers
        self.assertEqual((provider.name, provider.kind), ("pbx", "asterisk"))
        read = cast(AsteriskSettings, provider.settings)
        self.assertEqual((read.host, read.port, read.auth, read.trunk_patterns),
                         ("192.168.1.10", 5038, "md5", ("PJSIP/provider-*",)))
