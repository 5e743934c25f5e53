"""The AMI client and its service against the fake Asterisk over loopback: login with the
plain secret and with MD5, a wrong secret (one clear error, never the secret), a dead
peer noticed by the keepalive (a ``Clock``), reconnecting with back-off, the events of a
call reaching the recorder, ``Originate`` queued, refused, and not possible."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.asterisk.service import (
    AsteriskPbx,
    AsteriskService,
    Dialler,
    NotConnected,
    OriginateRefused,
)
from dpvoip.asterisk.settings import read_settings
from dpvoip.calls.ingest import Origin
from dpvoip.core.happenings import Answered, Ended, Happening, Started
from dpvoip.core.outcomes import Outcome, Reason
from dpvoip.protocols.ami import AmiProtocol
from dpvoip.testing.asterisk import Account, Beat, FakeAsterisk, Play, Step
from test.support.waiting import until

SECRET = "Tr0ub4dor&3-very-secret"


class Recorder:
    def __init__(self) -> None:
        self.happened: list[tuple[Happening, Origin]] = []

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]:
        self.happened.append((happening, origin))
        return succeed(None)

    @property
    def kinds(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for happening, _ in self.happened:
            if isinstance(happening, Started):
                out.append(("started", happening.direction))
            elif isinstance(happening, Answered):
                out.append(("answered", happening.extension))
            elif isinstance(happening, Ended):
                out.append(("ended", happening.outcome))
        return out


class ClientTestCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1772442000)
        self.fake = FakeAsterisk(reactor, Account("dpvoip", SECRET), clock=self.clock)
        self.port = self.fake.listen(0)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.fake.stop()))
        self.recorder = Recorder()
        self.logged: list[str] = []
        observer = cast(ILogObserver, self._observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def _observe(self, event: LogEvent) -> None:
        self.logged.append(formatEvent(event) + repr(event))

    def start(self, **given: Any) -> tuple[AsteriskPbx, AsteriskService]:
        values = {"name": "office", "host": "127.0.0.1", "port": self.port,
                  "secret": SECRET, "keepalive_seconds": 3600, "action_timeout_seconds": 5,
                  **given}
        pbx = AsteriskPbx(read_settings(values), self.recorder, self.clock)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        service = AsteriskService(pbx, self.clock, endpoint, retry=lambda attempt: 2.0)
        service.startService()
        self.addCleanup(service.stopService)
        return pbx, service

    async def logged_in(self, pbx: AsteriskPbx) -> None:
        await until(lambda: pbx.status.logged_in)

    def actions(self, name: str) -> list[Any]:
        return [a for a in self.fake.actions if a.get("Action") == name]


class LoginTests(ClientTestCase):
    async def test_md5_login_never_sends_the_secret(self) -> None:
        pbx, _ = self.start(auth="md5")
        await self.logged_in(pbx)
        self.assertEqual(pbx.status.version, "9.0.0")
        [login] = self.actions("Login")
        self.assertEqual((login.get("AuthType"), login.get("Username"), login.get("Events")),
                         ("MD5", "dpvoip", "call,cdr"))
        self.assertEqual(len(login.get("Key")), 32)
        self.assertNotIn("Secret", login)
        self.assertEqual(len(self.actions("Challenge")), 1)

    async def test_plain_login(self) -> None:
        pbx, _ = self.start(auth="plain")
        await self.logged_in(pbx)
        [login] = self.actions("Login")
        self.assertEqual(login.get("Secret"), SECRET)
        self.assertEqual(self.actions("Challenge"), [])

    async def test_a_wrong_secret_is_one_clear_error_without_the_secret(self) -> None:
        pbx, _ = self.start(secret="wrong-" + SECRET)
        await until(lambda: pbx.status.login_failures == 1)
        await until(lambda: not self.fake.sides)  # Asterisk closes after a failed login
        self.assertFalse(pbx.status.logged_in)
        self.assertIn("refused the login of user 'dpvoip' (Authentication failed)",
                      pbx.status.last_error)
        self.assertIn("manager.conf", pbx.status.last_error)
        # It keeps trying at the back-off's pace, and says it once.
        self.clock.advance(2.0)
        await until(lambda: pbx.status.login_failures == 2)
        said = [line for line in self.logged if "refused the login" in line]
        self.assertEqual(len(said), 1)
        for line in self.logged:
            self.assertNotIn(SECRET, line)
        self.assertNotIn(SECRET, repr(pbx.status.as_json(0, (0, 0))))

    async def test_a_silent_peer_is_noticed_by_the_keepalive(self) -> None:
        pbx, _ = self.start(keepalive_seconds=20)
        await self.logged_in(pbx)
        self.fake.silent = True  # reads, never answers: a hung PBX
        self.clock.advance(20)  # a Ping goes out
        await until(lambda: len(self.actions("Ping")) == 1)
        self.assertTrue(pbx.status.connected)
        self.clock.advance(5)  # no Pong within the action timeout
        await until(lambda: not pbx.status.connected)
        self.assertEqual(pbx.status.peer_failures, 1)
        self.assertIn("no answer to a Ping within 5 s", pbx.status.last_error)

    async def test_pongs_keep_the_connection(self) -> None:
        pbx, _ = self.start(keepalive_seconds=20)
        await self.logged_in(pbx)
        for n in range(1, 4):
            self.clock.advance(20)
            await until(lambda n=n: len(self.actions("Ping")) == n)  # type: ignore[misc]
            self.clock.advance(1)
        self.assertTrue(pbx.status.logged_in)
        self.assertEqual(pbx.status.peer_failures, 0)


class EventTests(ClientTestCase):
    async def test_a_calls_events_reach_the_recorder(self) -> None:
        pbx, _ = self.start()
        await self.logged_in(pbx)
        await Deferred.fromCoroutine(self.play("incoming-answered", talk=30))
        await until(lambda: len(self.recorder.happened) == 3)
        self.assertEqual(self.recorder.kinds, [("started", "incoming"), ("answered", 201),
                                               ("ended", Outcome.ANSWERED)])
        origin = self.recorder.happened[0][1]
        self.assertEqual((origin.name, origin.source), ("office", "asterisk"))
        self.assertGreater(pbx.status.events, 10)
        self.assertIsNotNone(pbx.status.last_event_at)

    async def play(self, name: str, **params: Any) -> None:
        self.fake.script = [Step(0, Play(name, tuple(params.items())))]
        playing = Deferred.fromCoroutine(self.fake.play())
        while not playing.called:
            self.clock.advance(1)
            await _turn()
        await playing

    async def test_a_reconnect_closes_the_open_call_and_logs_in_again(self) -> None:
        pbx, _ = self.start()
        await self.logged_in(pbx)
        beats = Play("incoming-answered").beats(self.fake.pbx)
        for beat in beats[:8]:  # ringing, answered: then Asterisk restarts
            self.fake.broadcast(beat.fields)
        await until(lambda: len(self.recorder.happened) == 2)
        await self.cut_and_reconnect(pbx, self.fake.close_all)
        self.assertEqual(pbx.status.reconnects, 1)
        await until(lambda: len(self.recorder.happened) == 3)
        ended = self.recorder.happened[-1][0]
        assert isinstance(ended, Ended)
        self.assertEqual((ended.outcome, ended.detail and ended.detail.reason),
                         (Outcome.INTERRUPTED, Reason.LINK_LOST))
        self.assertEqual(pbx.status.orphans_closed, 1)

    async def blip_while_ringing(self, pbx: AsteriskPbx) -> list[Any]:
        """An incoming call rings; the network fails and comes back (the PBX's calls go
        on): the call's remaining events."""
        await self.logged_in(pbx)
        beats = Play("incoming-answered").beats(self.fake.pbx)
        for beat in beats[:5]:  # ringing
            self.fake.broadcast(beat.fields)
        await until(lambda: len(self.recorder.happened) == 1)
        await self.cut_and_reconnect(pbx, self.fake.drop_connections)
        return beats[5:]

    async def cut_and_reconnect(self, pbx: AsteriskPbx, cut: Callable[[], None],
                                meanwhile: Sequence[Beat] = ()) -> None:
        """The link cut (``cut``), the events ``meanwhile`` played by the PBX while
        dpvoip is away, then dpvoip logged in again.

        The cut comes once the fake has read the ``CoreShowChannels`` of the login before
        it: a connection closing stops reading, so a cut made as soon as dpvoip is logged
        in can lose that request on its way (a slow machine), and the tests that count
        one list at each login would count one too few."""
        await until(lambda: len(self.actions("CoreShowChannels")) == pbx.status.connections)
        cut()
        await until(lambda: not pbx.status.connected)
        for beat in meanwhile:
            self.fake.broadcast(beat.fields)
        self.clock.advance(2.0)  # the back-off's wait
        await self.logged_in(pbx)

    async def test_a_call_that_goes_on_through_a_reconnect_is_followed_to_its_end(
            self) -> None:
        pbx, _ = self.start()
        rest = await self.blip_while_ringing(pbx)
        await until(lambda: pbx.status.calls_resumed == 1)
        for beat in rest:
            self.fake.broadcast(beat.fields)
        await until(lambda: len(self.recorder.happened) == 3)
        self.assertEqual(self.recorder.kinds, [("started", "incoming"), ("answered", 201),
                                               ("ended", Outcome.ANSWERED)])
        self.assertEqual(pbx.status.orphans_closed, 0)
        self.assertEqual(len(self.actions("CoreShowChannels")), 2, "one at each login")

    async def test_a_call_that_ended_during_the_reconnect_is_closed_as_interrupted(
            self) -> None:
        pbx, _ = self.start()
        await self.logged_in(pbx)
        beats = Play("incoming-missed").beats(self.fake.pbx)
        hangups = [n for n, b in enumerate(beats) if b.message.event == "Hangup"]
        for beat in beats[:hangups[0]]:
            self.fake.broadcast(beat.fields)
        await until(lambda: len(self.recorder.happened) == 1)
        # The caller gives up while dpvoip is away.
        await self.cut_and_reconnect(pbx, self.fake.drop_connections, beats[hangups[0]:])
        await until(lambda: len(self.recorder.happened) == 2)
        ended = self.recorder.happened[-1][0]
        assert isinstance(ended, Ended)
        self.assertEqual((ended.outcome, ended.detail and ended.detail.reason),
                         (Outcome.INTERRUPTED, Reason.LINK_LOST))
        self.assertEqual((pbx.status.orphans_closed, pbx.status.calls_resumed), (1, 0))

    async def test_a_call_that_began_during_the_reconnect_is_recorded(self) -> None:
        """Nothing was followed when the link went; a caller rang meanwhile and gave up
        after dpvoip was back: a missed call, recorded from the PBX's list of channels."""
        pbx, _ = self.start()
        await self.logged_in(pbx)
        beats = Play("incoming-missed").beats(self.fake.pbx)
        hangups = [n for n, b in enumerate(beats) if b.message.event == "Hangup"]
        await self.cut_and_reconnect(pbx, self.fake.drop_connections, beats[:hangups[0]])
        await until(lambda: pbx.status.calls_adopted == 1)
        for beat in beats[hangups[0]:]:
            self.fake.broadcast(beat.fields)
        await until(lambda: len(self.recorder.happened) == 2)
        self.assertEqual(self.recorder.kinds, [("started", "incoming"),
                                               ("ended", Outcome.MISSED)])
        self.assertEqual(pbx.status.orphans_closed, 0)
        self.assertEqual(len(self.actions("CoreShowChannels")), 2, "one at each login")
        self.assertTrue(any("1 call(s) in progress that dpvoip was not following" in line
                            for line in self.logged))

    async def test_a_call_that_ended_while_the_list_was_on_its_way_is_not_adopted(
            self) -> None:
        """The list is older news than the events that came before it: a channel hung up
        meanwhile is not brought back from it."""
        self.fake.hold_lists = True
        pbx, _ = self.start()
        await self.logged_in(pbx)
        await until(lambda: self.fake.send_lists() == 1)  # the first login's: empty
        beats = Play("incoming-missed").beats(self.fake.pbx)
        hangups = [n for n, b in enumerate(beats) if b.message.event == "Hangup"]
        await self.cut_and_reconnect(pbx, self.fake.drop_connections, beats[:hangups[0]])
        await until(lambda: len(self.actions("CoreShowChannels")) == 2)
        for beat in beats[hangups[0]:]:  # the caller gives up before the list comes
            self.fake.broadcast(beat.fields)
        self.assertEqual(self.fake.send_lists(), 1)
        await until(lambda: pbx._listing is None)
        self.assertEqual((pbx.status.calls_adopted, self.recorder.happened), (0, []))
        self.assertEqual(pbx.follower.followed, (0, 0, 0))

    async def test_a_call_ringing_at_the_first_login_is_adopted(self) -> None:
        """Ringing before dpvoip started (or while it restarted): recorded all the same,
        and ``listed_once`` says when the PBX's calls are known."""
        pbx, _ = self.start()
        beats = Play("incoming-missed").beats(self.fake.pbx)
        hangups = [n for n, b in enumerate(beats) if b.message.event == "Hangup"]
        for beat in beats[:hangups[0]]:
            self.fake.broadcast(beat.fields)
        listed = pbx.listed_once()
        self.assertNoResult(listed)
        await self.logged_in(pbx)
        await listed
        self.assertEqual(pbx.status.calls_adopted, 1)
        [call_id] = pbx.follower.followed_calls()
        for beat in beats[hangups[0]:]:
            self.fake.broadcast(beat.fields)
        await until(lambda: len(self.recorder.happened) == 2)
        self.assertEqual(self.recorder.kinds, [("started", "incoming"),
                                               ("ended", Outcome.MISSED)])
        self.assertEqual({getattr(h, "call_id", None) for h, _ in self.recorder.happened},
                         {call_id})

    async def test_without_the_right_to_list_channels_the_calls_are_closed(self) -> None:
        self.fake.account = Account("dpvoip", SECRET, reporting=False)  # write = originate
        pbx, _ = self.start()
        await self.blip_while_ringing(pbx)
        await until(lambda: len(self.recorder.happened) == 2)
        ended = self.recorder.happened[-1][0]
        assert isinstance(ended, Ended)
        self.assertEqual(ended.outcome, Outcome.INTERRUPTED)
        self.assertEqual(pbx.status.orphans_closed, 1)
        said = [line for line in self.logged if "could not be listed" in line]
        self.assertIn("calls that began while dpvoip was not connected are not recorded",
                      said[0])
        self.assertNotIn("closed", said[0], "at the first login nothing was followed")

    async def test_a_list_that_never_ends_closes_the_calls_after_the_timeout(self) -> None:
        self.fake.end_lists = False
        pbx, _ = self.start()
        await self.blip_while_ringing(pbx)
        self.clock.advance(4.9)
        await _turn()
        self.assertEqual(len(self.recorder.happened), 1, "still waiting for the list's end")
        self.clock.advance(0.2)  # action_timeout_seconds (5) after the login
        await until(lambda: len(self.recorder.happened) == 2)
        ended = self.recorder.happened[-1][0]
        assert isinstance(ended, Ended)
        self.assertEqual(ended.outcome, Outcome.INTERRUPTED)
        self.assertTrue(any("did not end in time" in line for line in self.logged))

    async def test_it_keeps_trying_while_nothing_listens(self) -> None:
        await self.fake.stop()
        pbx, _ = self.start()
        await until(lambda: "cannot connect" in pbx.status.last_error)
        for _ in range(3):
            self.clock.advance(2.0)
            await _turn()
        self.assertFalse(pbx.status.connected)


class DiallerTests(ClientTestCase):
    async def test_originate_rings_the_users_phone_then_the_number(self) -> None:
        pbx, _ = self.start()
        await self.logged_in(pbx)
        action_id = await Dialler(pbx).dial("201", "2101234567", "Papadopoulos AE")
        [originate] = self.actions("Originate")
        self.assertEqual(originate.action_id, action_id)
        self.assertEqual(
            [(k, originate.get(k)) for k in ("Channel", "Context", "Exten", "Priority",
                                             "CallerID", "Timeout", "Async")],
            [("Channel", "PJSIP/201"), ("Context", "from-internal"),
             ("Exten", "2101234567"), ("Priority", "1"),
             ("CallerID", '"Papadopoulos AE" <2101234567>'), ("Timeout", "30000"),
             ("Async", "true")])
        self.assertEqual(pbx.status.originated, 1)
        for _ in range(30):  # the originated call plays on the fake's clock
            self.clock.advance(1)
            await _turn()
        await until(lambda: len(self.recorder.happened) == 3)
        self.assertEqual(self.recorder.kinds, [("started", "outgoing"), ("answered", 201),
                                               ("ended", Outcome.ANSWERED)])
        started = self.recorder.happened[0][0]
        assert isinstance(started, Started)
        self.assertEqual((started.remote, started.extension), ("2101234567", 201))

    async def test_a_phone_that_does_not_answer_is_counted(self) -> None:
        self.fake.answer_originate = False
        pbx, _ = self.start()
        await self.logged_in(pbx)
        await Dialler(pbx).dial("201", "2101234567")
        for _ in range(5):
            self.clock.advance(1)
            await _turn()
        await until(lambda: pbx.status.originate_unanswered == 1)
        self.assertEqual(self.recorder.happened, [])  # an internal leg: no call

    async def test_a_refused_originate_says_why(self) -> None:
        self.fake.account.originate = False
        pbx, _ = self.start()
        await self.logged_in(pbx)
        with self.assertRaises(OriginateRefused) as raised:
            await Dialler(pbx).dial("201", "2101234567")
        self.assertIn("refused to call 201 for 2101234567: Permission denied",
                      str(raised.exception))
        self.assertIn("write = originate", str(raised.exception))
        self.assertEqual(pbx.status.originate_refused, 1)

    async def test_bad_input_or_no_connection_sends_nothing(self) -> None:
        pbx, _ = self.start()
        await self.logged_in(pbx)
        dialler = Dialler(pbx)
        for extension, number, caller in (("20a", "2101234567", ""),
                                          ("201", "210 123", ""),
                                          ("201", "2101234567", 'x"\r\nAction: Logoff')):
            with self.assertRaises(ValueError):
                await dialler.dial(extension, number, caller)
        self.assertEqual(self.actions("Originate"), [])
        self.fake.close_all()
        await until(lambda: not pbx.status.connected)
        with self.assertRaises(NotConnected):
            await dialler.dial("201", "2101234567")


async def _turn() -> None:
    """One turn of the real reactor (the bytes the Clock's timers wrote go out)."""
    waiting: Deferred[None] = Deferred()
    reactor.callLater(0, waiting.callback, None)
    await waiting


class WireTests(SynchronousTestCase):
    """The protocol alone, on a ``StringTransport`` and a ``Clock``."""

    def connect(self) -> tuple[AsteriskPbx, AmiProtocol, StringTransport, Clock]:
        clock = Clock()
        pbx = AsteriskPbx(read_settings({"name": "office", "secret": SECRET,
                                         "auth": "plain"}), Recorder(), clock)
        protocol = pbx.protocol()
        transport = StringTransport()
        protocol.makeConnection(transport)
        return pbx, protocol, transport, clock

    def test_a_peer_that_is_no_asterisk(self) -> None:
        pbx, protocol, transport, _ = self.connect()
        protocol.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIn("not an Asterisk Manager banner", pbx.status.last_error)
        self.assertEqual(transport.value(), b"")  # no login sent to it

    def test_no_banner_in_time(self) -> None:
        pbx, _, transport, clock = self.connect()
        clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertIn("no Manager Interface banner", pbx.status.last_error)

    def test_an_over_long_message_is_refused_and_the_connection_goes_on(self) -> None:
        pbx, protocol, transport, _ = self.connect()
        protocol.dataReceived(b"Asterisk Call Manager/9.0.0\r\n")
        self.assertIn(b"Action: Login\r\n", transport.value())
        protocol.dataReceived(b"Event: Flood\r\n" + b"Key: value\r\n" * 600 + b"\r\n")
        self.assertEqual(pbx.status.refused_messages, 1)
        self.assertFalse(transport.disconnecting)

    def test_an_over_long_line_drops_the_connection(self) -> None:
        pbx, protocol, transport, _ = self.connect()
        protocol.dataReceived(b"Asterisk Call Manager/9.0.0\r\n" + b"x" * 20000)
        self.assertTrue(transport.disconnecting)
        self.assertIn("a line longer than", pbx.status.last_error)
