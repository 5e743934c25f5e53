"""A Fritz!Box CallMonitor simulator: plays a script of CallMonitor lines to TCP clients.

dpvoip's CallMonitor client connects to it exactly as to port 1012 of a real box, so the
tests and the README demo exercise the real protocol: CRLF-terminated lines, silence
between events, events lost while nobody is connected, a box that closes, resets or
refuses connections (rebooting), and framing a careful client must survive (partial
lines, LF only, several lines in one write).

Two halves. ``parse_script`` is pure: text in, a ``Script`` (frozen dataclasses) or a
``ScriptError`` naming the line out. ``FritzSimulator`` does the I/O and takes every
timing from the injected reactor, so that a ``Clock`` drives it in tests and the real
reactor on loopback. ``serve`` is the ``dpvoip fritz-sim`` command.

Script format, one step per line (blank lines and ``#`` comment lines are skipped)::

    <delay> <callmonitor line>   wait <delay> s after the previous step, send line + CRLF
    <delay> !raw <text>          send exact bytes; escapes \\r \\n \\t \\\\ \\xNN
    <delay> !close               close every client connection cleanly (FIN)
    <delay> !reset               abort every client connection (RST), once the lines
                                 before it are out
    <delay> !refuse <seconds>    close connections, refuse new ones (RST), listen again
    <delay> !await               wait until a client is connected

``{now}``, ``{now+N}``, ``{now-N}`` (N whole seconds) become the box's local time when the
step is sent, in both kinds of line.

The call list (TR-064). Given a ``FakeTr064Box`` (``box=``; ``dpvoip fritz-sim
--tr064-port``), the simulator also keeps the box's call list, from the same script:
every line it plays (sent, or lost because nobody is connected, or withheld by
``!quiet``) goes through a ``CallBook`` (``dpvoip/testing/callbook.py``), which follows
each connection id as the box does. A call's final entry reaches the list
``list_delay`` seconds (5 by default) after its DISCONNECT, with its Type (1 answered,
also by the answering machine: Port 40-49 or 6; 2 missed; 3 outgoing; 10 blocked),
numbers, start minute, talk time, Port and Device; while a call is connected the list
holds it as active (Type 9 or 11). Blocked or missed: an unanswered incoming call whose
DISCONNECT is played less than 1 s after its RING was blocked by the box, a longer one
was missed, unless ``!list-as`` says otherwise. So calls played while dpvoip was away
are still in the list, which is what dpvoip recovers them from. The directives for the
list side (without a box they are played as no-ops, with a log line)::

    <delay> !list-reset          the box's list is cleared (ids restart, new timestamp)
    <delay> !list-as <id> blocked|missed
                                 the unanswered call on connection id <id> (ringing now,
                                 else the next to ring on it) is listed so, whatever
                                 its timing (the box disagreeing with dpvoip's guess)
    <delay> !tr064 fail <kind>   the TR-064 side fails from now on: auth, rights,
                                 locked, garbage, garbage_list or slow
    <delay> !tr064 ok            ... and behaves again
    <delay> !quiet <seconds>     the lines of the next <seconds> are played but sent to
                                 no client (dropped: dpvoip misses them; the list has
                                 them); 0 ends a quiet spell at once
    <delay> !alone               wait until no client is connected (dpvoip stopped);
                                 with ``!await`` after the calls, a scenario of calls
                                 taken while dpvoip was away

Scripts without these directives play exactly as before.
"""

from __future__ import annotations

import math
import re
import socket
import sys
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IListeningPort,
    IPullProducer,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.failure import Failure
from zope.interface import implementer, provider

from dpvoip.deferreds import EmptyableSet, OneShotObserver
from dpvoip.fritzbox.calllist import ListedCall
from dpvoip.testing.callbook import MARKS, CallBook, LineSplitter, Listing
from dpvoip.testing.tr064 import FAILURES, FakeTr064Box

BOX_TIME = "%d.%m.%y %H:%M:%S"
"""The box's timestamp format (local wall clock, no zone)."""

STOP_GRACE = 2.0
"""Seconds ``stop()`` lets clients take their last bytes before aborting them."""

LIST_DELAY = 5.0
"""Seconds from a call's DISCONNECT to its entry in the box's call list."""

DIRECTIVES = ("!raw", "!close", "!reset", "!refuse", "!await", "!alone", "!quiet",
              "!list-reset", "!list-as", "!tr064")

log = Logger()


class ScriptError(ValueError):
    """A script line that cannot be played; the message names the line and the problem."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class Send:
    """A CallMonitor line, sent with CRLF appended; may hold ``{now}`` placeholders."""

    text: str


@dataclass(frozen=True)
class Raw:
    """Exact bytes (escapes already decoded); may hold ``{now}`` placeholders."""

    data: bytes


@dataclass(frozen=True)
class Close:
    """Close every client connection cleanly, as a box does when its service stops."""


@dataclass(frozen=True)
class Reset:
    """Abort every client connection (RST), as after a crash or a NAT change."""


@dataclass(frozen=True)
class Refuse:
    """Close connections and refuse new ones for ``seconds``, as a rebooting box does."""

    seconds: float


@dataclass(frozen=True)
class Await:
    """Hold the script until at least one client is connected."""


@dataclass(frozen=True)
class Alone:
    """Hold the script until no client is connected (dpvoip was stopped)."""


@dataclass(frozen=True)
class Quiet:
    """Send the lines of the next ``seconds`` to no client (they still make the list)."""

    seconds: float


@dataclass(frozen=True)
class ListReset:
    """The box's call list is cleared."""


@dataclass(frozen=True)
class ListAs:
    """The unanswered call on ``conn_id`` is listed as ``kind`` (blocked or missed)."""

    conn_id: int
    kind: str


@dataclass(frozen=True)
class Tr064Failure:
    """The TR-064 side fails with ``kind`` (one of the fake box's ``FAILURES``) from now
    on; None: it behaves again."""

    kind: str | None


Action = (Send | Raw | Close | Reset | Refuse | Await | Alone | Quiet | ListReset | ListAs
          | Tr064Failure)


@dataclass(frozen=True)
class Step:
    """Wait ``delay`` seconds after the previous step, then do ``action``."""

    delay: float
    action: Action
    line: int
    """Line number in the script text, for messages."""


@dataclass(frozen=True)
class Script:
    steps: tuple[Step, ...]

    @property
    def duration(self) -> float:
        """Seconds one play takes at least (delays and refusals; waiting for clients aside)."""
        return sum(s.delay + (s.action.seconds if isinstance(s.action, Refuse) else 0.0)
                   for s in self.steps)


# --- the pure part -----------------------------------------------------------------------

_STEP = re.compile(r"(\S+)(?:[ \t]+(.*))?\Z", re.DOTALL)
_DIRECTIVE = re.compile(r"(!\S*)(?:[ \t](.*))?\Z", re.DOTALL)
_PLACEHOLDER = re.compile(rb"\{now[^}]*\}?")
_NOW = re.compile(rb"\{now(?:([+-])(\d+))?\}")
_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}
_HEX = re.compile(r"[0-9a-fA-F]{2}")


def parse_script(text: str) -> Script:
    """The steps of a script; the first malformed line raises ``ScriptError``."""
    steps = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            steps.append(_parse_step(number, line.lstrip()))
    return Script(tuple(steps))


def _parse_step(number: int, line: str) -> Step:
    match = _STEP.match(line)
    assert match is not None  # the line is not blank
    delay = _seconds(number, "delay", match[1])
    rest = match[2] or ""
    if not rest.strip():
        raise ScriptError(number, f"nothing after the delay {match[1]!r}: expected a "
                                  f"CallMonitor line or one of {', '.join(DIRECTIVES)}")
    if rest.startswith("!"):
        return Step(delay, _parse_directive(number, rest), number)
    text = rest.rstrip()
    _check_placeholders(number, text.encode())
    return Step(delay, Send(text), number)


def _parse_directive(number: int, rest: str) -> Action:
    match = _DIRECTIVE.match(rest)
    assert match is not None  # rest starts with "!"
    name, argument = match[1], match[2]
    given = (argument or "").strip()
    if name == "!raw":
        if not argument:
            raise ScriptError(number, "!raw needs the text to send")
        data = _unescape(number, argument)
        _check_placeholders(number, data)
        return Raw(data)
    if name == "!refuse":
        if not given:
            raise ScriptError(number, "!refuse needs the seconds to refuse connections for")
        return Refuse(_seconds(number, "!refuse time", given))
    if name == "!quiet":
        if not given:
            raise ScriptError(number, "!quiet needs the seconds to send nothing for")
        return Quiet(_seconds(number, "!quiet time", given))
    if name == "!list-as":
        return _list_as(number, given)
    if name == "!tr064":
        return _tr064(number, given)
    simple: dict[str, Action] = {"!close": Close(), "!reset": Reset(), "!await": Await(),
                                 "!alone": Alone(), "!list-reset": ListReset()}
    if name not in simple:
        raise ScriptError(number, f"unknown directive {name!r} (known: {', '.join(DIRECTIVES)})")
    if given:
        raise ScriptError(number, f"{name} takes no argument, got {given!r}")
    return simple[name]


def _list_as(number: int, given: str) -> ListAs:
    words = given.split()
    usage = f"!list-as needs a connection id and one of {', '.join(MARKS)}"
    if len(words) != 2:
        raise ScriptError(number, f"{usage}, got {given!r}")
    if not words[0].isdigit():
        raise ScriptError(number, f"!list-as connection id {words[0]!r} is not a number")
    if words[1] not in MARKS:
        raise ScriptError(number, f"{usage}, got {words[1]!r}")
    return ListAs(int(words[0]), words[1])


def _tr064(number: int, given: str) -> Tr064Failure:
    words = given.split()
    if words == ["ok"]:
        return Tr064Failure(None)
    if len(words) == 2 and words[0] == "fail" and words[1] in FAILURES:
        return Tr064Failure(words[1])
    if len(words) == 2 and words[0] == "fail":
        raise ScriptError(number, f"!tr064 fail: unknown failure {words[1]!r} "
                                  f"(known: {', '.join(FAILURES)})")
    raise ScriptError(number, f"!tr064 takes 'ok' or 'fail <kind>' (kinds: "
                              f"{', '.join(FAILURES)}), got {given!r}")


def _seconds(number: int, what: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScriptError(number, f"{what} {text!r} is not a number of seconds "
                                  "(a step is '<delay> <line>')") from None
    if not math.isfinite(value) or value < 0:
        raise ScriptError(number, f"{what} {text!r} must be a finite number of seconds >= 0")
    return value


def _unescape(number: int, text: str) -> bytes:
    """``!raw`` text to bytes: UTF-8, with the escapes \\r \\n \\t \\\\ \\xNN."""
    out = bytearray()
    index = 0
    while index < len(text):
        char = text[index]
        if char != "\\":
            out += char.encode()
            index += 1
            continue
        code = text[index + 1 : index + 2]
        if code in _ESCAPES:
            out += _ESCAPES[code]
            index += 2
        elif code == "x" and _HEX.fullmatch(text[index + 2 : index + 4]):
            out.append(int(text[index + 2 : index + 4], 16))
            index += 4
        else:
            shown = text[index : index + 2]
            raise ScriptError(number, f"unknown escape {shown!r} in !raw "
                                      "(known: \\r \\n \\t \\\\ \\xNN)")
    return bytes(out)


def _check_placeholders(number: int, data: bytes) -> None:
    for found in _PLACEHOLDER.finditer(data):
        if not _NOW.fullmatch(found[0]):
            shown = found[0].decode(errors="replace")
            raise ScriptError(number, f"bad placeholder {shown!r}: use {{now}}, {{now+N}} "
                                      "or {now-N} with N whole seconds")


def box_time(at: float, zone: ZoneInfo) -> str:
    """POSIX time ``at`` as the box writes it: local wall clock, ``dd.mm.yy HH:MM:SS``."""
    return datetime.fromtimestamp(at, zone).strftime(BOX_TIME)


def expand(data: bytes, at: float, zone: ZoneInfo) -> bytes:
    """Replace ``{now}``, ``{now+N}``, ``{now-N}`` by the box time ``at`` (+/- N s)."""

    def one(found: re.Match[bytes]) -> bytes:
        shift = int(found[2] or 0) * (-1 if found[1] == b"-" else 1)
        return box_time(at + shift, zone).encode()

    return _NOW.sub(one, data)


def payload(action: Send | Raw, at: float, zone: ZoneInfo) -> bytes:
    """The bytes a send step puts on the wire at time ``at``."""
    if isinstance(action, Send):
        return expand(action.text.encode() + b"\r\n", at, zone)
    return expand(action.data, at, zone)


# --- the I/O part ------------------------------------------------------------------------


@implementer(IPullProducer)
class _BoxSide(Protocol):
    """One client's connection as the box sees it: written to, never meaningfully read.

    It is also its transport's pull producer, for one thing only: the transport asks it
    to produce whenever it has written everything it was given, which is how a reset
    knows that the lines before it are out (Twisted writes on a later reactor turn, and
    an abort drops what is still buffered).
    """

    def __init__(self, simulator: FritzSimulator) -> None:
        self.simulator = simulator
        self._unwritten = False
        self._written: OneShotObserver[None] = OneShotObserver()
        self._registered = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        cast(IConsumer, self.transport).registerProducer(self, False)
        self._registered = True
        self.simulator.joined(self)

    def dataReceived(self, data: bytes) -> None:
        # A real box ignores whatever clients send (keepalive newlines included).
        self.simulator.bytes_received += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._all_written()  # nothing more will be written: nobody waits for it
        self.simulator.left(self)

    def peer(self) -> str:
        assert self.transport is not None
        address: IAddress = self.transport.getPeer()
        if isinstance(address, IPv4Address | IPv6Address):
            return f"{address.host}:{address.port}"
        return str(address)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self._unwritten = True
        self.transport.write(data)

    def written(self) -> Deferred[None]:
        """Fires once everything sent so far has been written to the socket."""
        return self._written.when_fired() if self._unwritten else succeed(None)

    def resumeProducing(self) -> None:
        """The transport has written all it was given (IPullProducer)."""
        self._all_written()

    def stopProducing(self) -> None:
        """The connection is gone (IPullProducer)."""
        self._all_written()

    def _all_written(self) -> None:
        self._unwritten = False
        written, self._written = self._written, OneShotObserver()
        written.fire(None)

    def hang_up(self, abort: bool) -> None:
        assert self.transport is not None
        if self._registered:  # a transport with a producer would not close: it would
            self._registered = False  # ask it for more
            cast(IConsumer, self.transport).unregisterProducer()
        if abort:
            cast(ITCPTransport, self.transport).abortConnection()
        else:
            self.transport.loseConnection()


class _BoxFactory(Factory):
    noisy = False  # one listen per !refuse: no "Starting factory" lines each time

    def __init__(self, simulator: FritzSimulator) -> None:
        self.simulator = simulator

    def buildProtocol(self, addr: IAddress | None) -> _BoxSide:
        return _BoxSide(self.simulator)


class HeldPort:
    """A TCP port kept by the simulator from its first listen to its stop, listened on
    or not.

    A box that reboots refuses connections for a while and then listens on the same port
    again. Closing the listening socket and binding the port number again later races
    with every other program on the machine: one handed the port in between (by a
    ``listen(0)`` of its own) takes it, and the box cannot listen again. So a
    *reservation* socket stays bound to the port (never listening: connections are
    refused with RST, as by a closed port), and each listen is a new socket bound to the
    same port beside it. Both use ``SO_REUSEPORT`` and nothing else: no program binds the
    port meanwhile unless it asks for ``SO_REUSEPORT`` too and runs as the same user
    (Twisted's ``listenTCP`` never does), the kernel hands it to no ``listen(0)`` and
    uses it as no outgoing connection's port.
    """

    def __init__(self, host: str, port: int = 0) -> None:
        self.host = host
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._reservation = self._socket(port)
        self.port: int = self._reservation.getsockname()[1]

    def listen(self, reactor: Any, factory: Factory, backlog: int = 50) -> IListeningPort:
        """Listen on the held port (until the returned port's ``stopListening``)."""
        listening = self._socket(self.port)
        try:
            listening.listen(backlog)
            listening.setblocking(False)
            port: IListeningPort = reactor.adoptStreamPort(
                listening.fileno(), self.family, factory)
        finally:
            listening.close()  # the reactor has its own duplicate of the descriptor
        return port

    def release(self) -> None:
        """Give the port back."""
        self._reservation.close()

    def _socket(self, port: int) -> socket.socket:
        made = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            made.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            made.bind((self.host, port))
        except OSError as error:
            made.close()
            raise CannotListenError(self.host, port, error) from error
        return made


class FritzSimulator:
    """Serves a ``Script`` on a TCP port the way a Fritz!Box serves its CallMonitor.

    ``reactor`` needs ``adoptStreamPort``, ``callLater`` and ``seconds`` (the real
    reactor, or ``MemoryReactorClock`` in tests); all timing, ``{now}`` included, comes
    from it. Every line goes to every connected client; a line due while none is
    connected is lost (counted in ``lines_dropped``), as on a real box, which never
    queues. The port is held from ``listen()`` to ``stop()`` (see ``HeldPort``), also
    while a ``!refuse`` refuses connections.

    ``box``: the box's TR-064 side, whose call list the script's calls fill (module
    docstring); the caller listens and stops it. ``list_delay``: seconds from a
    DISCONNECT to the call's entry; ``blocked_within``: an unanswered RING ended sooner
    (play time) was blocked by the box.
    """

    def __init__(self, reactor: Any, script: Script, timezone: str = "Europe/Athens",
                 host: str = "127.0.0.1", *, box: FakeTr064Box | None = None,
                 list_delay: float = LIST_DELAY, blocked_within: float = 1.0) -> None:
        self.reactor = reactor
        self.script = script
        self.zone = ZoneInfo(timezone)
        self.host = host
        self.box = box
        self.list_delay = list_delay
        self.book = CallBook(self.zone, blocked_within)
        """The calls the box follows, from every line played (sent or not)."""
        self.port: int | None = None
        """The bound port, once ``listen()`` has fired."""
        self.connections = 0
        """Connections accepted so far."""
        self.lines_sent = 0
        """Send steps (lines or ``!raw``) written to at least one client."""
        self.lines_dropped = 0
        """Send steps due while no client was connected: lost."""
        self.bytes_received = 0
        """Bytes clients sent (keepalives); read and ignored."""
        self._factory = _BoxFactory(self)
        self._held: HeldPort | None = None
        self._listening: IListeningPort | None = None
        self._clients: list[_BoxSide] = []  # connected and not being hung up on
        self._open: EmptyableSet[_BoxSide] = EmptyableSet()  # every connection not lost yet
        # The next client to connect (a new observer after each: "!await" waits for one).
        self._next_client: OneShotObserver[None] = OneShotObserver()
        self._waiting: Deferred[Any] | None = None
        self._playing = False
        self._stopping = False
        # No client connected any more ("!alone" waits for it).
        self._alone: OneShotObserver[None] = OneShotObserver()
        self._quiet_until = -math.inf
        self._splitter = LineSplitter()
        self._listed: dict[int, tuple[int, int]] = {}  # call -> (list id, list timestamp)
        self._due: dict[int, Any] = {}  # call -> the delayed call putting its final entry

    @property
    def pending_entries(self) -> int:
        """Finished calls not in the call list yet (their ``list_delay`` is running)."""
        return len(self._due)

    @property
    def connected(self) -> int:
        """Clients connected now (a connection being closed no longer counts)."""
        return len(self._clients)

    @property
    def listening(self) -> bool:
        return self._listening is not None

    def listen(self, port: int = 0) -> Deferred[int]:
        """Listen on ``host``:``port`` (0: any free port), and hold the port until
        ``stop()``; fires with the port (``CannotListenError`` when it is taken)."""
        if self._listening is not None:
            return fail(RuntimeError(f"already listening on port {self.port}"))
        self._stopping = False
        try:
            self._held = HeldPort(self.host, port)
            self.port = self._held.port
            self._bind()
        except Exception:
            self._release()
            return fail()
        return succeed(self.port)

    def run(self) -> Deferred[None]:
        """Play the script once, after waiting for a first client; fires when it has ended
        (or ``stop()`` ended it). Cancelling the Deferred stops the play only."""
        if self._playing:
            raise RuntimeError("the script is already playing")
        if self._listening is None:
            raise RuntimeError("call listen() before run()")
        self._playing = True
        return Deferred.fromCoroutine(self._play())

    def stop(self) -> Deferred[None]:
        """End the play, stop listening and close every connection; fires when all are
        closed (clients that do not take their bytes within ``STOP_GRACE`` are aborted)."""
        self._stopping = True
        if self._waiting is not None:
            self._waiting.cancel()
        due, self._due = self._due, {}
        for call in due.values():
            call.cancel()
        return Deferred.fromCoroutine(self._shut())

    # -- the play

    async def _play(self) -> None:
        try:
            await self._until_connected()
            for step in self.script.steps:
                if step.delay > 0:
                    await self._wait(deferLater(self.reactor, step.delay))
                if self._stopping:
                    return
                await self._do(step.action)
        except CancelledError:
            if not self._stopping:
                raise  # the caller cancelled run(); stop() ending it is a normal end
        finally:
            self._playing = False

    async def _do(self, action: Action) -> None:
        match action:
            case Send() | Raw():
                data = payload(action, self.reactor.seconds(), self.zone)
                self._follow(data)
                self._send(data)
            case Close():
                self._hang_up(abort=False)
            case Reset():
                # The lines sent just before (on this very turn, say) go out first: an
                # abort drops whatever the transport has not written yet.
                await self._wait(gatherResults([side.written() for side in self._clients]))
                self._hang_up(abort=True)
            case Refuse(seconds):
                await self._refuse(seconds)
            case Await():
                await self._until_connected()
            case Alone():
                if self._clients:
                    log.info("waiting until no client is connected ({count} connected)",
                             count=len(self._clients))
                await self._until_alone()
            case Quiet(seconds):
                self._quiet_until = self.reactor.seconds() + seconds
                log.info("quiet for {seconds} s: lines reach no client", seconds=seconds)
            case ListAs(conn_id, kind):
                self.book.mark(conn_id, kind)
            case ListReset():
                self._on_box("!list-reset", lambda box: box.reset())
            case Tr064Failure(kind):
                self._on_box(f"!tr064 {'ok' if kind is None else 'fail ' + kind}",
                             lambda box: box.fail_with(kind))

    # -- the call list

    def _follow(self, data: bytes) -> None:
        """The box writes the calls of the lines it plays into its list, whoever hears."""
        now = self.reactor.seconds()
        for line in self._splitter.push(data):
            for listing in self.book.feed(line, now):
                if self.box is None:
                    continue  # followed all the same; no timers for a list nobody has
                if listing.final:
                    self._due[listing.key] = self.reactor.callLater(
                        self.list_delay, self._list, listing)
                else:
                    self._list(listing)

    def _list(self, listing: Listing) -> None:
        if listing.final:
            self._due.pop(listing.key, None)
        if self.box is None:
            return
        known = self._listed.pop(listing.key, None)
        entry: ListedCall | None = None
        if known is not None and known[1] == self.box.timestamp:
            entry = replace(listing.entry, id=known[0])
            try:
                self.box.change(entry)
            except KeyError:  # gone from the list since (a reset): listed anew
                entry = None
        if entry is None:
            entry = self.box.add(listing.entry)
        if not listing.final:
            self._listed[listing.key] = (entry.id, self.box.timestamp)
        log.info("call list: entry {id} type {type} {remote!r}", id=entry.id,
                 type=entry.type, remote=entry.remote)

    def _on_box(self, what: str, change: Any) -> None:
        if self.box is None:
            log.info("{what} ignored: no TR-064 side", what=what)
            return
        change(self.box)
        log.info("TR-064: {what}", what=what)

    def _send(self, data: bytes) -> None:
        shown = data.decode(errors="replace")
        if self.reactor.seconds() < self._quiet_until:
            self.lines_dropped += 1
            log.info("withheld (quiet): {data!r}", data=shown)
            return
        if not self._clients:
            self.lines_dropped += 1
            log.info("dropped (no client connected): {data!r}", data=shown)
            return
        for side in self._clients:
            side.send(data)
        self.lines_sent += 1
        log.info("sent to {count} client(s): {data!r}", count=len(self._clients), data=shown)

    def _hang_up(self, abort: bool) -> None:
        clients, self._clients = self._clients, []
        for side in clients:
            side.hang_up(abort)
        self._now_alone()
        if clients:
            log.info("{how} {count} connection(s)", count=len(clients),
                     how="aborting (RST)" if abort else "closing")

    async def _refuse(self, seconds: float) -> None:
        self._hang_up(abort=False)
        await self._stop_listening()
        log.info("refusing connections for {seconds} s", seconds=seconds)
        try:
            if seconds > 0:
                await self._wait(deferLater(self.reactor, seconds))
        finally:  # also when run() is cancelled: only stop() leaves the port closed
            if not self._stopping:
                self._bind()
                log.info("listening again on port {port}", port=self.port)

    async def _until_connected(self) -> None:
        if not self._clients:
            await self._wait(self._next_client.when_fired())

    async def _until_alone(self) -> None:
        if self._clients:
            await self._wait(self._alone.when_fired())

    def _now_alone(self) -> None:
        if not self._clients:
            alone, self._alone = self._alone, OneShotObserver()
            alone.fire(None)

    async def _wait(self, waiting: Deferred[Any]) -> Any:
        """Await ``waiting``, which ``stop()`` cancels."""
        self._waiting = waiting
        try:
            return await waiting
        finally:
            self._waiting = None

    # -- listening and connections

    def _bind(self) -> None:
        assert self._held is not None
        self._listening = self._held.listen(self.reactor, self._factory)

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.release()

    async def _stop_listening(self) -> None:
        listening, self._listening = self._listening, None
        if listening is not None:
            await maybeDeferred(listening.stopListening)

    async def _shut(self) -> None:
        self._hang_up(abort=False)
        await self._stop_listening()
        self._release()
        if not self._open:
            return
        timer = self.reactor.callLater(STOP_GRACE, self._abort_all)
        try:
            await self._open.when_empty()
        finally:
            if timer.active():
                timer.cancel()

    def _abort_all(self) -> None:
        for side in self._open:
            side.hang_up(abort=True)

    def joined(self, side: _BoxSide) -> None:
        """A client connected (called by its connection)."""
        self._open.add(side)
        if self._listening is None:  # accepted while the port was being closed
            side.hang_up(abort=False)
            return
        self.connections += 1
        self._clients.append(side)
        log.info("client {peer} connected ({count} connected)", peer=side.peer(),
                 count=len(self._clients))
        connected, self._next_client = self._next_client, OneShotObserver()
        connected.fire(None)

    def left(self, side: _BoxSide) -> None:
        """A client's connection is gone (called by it)."""
        if side in self._clients:
            self._clients.remove(side)
            self._now_alone()
        log.info("client {peer} disconnected ({count} connected)", peer=side.peer(),
                 count=len(self._clients))
        self._open.discard(side)  # last: this may end stop()


def office_box(reactor: Any, user: str, password: str, *, tls: bool = True,
                timezone: str = "Europe/Athens", clock: Any = None) -> FakeTr064Box:
    """A fake TR-064 side whose "now" (the list's ``days`` window) is the box's local
    wall clock in ``timezone``, from ``clock`` (default: the reactor), as the
    simulator's lines are."""
    zone = ZoneInfo(timezone)
    source = clock if clock is not None else reactor

    def now() -> datetime:
        return datetime.fromtimestamp(source.seconds(), zone).replace(tzinfo=None)

    return FakeTr064Box(reactor, user, password, tls=tls, clock=source, now=now)


# --- the command -------------------------------------------------------------------------

DEMO_USER = "dpvoip"
DEMO_PASSWORD = "demo-password"  # noqa: S105 - the simulator's documented demo login


@dataclass(frozen=True)
class ListSide:
    """``fritz-sim``'s TR-064 side: where it listens, the login it accepts, TLS or
    not, and the delay from a DISCONNECT to the list entry."""

    port: int
    user: str = DEMO_USER
    password: str = DEMO_PASSWORD
    tls: bool = True
    delay: float = LIST_DELAY

    def __repr__(self) -> str:  # the password stays out of any message
        return (f"ListSide(port={self.port}, user={self.user!r}, tls={self.tls}, "
                f"delay={self.delay})")


def config_lines(host: str, port: int, side: ListSide, tr064_port: int,
                 fingerprint: str | None) -> list[str]:
    """The ``[[fritzbox]]`` table pointing dpvoip at the simulator (the password only
    when it is the documented demo one: a password of the user's is never printed)."""
    lines = ["[[fritzbox]]", f'host = "{host}"', f"port = {port}",
             f'tr064_user = "{side.user}"']
    if side.password == DEMO_PASSWORD:
        lines.append(f'tr064_password = "{DEMO_PASSWORD}"')
    else:
        lines.append("# tr064_password = the --tr064-password given (not shown)")
    lines += [f"tr064_tls = {'true' if side.tls else 'false'}", f"tr064_port = {tr064_port}"]
    if fingerprint is not None:
        lines.append(f'tr064_certificate = "{fingerprint}"')
    return lines


def serve(path: str, port: int = 1012, host: str = "127.0.0.1",
          timezone: str = "Europe/Athens", loop: bool = False,
          tr064: ListSide | None = None) -> int:
    """``dpvoip fritz-sim``: play the script at ``path`` on ``host``:``port``; with
    ``tr064``, serve the box's TR-064 side too, its call list filled by the script.

    Exits 0 when the script has been played (and its last bytes delivered), or on Ctrl-C
    or SIGTERM; 2 for a bad script or time zone, 1 when a port cannot be bound. With
    ``tr064`` it keeps serving the list after the play, until Ctrl-C or SIGTERM (dpvoip
    reads it when it comes back).
    """
    try:
        script = parse_script(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        print(f"fritz-sim: cannot read {path}: {error.strerror or error}", file=sys.stderr)
        return 2
    except ScriptError as error:
        print(f"fritz-sim: {path}: {error}", file=sys.stderr)
        return 2
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        print(f"fritz-sim: unknown time zone {timezone!r}", file=sys.stderr)
        return 2
    if loop and script.duration == 0:
        print(f"fritz-sim: {path}: --loop needs a script with some delay", file=sys.stderr)
        return 2

    from twisted.internet import task
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([_print_event], redirectStandardIO=False)
    async def main(reactor: Any) -> None:
        box = None if tr064 is None else office_box(
            reactor, tr064.user, tr064.password, tls=tr064.tls, timezone=timezone)
        simulator = FritzSimulator(reactor, script, timezone, host, box=box,
                                   list_delay=LIST_DELAY if tr064 is None else tr064.delay)
        try:
            bound = await simulator.listen(port)
        except CannotListenError as error:
            print(f"fritz-sim: cannot listen on {host}:{port}: {error.socketError}",
                  file=sys.stderr)
            raise SystemExit(1) from None
        shown_host = f"[{host}]" if ":" in host else host
        print(f"fritz-sim: serving {path} on {shown_host}:{bound} "
              "(point dpvoip's [[fritzbox]] host/port here)", flush=True)
        stopping = [False]
        forever: Deferred[None] = Deferred()

        def on_shutdown() -> Deferred[None]:
            stopping[0] = True
            if not forever.called:
                forever.callback(None)
            stopped = [simulator.stop()] + ([] if box is None else [box.stop()])
            return gatherResults(stopped).addCallback(lambda _: None)

        reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
        try:
            if box is not None and tr064 is not None:
                await _serve_list(box, tr064, host, bound, shown_host)
            while not stopping[0]:
                await simulator.run()
                if not loop:
                    break
            if box is not None and not stopping[0]:
                print("fritz-sim: script played; still serving the call list "
                      "(Ctrl-C to stop)", flush=True)
                await forever
        finally:
            await simulator.stop()
            if box is not None:
                await box.stop()

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    except SystemExit as exit_:  # react() always exits; the code is ours to return
        return int(exit_.code or 0)
    return 0


async def _serve_list(box: FakeTr064Box, side: ListSide, host: str, port: int,
                      shown_host: str) -> None:
    try:
        listening = await box.listen(side.port, interface=host)
    except CannotListenError as error:
        print(f"fritz-sim: cannot listen on {host}:{side.port} for TR-064: "
              f"{error.socketError}", file=sys.stderr)
        raise SystemExit(1) from None
    how = (f"over TLS, certificate SHA-256 {box.fingerprint}" if side.tls
           else "plain HTTP, no TLS")
    print(f"fritz-sim: TR-064 on {shown_host}:{listening} {how}; a call is listed "
          f"{side.delay:g} s after its DISCONNECT", flush=True)
    print("fritz-sim: dpvoip's configuration for this box:", flush=True)
    for line in config_lines(host, port, side, listening,
                             box.fingerprint if side.tls else None):
        print(line, flush=True)


@provider(ILogObserver)
def _print_event(event: LogEvent) -> None:
    """The simulator's own log lines on stdout, errors from anywhere on stderr."""
    from twisted.logger import LogLevel, formatEvent

    if event.get("log_namespace") == __name__:
        print(f"fritz-sim: {formatEvent(event)}", flush=True)
    elif event.get("log_level") in (LogLevel.error, LogLevel.critical):
        print(f"fritz-sim: {formatEvent(event)}", file=sys.stderr, flush=True)
        if "log_failure" in event:
            print(event["log_failure"].getTraceback(), file=sys.stderr, flush=True)
