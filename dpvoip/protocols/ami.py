"""The Asterisk Manager Interface's wire: dpvoip's own ``LineReceiver``.

It reads the banner, logs in (``Login`` with the plain secret, or ``Challenge`` then
``Login`` with ``AuthType: MD5`` and the key, so that the secret never crosses the
network), asks for the event classes it wants (``Events: call,cdr``), then hands every
event to its sink and answers every action it sent through the ``Deferred`` its
``ActionID`` names. A ``Ping`` every ``keepalive`` seconds notices a dead peer (a hung
PBX, a path that drops packets): no answer within ``timeout`` and the connection is
aborted, so that the service connects again.

Nothing here knows what events mean (``dpvoip.asterisk.calls`` does) or where calls go.
Lines and messages are bounded: a line over ``MAX_LINE`` bytes drops the connection, a
message over the reader's bounds is refused and told to the sink. No log line or error
carries the secret.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from dpvoip.asterisk.messages import (
    Message,
    MessageReader,
    NotAsterisk,
    Refused,
    action,
    md5_key,
)
from dpvoip.config import Secret

#: Real AMI lines are under a few hundred bytes; 16 KiB without a newline is no AMI.
MAX_LINE = 16 * 1024


class AmiError(Exception):
    """Something the PBX refused or did not answer; the text says what, never a secret."""


class LoginRefused(AmiError):
    """The PBX refused the login (wrong user or secret, or a host it does not permit)."""


class ActionFailed(AmiError):
    """An action answered ``Response: Error``; ``message`` is the PBX's reason."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name} refused by the PBX: {message or 'no reason given'}")
        self.name = name
        self.message = message


class ActionTimedOut(AmiError):
    """No answer to an action in time: the PBX (or the path to it) is not answering."""


class NotConnected(AmiError):
    """No logged-in connection to the PBX now."""


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: Secret
    auth: str = "md5"  # "md5" | "plain"
    events: str = "call,cdr"

    def __repr__(self) -> str:
        return f"Credentials({self.username!r}, auth={self.auth!r})"


class AmiSink(Protocol):
    """What the protocol tells (a PBX's state and its call follower)."""

    def logged_in(self, protocol: AmiProtocol, version: str) -> None: ...
    def login_refused(self, reason: str) -> None: ...
    def event_received(self, event: Message) -> None: ...
    def message_refused(self, refused: Refused) -> None: ...
    def peer_failed(self, reason: str) -> None: ...
    def connection_lost(self, reason: Failure) -> None: ...


class AmiProtocol(LineReceiver):
    delimiter = b"\n"  # Asterisk ends lines with CRLF; the CR is taken off each line
    MAX_LENGTH = MAX_LINE

    def __init__(self, sink: AmiSink, clock: IReactorTime, credentials: Credentials,
                 keepalive: float = 20.0, timeout: float = 10.0) -> None:
        self._sink = sink
        self._clock = clock
        self._credentials = credentials
        self._keepalive_every = keepalive
        self._timeout = timeout
        self._reader = MessageReader()
        self._ids = itertools.count(1)
        self._answers: dict[str, tuple[Deferred[Message], IDelayedCall]] = {}
        self._responses: dict[str, Deferred[Message]] = {}  # OriginateResponse by id
        self._keepalive: LoopingCall | None = None
        self._banner_timer: IDelayedCall | None = None
        self.logged_in = False
        self.version = ""

    # -- the connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._banner_timer = self._clock.callLater(self._timeout, self._no_banner)

    def _no_banner(self) -> None:
        self._banner_timer = None
        self._fail("no Manager Interface banner: is this the AMI port (5038)?")

    def _fail(self, reason: str) -> None:
        self._sink.peer_failed(reason)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._banner_timer is not None and self._banner_timer.active():
            self._banner_timer.cancel()
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        answers, self._answers = self._answers, {}
        for waiting, timer in answers.values():
            if timer.active():
                timer.cancel()
            waiting.errback(ConnectionLost("the connection to the PBX was lost"))
        responses, self._responses = self._responses, {}
        for waiting in responses.values():
            waiting.errback(ConnectionLost("the connection to the PBX was lost"))
        self.logged_in = False
        self._sink.connection_lost(reason)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(f"a line longer than {MAX_LINE} bytes")

    def lineReceived(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", errors="replace")
        banner = self._reader.banner
        try:
            got = self._reader.feed(text)
        except NotAsterisk as error:
            self._fail(str(error))
            return
        if banner is None and self._reader.banner is not None:
            self.version = self._reader.version
            if self._banner_timer is not None and self._banner_timer.active():
                self._banner_timer.cancel()
            self._banner_timer = None
            Deferred.fromCoroutine(self._login())
        elif isinstance(got, Refused):
            self._sink.message_refused(got)
        elif got is not None:
            self._message(got)

    def _message(self, message: Message) -> None:
        waiting = self._answers.pop(message.action_id, None) if message.is_response else None
        if waiting is not None:
            deferred, timer = waiting
            if timer.active():
                timer.cancel()
            deferred.callback(message)
            return
        if message.is_event:
            if message.event == "OriginateResponse":
                response = self._responses.pop(message.action_id, None)
                if response is not None:
                    response.callback(message)
            self._sink.event_received(message)

    # -- actions -------------------------------------------------------------------------

    def new_action_id(self) -> str:
        return f"dpvoip-{next(self._ids)}"

    def send_action(self, name: str, fields: Sequence[tuple[str, str]] = (),
                    action_id: str = "") -> Deferred[Message]:
        """Send an action; fires with its response (``Response: Error`` fails with
        ``ActionFailed``), or fails with ``ActionTimedOut`` after ``timeout``."""
        if self.transport is None:
            raise NotConnected("not connected to the PBX")
        action_id = action_id or self.new_action_id()
        waiting: Deferred[Message] = Deferred()
        timer = self._clock.callLater(self._timeout, self._timed_out, action_id, name)
        self._answers[action_id] = (waiting, timer)
        self.transport.write(action(name, fields, action_id))

        def judged(response: Message) -> Message:
            if response.response.lower() not in ("success", "goodbye", "follows"):
                raise ActionFailed(name, response.get("Message"))
            return response

        return waiting.addCallback(judged)

    def _timed_out(self, action_id: str, name: str) -> None:
        waiting = self._answers.pop(action_id, None)
        if waiting is not None:
            waiting[0].errback(ActionTimedOut(
                f"no answer to {name} within {self._timeout:g} s"))

    def originate_response(self, action_id: str) -> Deferred[Message]:
        """Fires with the ``OriginateResponse`` event of the ``Originate`` to be sent as
        ``action_id`` (ask before sending it)."""
        waiting: Deferred[Message] = Deferred()
        self._responses[action_id] = waiting
        return waiting

    def forget_response(self, action_id: str) -> None:
        """No ``OriginateResponse`` will come (the ``Originate`` was refused)."""
        self._responses.pop(action_id, None)

    # -- login and keepalive ---------------------------------------------------------------

    async def _login(self) -> None:
        credentials = self._credentials
        fields = [("Username", credentials.username)]
        try:
            if credentials.auth == "md5":
                challenge = await self.send_action("Challenge", [("AuthType", "MD5")])
                key = md5_key(challenge.get("Challenge"), credentials.secret.reveal())
                fields += [("AuthType", "MD5"), ("Key", key)]
            else:
                fields.append(("Secret", credentials.secret.reveal()))
            fields.append(("Events", credentials.events))
            await self.send_action("Login", fields)
        except ActionFailed as refused:
            self._sink.login_refused(refused.message or "Authentication failed")
            self.abort()
            return
        except ActionTimedOut as error:
            self._fail(f"login: {error}")
            return
        except ConnectionLost:
            return  # told by connectionLost
        self.logged_in = True
        self._keepalive = LoopingCall(self._ping)
        self._keepalive.clock = self._clock
        self._keepalive.start(self._keepalive_every, now=False)
        self._sink.logged_in(self, self.version)

    def _ping(self) -> None:
        pinged = self.send_action("Ping")

        def dead(failure: Failure) -> None:
            if failure.check(ActionTimedOut):
                self._fail(f"no answer to a Ping within {self._timeout:g} s: the PBX or "
                           "the path to it is dead")
            elif failure.check(ActionFailed):
                self._fail(f"Ping refused: {failure.value}")

        pinged.addCallbacks(lambda _: None, dead)
