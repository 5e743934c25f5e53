"""One Asterisk: kept connected and logged in, its events followed into call happenings
for the durable ingest, its state for ``/readyz``, ``/metrics`` and ``dpvoip check``, and
click-to-call through ``Originate``.

``AsteriskPbx`` joins the wire (``protocols.ami``) to the pure follower
(``asterisk.calls``) and to a recorder (``submit(happening, origin)``: the durable ingest),
and keeps ``AsteriskStatus``. ``AsteriskService`` is Twisted's ``ClientService``: connect,
reconnect with capped, jittered back-off forever (the Fritz!Box's policy), TCP keepalive,
TLS when the endpoint string says so. ``Dialler`` rings the user's own phone first, then
the number, in the configured outbound context.

A refused login is one clear error (``last_error``: what to check, never the secret),
logged once per kind until the login works again, and the service keeps retrying at the
back-off's pace: fixing ``manager.conf`` needs no restart of dpvoip.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dpvoip.asterisk.calls import CallFollower
from dpvoip.asterisk.messages import Message, Refused
from dpvoip.asterisk.probe import login_refused_text
from dpvoip.asterisk.settings import AsteriskSettings, endpoint_description, rules_of
from dpvoip.calls.ingest import Origin
from dpvoip.core.errors import summary
from dpvoip.core.happenings import Happening, Started
from dpvoip.core.log_budget import LogBudget, more_like_this
from dpvoip.core.numbers import Dialling
from dpvoip.core.outcomes import Outcome
from dpvoip.deferreds import EmptyableSet, OneShotObserver
from dpvoip.internals import QuietClientService
from dpvoip.protocols.ami import (
    ActionFailed,
    ActionTimedOut,
    AmiError,
    AmiProtocol,
    Credentials,
    NotConnected,
)
from dpvoip.reconnecting import keepalive, retry_policy
from dpvoip.spool.durable import NotRecorded

log = Logger(namespace="dpvoip.asterisk")

_EXTENSION = re.compile(r"[0-9]{2,8}")
_NUMBER = re.compile(r"\+?[0-9]{3,20}")


class Recorder(Protocol):
    """What a PBX needs of the ingest entry point (``DurableIngest``, or a test's)."""

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]: ...


@dataclass
class AsteriskStatus:
    """A PBX's state and counters: what ``/readyz``, ``/metrics`` and ``dpvoip check``
    show of it."""

    name: str
    host: str
    port: int
    connected: bool = False
    logged_in: bool = False
    since: datetime | None = None
    last_event_at: datetime | None = None
    last_error: str = ""
    version: str = ""
    connections: int = 0
    reconnects: int = 0
    events: int = 0
    refused_messages: int = 0
    login_failures: int = 0
    peer_failures: int = 0  # dead peers (no Pong), not an AMI, over-long lines
    orphans_closed: int = 0
    calls_resumed: int = 0  # followed on after a reconnect: the PBX still had them
    calls_adopted: int = 0  # in progress, not followed, found in the PBX's list at a login
    calls_evicted: int = 0
    not_recorded: int = 0
    originated: int = 0
    originate_refused: int = 0
    originate_unanswered: int = 0  # the user's own phone did not answer

    def as_json(self, open_calls: int, cdr: tuple[int, int]) -> dict[str, Any]:
        return {
            "name": self.name, "host": self.host, "port": self.port,
            "connected": self.connected, "logged_in": self.logged_in,
            "since": self.since.isoformat() if self.since else None,
            "last_event": self.last_event_at.isoformat() if self.last_event_at else None,
            "last_error": self.last_error or None, "version": self.version or None,
            "reconnects": self.reconnects, "events": self.events,
            "refused_messages": self.refused_messages,
            "login_failures": self.login_failures, "peer_failures": self.peer_failures,
            "open_calls": open_calls, "calls_resumed": self.calls_resumed,
            "calls_adopted": self.calls_adopted,
            "calls_evicted": self.calls_evicted,
            "not_recorded": self.not_recorded, "originated": self.originated,
            "originate_refused": self.originate_refused,
            "originate_unanswered": self.originate_unanswered,
            "cdr_confirmed": cdr[0], "cdr_disagreed": cdr[1],
        }


def origin_of(settings: AsteriskSettings) -> Origin:
    """Where a PBX's happenings come from: its name and its numbers' country (also what
    the spool's replay needs to apply them again), that its calls write the CRM's sales
    side, as a cloud PBX's (Zadarma's) do, and that a call closed as interrupted, then
    found again in the list of channels, ends as it really did."""
    return Origin(settings.name, Dialling(settings.country, settings.area_code),
                  source="asterisk", sales_side=True, late_ends=True)


@dataclass
class _Listing:
    """A ``CoreShowChannels`` under way: the calls followed when it was asked for, the
    channels listed so far, and the Uniqueids of the channels made and hung up since it
    was asked for (events keep coming).

    Only the calls in ``followed`` can have been cut by a reconnect: a call whose events
    came after the list was asked for (it may come before or after them, as the PBX
    takes it) is known from those events, is no call resumed, and is not closed when
    the list fails."""

    action_id: str
    followed: frozenset[str] = frozenset()
    listed: list[Message] = field(default_factory=list)
    made: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    deadline: IDelayedCall | None = None

    @property
    def alive(self) -> set[str]:
        return ({m.get("Uniqueid") for m in self.listed} | self.made) - self.gone

    @property
    def unseen(self) -> list[Message]:
        """The listed channels no event has spoken of since (those are followed from
        their events: the list would be older news)."""
        seen = self.made | self.gone
        return [m for m in self.listed if m.get("Uniqueid") not in seen]


class AsteriskPbx:
    """A PBX's events become happenings for the recorder; its status is kept here."""

    def __init__(self, settings: AsteriskSettings, recorder: Recorder,
                 clock: IReactorTime) -> None:
        self.settings = settings
        self._recorder = recorder
        self._clock = clock
        self.origin = origin_of(settings)
        self.follower = CallFollower(rules_of(settings), self._disagreed)
        self.status = AsteriskStatus(settings.name, settings.host, settings.port)
        self.pending: EmptyableSet[Deferred[None]] = EmptyableSet()
        self.connection: AmiProtocol | None = None
        self.budget = LogBudget()
        self._ready_watchers: list[Callable[[bool], None]] = []
        self._listing: _Listing | None = None  # CoreShowChannels after each login
        self._listed_once: OneShotObserver[None] = OneShotObserver()

    def credentials(self) -> Credentials:
        settings = self.settings
        return Credentials(settings.username, settings.secret, settings.auth,
                           settings.events)

    def protocol(self) -> AmiProtocol:
        settings = self.settings
        return AmiProtocol(self, self._clock, self.credentials(),
                           keepalive=settings.keepalive_seconds,
                           timeout=settings.action_timeout_seconds)

    def watch(self, watcher: Callable[[bool], None]) -> None:
        """``watcher(True)`` at every login, ``watcher(False)`` at every loss."""
        self._ready_watchers.append(watcher)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def listed_once(self) -> Deferred[None]:
        """Fires once the PBX's channels were listed the first time (or could not be):
        the calls it still has are followed from then on."""
        return self._listed_once.when_fired()

    def settled(self) -> Deferred[None]:
        """Fires once no happening handed to the recorder is still being recorded."""
        return self.pending.when_empty()

    @property
    def address(self) -> str:
        host = self.settings.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.settings.port}"

    # -- to the recorder --------------------------------------------------------------------

    def _submit(self, happenings: list[Happening]) -> None:
        for happening in happenings:
            done = self._recorder.submit(happening, self.origin)
            self.pending.add(done)

            def settle(result: object, d: Deferred[None] = done,
                       h: Happening = happening) -> None:
                self.pending.discard(d)
                if isinstance(result, Failure):
                    self._failed(result, h)

            done.addBoth(settle)

    def _failed(self, failure: Failure, happening: Happening) -> None:
        if failure.check(NotRecorded):
            self.status.not_recorded += 1
        self._warn("record failed", "pbx {pbx}: {kind} of call {call} was not recorded: "
                   "{error}", kind=type(happening).__name__,
                   call=getattr(happening, "call_id", "?"), error=summary(failure.value))

    def _warn(self, topic: str, text: str, **fields: Any) -> None:
        write, held = self.budget.allow(topic, self._clock.seconds())
        if write:
            log.warn(text + "{more}", pbx=self.settings.name,
                     more=more_like_this(held, self.budget.window), **fields)

    def _disagreed(self, call_id: str, disposition: str, outcome: Outcome) -> None:
        self._warn("cdr", "pbx {pbx}: call {call}: the Cdr says {disposition}, the events "
                   "said {outcome}; the events' outcome is kept", call=call_id,
                   disposition=disposition, outcome=outcome.value)

    # -- from the protocol ------------------------------------------------------------------

    def logged_in(self, protocol: AmiProtocol, version: str) -> None:
        status = self.status
        if status.connections:
            status.reconnects += 1
        status.connections += 1
        self.connection = protocol
        status.connected = status.logged_in = True
        status.since = self._now()
        status.version = version
        if status.last_error:
            log.info("pbx {pbx}: logged in to {address} again (AMI {version}); the last "
                     "error was: {error}", pbx=self.settings.name, address=self.address,
                     version=version, error=status.last_error)
        else:
            log.info("pbx {pbx}: logged in to {address} (AMI {version})",
                     pbx=self.settings.name, address=self.address, version=version)
        status.last_error = ""
        self._resume(protocol)
        for watcher in self._ready_watchers:
            watcher(True)

    def _resume(self, protocol: AmiProtocol) -> None:
        """At every login, the PBX's channels (its ``CoreShowChannels``; the events
        meanwhile are handled as they come): a call followed before is followed on when
        the PBX still has it, else closed as interrupted (link lost); a call that began
        while the link was down, or while dpvoip was not running, is adopted
        (``CallFollower.adopt``). Without the list (the AMI user may not read it), the
        calls followed before the login are closed and the calls begun meanwhile are not
        recorded; a call whose events came since the login is followed on either way."""
        self._listing = None
        listing = self._listing = _Listing(protocol.new_action_id(),
                                           self.follower.followed_calls())
        protocol.send_action("CoreShowChannels", (), listing.action_id).addCallbacks(
            lambda _: None, lambda failure: self._listed(listing, failure))
        # A list that never ends must not keep the calls followed for ever.
        listing.deadline = self._clock.callLater(
            self.settings.action_timeout_seconds, lambda: self._listed(listing, Failure(
                ActionTimedOut("the list of channels did not end in time"))))

    def _listed(self, listing: _Listing, failure: Failure | None = None) -> None:
        if listing.deadline is not None and listing.deadline.active():
            listing.deadline.cancel()
        if self._listing is not listing:
            return  # the connection went again; the next login lists anew
        self._listing = None
        adopted: list[Happening] = []
        if failure is not None:
            # Without the list, the channels known to be up are those made since it was
            # asked for: the calls followed before are closed, a call begun since the
            # login (its events came before the refusal) is followed on.
            orphans = self.follower.resume(listing.made - listing.gone, self._now())
            self._warn("list", "pbx {pbx}: the channels could not be listed ({error}); "
                       "{lost}calls that began while dpvoip was not connected are not "
                       "recorded", error=summary(failure.value),
                       lost="the calls followed are closed as interrupted, and "
                       if orphans else "")
        else:
            orphans = self.follower.resume(listing.alive, self._now())
        # Resumed: followed before the list was asked for, and still followed now. Not the
        # calls open now: one whose events came before the list is no call resumed.
        self.status.calls_resumed += len(listing.followed & self.follower.followed_calls())
        if failure is None:
            adopted = self.follower.adopt(listing.unseen, self._now())
            calls = sum(1 for h in adopted if isinstance(h, Started))
            self.status.calls_adopted += calls
            if calls:
                log.info("pbx {pbx}: {calls} call(s) in progress that dpvoip was not "
                         "following (begun while it was not connected) found in the list of "
                         "channels: followed from now on", pbx=self.settings.name,
                         calls=calls)
        self.status.orphans_closed += len(orphans)
        self._submit(orphans + adopted)
        if not self._listed_once.fired:
            self._listed_once.fire(None)

    def login_refused(self, reason: str) -> None:
        self.status.login_failures += 1
        error = login_refused_text(self.settings.username, reason)
        if error != self.status.last_error:
            log.error("pbx {pbx}: {error}", pbx=self.settings.name, error=error)
        self.status.last_error = error

    def peer_failed(self, reason: str) -> None:
        self.status.peer_failures += 1
        self.status.last_error = reason
        self._warn("peer", "pbx {pbx}: {reason}; connecting again", reason=reason)

    def event_received(self, event: Message) -> None:
        listing = self._listing
        if listing is not None and event.action_id == listing.action_id:
            if event.event == "CoreShowChannel":
                # Bounded like the follower: a PBX listing more is not believed further.
                if len(listing.listed) < self.settings.max_channels:
                    listing.listed.append(event)
            elif event.event == "CoreShowChannelsComplete":
                self._listed(listing)
            return
        if listing is not None and event.event == "Newchannel":
            listing.made.add(event.get("Uniqueid"))  # made since the list was taken
        elif listing is not None and event.event == "Hangup":
            listing.gone.add(event.get("Uniqueid"))
        self.status.events += 1
        self.status.last_event_at = self._now()
        before = self.follower.counters.evicted
        happenings = self.follower.feed(event, self._now())
        evicted = self.follower.counters.evicted - before
        if evicted:
            self.status.calls_evicted += evicted
            self._warn("evicted", "pbx {pbx}: more than {limit} calls or {channels} channels "
                       "at once; the oldest closed as interrupted",
                       limit=self.settings.max_open_calls,
                       channels=self.settings.max_channels)
        self._submit(happenings)

    def message_refused(self, refused: Refused) -> None:
        self.status.refused_messages += 1
        self._warn("refused", "pbx {pbx}: a message with {reason} refused", reason=refused.reason)

    def connection_failed(self, reason: str) -> None:
        """A connection attempt failed (refused, no route, TLS...)."""
        if reason != self.status.last_error:
            log.warn("pbx {pbx}: cannot connect to {address}: {reason}",
                     pbx=self.settings.name, address=self.address, reason=reason)
        self.status.last_error = f"cannot connect: {reason}"

    def connection_lost(self, reason: Failure) -> None:
        was = self.status.logged_in
        self.connection = None
        self.status.connected = self.status.logged_in = False
        self.status.since = self._now()
        if was:
            log.info("pbx {pbx}: connection to {address} lost ({why})",
                     pbx=self.settings.name, address=self.address,
                     why=summary(reason.value))
            for watcher in self._ready_watchers:
                watcher(False)


class AsteriskService(QuietClientService):
    """Keeps one PBX connected and logged in, forever."""

    def __init__(self, pbx: AsteriskPbx, reactor: Any, endpoint: Any = None,
                 retry: Callable[[int], float] | None = None) -> None:
        settings = pbx.settings
        endpoint = endpoint or clientFromString(reactor, endpoint_description(settings))
        factory = Factory.forProtocol(pbx.protocol)
        factory.noisy = False
        policy = retry or retry_policy(settings.reconnect_initial_seconds,
                                       settings.reconnect_max_seconds)
        super().__init__(_Reporting(endpoint, pbx), factory, retryPolicy=policy,
                         clock=reactor, prepareConnection=keepalive)
        self.pbx = pbx
        self.name = f"asterisk {settings.name}"


@implementer(IStreamClientEndpoint)
class _Reporting:
    """The PBX's endpoint, telling the PBX why an attempt failed."""

    def __init__(self, endpoint: Any, pbx: AsteriskPbx) -> None:
        self._endpoint = endpoint
        self._pbx = pbx

    def connect(self, factory: Any) -> Deferred[Any]:
        attempt: Deferred[Any] = self._endpoint.connect(factory)

        def report(failure: Failure) -> Failure:
            self._pbx.connection_failed(summary(failure.value))
            return failure

        return attempt.addErrback(report)


class OriginateRefused(AmiError):
    """The PBX refused to place the call (no ``originate`` right, a bad channel)."""


class Dialler:
    """Click-to-call on one PBX: the user's own phone rings first; answered, the PBX
    dials the number in the outbound context (its routes, its trunk)."""

    def __init__(self, pbx: AsteriskPbx) -> None:
        self._pbx = pbx

    def dial(self, extension: str, number: str, caller_id: str = "") -> Deferred[str]:
        """Fires with the ``Originate``'s action id once the PBX has queued it; fails
        with ``ValueError`` (bad input, nothing sent), ``NotConnected``,
        ``OriginateRefused`` or ``ActionTimedOut``. Whether the user's phone answered is
        counted when Asterisk says (``originate_unanswered``)."""
        return Deferred.fromCoroutine(self._dial(extension, number, caller_id))

    async def _dial(self, extension: str, number: str, caller_id: str) -> str:
        if not _EXTENSION.fullmatch(extension):
            raise ValueError("the extension must be 2-8 digits")
        if not _NUMBER.fullmatch(number):
            raise ValueError("the number must be 3-20 digits, with an optional leading +")
        if any(c in caller_id for c in "\r\n\"<>"):
            raise ValueError("the caller id must be one line without quotes or <>")
        pbx = self._pbx
        protocol = pbx.connection
        if protocol is None or not protocol.logged_in:
            raise NotConnected(f"the PBX {pbx.settings.name} is not connected now")
        settings = pbx.settings
        action_id = protocol.new_action_id()
        answered = protocol.originate_response(action_id)
        answered.addCallbacks(self._first_leg, lambda _: None)
        shown = f'"{caller_id}" <{number}>' if caller_id else number
        try:
            await protocol.send_action("Originate", [
                ("Channel", f"{settings.originate_technology}/{extension}"),
                ("Context", settings.originate_context), ("Exten", number),
                ("Priority", "1"), ("CallerID", shown),
                ("Timeout", str(int(settings.originate_timeout_seconds * 1000))),
                ("Async", "true")], action_id)
        except ActionFailed as refused:
            protocol.forget_response(action_id)
            pbx.status.originate_refused += 1
            raise OriginateRefused(
                f"the PBX {settings.name} refused to call {extension} for {number}: "
                f"{refused.message or 'no reason given'} (does the manager.conf user "
                "have write = originate?)") from None
        except Exception:
            protocol.forget_response(action_id)
            raise
        pbx.status.originated += 1
        log.info("pbx {pbx}: ringing {extension} to call {number}",
                 pbx=settings.name, extension=extension, number=number)
        return action_id

    def _first_leg(self, response: Message) -> None:
        if response.response.lower() != "success":
            self._pbx.status.originate_unanswered += 1
            log.info("pbx {pbx}: click-to-call: the phone {channel} did not answer "
                     "(reason {reason})", pbx=self._pbx.settings.name,
                     channel=response.get("Channel"), reason=response.get("Reason"))


__all__ = ["AsteriskPbx", "AsteriskService", "AsteriskStatus", "Dialler", "NotConnected",
           "OriginateRefused", "origin_of"]
