"""The list of channels asked for at every login (``CoreShowChannels``) against the events
that keep coming meanwhile, in every order the wire allows: the client and the fake
Asterisk on ``StringTransport``s, the bytes moved one way at a time when the test says,
time a ``Clock``. No real reactor, no waiting: each interleaving is played exactly.

The order that made ``test_a_call_that_goes_on_through_a_reconnect_is_followed_to_its_end``
flaky: dpvoip logs in and asks for the list; a call rings before the fake has read that
request, so its events reach dpvoip first and the list (taken after them) shows its
channels. That call was counted as resumed at the first login (``calls_resumed`` 1, then
2 after the reconnect), and, had the list been refused, closed as interrupted while the
PBX went on sending its events."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dpvoip.asterisk.service import AsteriskPbx
from dpvoip.asterisk.settings import read_settings
from dpvoip.calls.ingest import Origin
from dpvoip.core.happenings import Answered, Ended, Happening, Started
from dpvoip.core.outcomes import Outcome, Reason
from dpvoip.protocols.ami import AmiProtocol
from dpvoip.testing.asterisk import Account, Beat, FakeAsterisk, Play

SECRET = "listing-secret"


class _Recorder:
    def __init__(self) -> None:
        self.happened: list[Happening] = []

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]:
        self.happened.append(happening)
        return succeed(None)

    def kinds(self) -> list[tuple[object, ...]]:
        """What each happening says, shortly: enough to tell a call's course."""
        out: list[tuple[object, ...]] = []
        for happening in self.happened:
            if isinstance(happening, Started):
                out.append(("started", happening.call_id))
            elif isinstance(happening, Answered):
                out.append(("answered", happening.call_id))
            elif isinstance(happening, Ended):
                out.append(("ended", happening.call_id, happening.outcome))
        return out


class _Link:
    """One connection between the client and the fake, whose bytes move only when told:
    ``to_client`` and ``to_server`` each hand over what the other side wrote so far."""

    def __init__(self, pbx: AsteriskPbx, fake: FakeAsterisk) -> None:
        self.client: AmiProtocol = pbx.protocol()
        self.server = fake.factory().buildProtocol(None)
        assert self.server is not None
        self.client_wrote, self.server_wrote = StringTransport(), StringTransport()
        self.server.makeConnection(self.server_wrote)  # the banner
        self.client.makeConnection(self.client_wrote)

    def to_client(self) -> None:
        data = self.server_wrote.value()
        self.server_wrote.clear()
        self.client.dataReceived(data)

    def to_server(self) -> None:
        data = self.client_wrote.value()
        self.client_wrote.clear()
        assert self.server is not None
        self.server.dataReceived(data)

    def log_in(self) -> None:
        """Banner, ``Login``, its answer: dpvoip is logged in and has written its
        ``CoreShowChannels``, which the fake has not read yet."""
        self.to_client()
        self.to_server()
        self.to_client()
        assert self.client.logged_in
        assert b"Action: CoreShowChannels" in self.client_wrote.value()

    def pump(self) -> None:
        while self.client_wrote.value() or self.server_wrote.value():
            self.to_server()
            self.to_client()

    def cut(self) -> None:
        """The network fails: both sides see the connection go."""
        assert self.server is not None
        self.client.connectionLost(Failure(ConnectionDone()))
        self.server.connectionLost(Failure(ConnectionDone()))


class ListingRaceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1772442000)
        self.fake = FakeAsterisk(self.clock, Account("dpvoip", SECRET), clock=self.clock)
        self.recorder = _Recorder()
        self.pbx = AsteriskPbx(read_settings({"name": "office", "secret": SECRET,
                                              "auth": "plain"}), self.recorder, self.clock)

    def ringing(self) -> tuple[list[Beat], list[Beat]]:
        """An incoming call's beats: until it rings, and the rest (answered, ended)."""
        beats = Play("incoming-answered").beats(self.fake.pbx)
        return beats[:5], beats[5:]

    def play(self, link: _Link, beats: list[Beat]) -> None:
        for beat in beats:
            self.fake.broadcast(beat.fields)
        link.to_client()

    def call_id(self, n: int) -> str:
        return [h.call_id for h in self.recorder.happened if isinstance(h, Started)][n]

    def test_a_call_ringing_before_the_first_list_is_not_resumed(self) -> None:
        link = _Link(self.pbx, self.fake)
        link.log_in()
        ringing, rest = self.ringing()
        self.play(link, ringing)  # the call's events reach dpvoip first...
        link.pump()  # ...then the list, taken after them: it shows the call's channels
        self.assertIsNone(self.pbx._listing)
        status = self.pbx.status
        self.assertEqual((status.calls_resumed, status.calls_adopted,
                          status.orphans_closed), (0, 0, 0),
                         "begun after the login: neither resumed, adopted nor closed")
        link.cut()
        link = _Link(self.pbx, self.fake)
        link.log_in()
        link.pump()
        self.assertEqual((status.calls_resumed, status.orphans_closed), (1, 0),
                         "followed through the reconnect: the one call resumed")
        self.play(link, rest)
        call = self.call_id(0)
        self.assertEqual(self.recorder.kinds(), [("started", call), ("answered", call),
                                                 ("ended", call, Outcome.ANSWERED)])

    def test_a_refused_list_leaves_a_call_begun_since_the_login_followed(self) -> None:
        self.fake.account.reporting = False  # the list is refused
        link = _Link(self.pbx, self.fake)
        link.log_in()
        ringing, rest = self.ringing()
        self.play(link, ringing)  # before the refusal
        link.pump()
        self.assertIsNone(self.pbx._listing)
        self.play(link, rest)
        call = self.call_id(0)
        self.assertEqual(self.recorder.kinds(), [("started", call), ("answered", call),
                                                 ("ended", call, Outcome.ANSWERED)])
        self.assertEqual((self.pbx.status.orphans_closed, self.pbx.status.calls_resumed),
                         (0, 0))

    def test_a_refused_list_at_a_reconnect_closes_only_the_calls_followed_before(
            self) -> None:
        self.fake.account.reporting = False
        link = _Link(self.pbx, self.fake)
        link.log_in()
        link.pump()  # the first list refused: nothing followed yet
        before, _ = self.ringing()
        self.play(link, before)
        link.cut()
        link = _Link(self.pbx, self.fake)
        link.log_in()
        since, rest = self.ringing()
        self.play(link, since)  # a second call rings before the refusal comes
        link.pump()
        first, second = self.call_id(0), self.call_id(1)
        self.assertEqual(self.recorder.kinds(), [("started", first), ("started", second),
                                                 ("ended", first, Outcome.INTERRUPTED)])
        ended = self.recorder.happened[-1]
        assert isinstance(ended, Ended)
        self.assertEqual(ended.detail and ended.detail.reason, Reason.LINK_LOST)
        self.assertEqual((self.pbx.status.orphans_closed, self.pbx.status.calls_resumed),
                         (1, 0))
        self.play(link, rest)
        self.assertEqual(self.recorder.kinds()[3:], [("answered", second),
                                                     ("ended", second, Outcome.ANSWERED)])
