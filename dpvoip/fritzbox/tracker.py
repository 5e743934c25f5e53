"""The per-box call tracker: CallMonitor events in, call happenings out.

A pure state machine, one per Fritz!Box connection stream, keyed by connection id (the box
reuses ids at once, so never by number). It knows nothing of databases or sockets: the
protocol feeds it parsed events and hands what it returns to the ingest entry point. Every
case of fritzbox.md sections 4 and 5 is decided here: answered, missed, voicemail,
blocked, not reached, fax, interrupted; connection-id reuse, call waiting and parallel
calls (independent ids), a CALL on a ringing id (the box forwarding the call), a hairpin
call to one of the office's own numbers, a RING or CALL on an id still open (a lost
DISCONNECT), and CONNECT or DISCONNECT for an id it never saw start.

Blocked or missed (an incoming call ended unanswered) is decided by how long it rang:
from the box's whole-second times, refined by the lines' arrival times when the events
carry them (``rang_for``; the rule is in docs/decisions.md, issue 16).

Bounded: at most ``max_open`` calls are followed at once. A RING or CALL beyond that
closes the oldest open call as interrupted (its DISCONNECT is taken as lost, as when its
id is reused), counted in ``evicted``; so a box that sends RINGs with fresh ids without
end cannot grow the tracker without end. Real boxes have a handful of lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from dpvoip.core.happenings import (
    Answered,
    Ended,
    Forwarded,
    Happening,
    Started,
    Unmatched,
)
from dpvoip.core.outcomes import FAX_EXTENSION, Detail, Outcome, Reason
from dpvoip.fritzbox.parser import Call, Connect, Disconnect, Event, Ring


def call_id(box: str, started: datetime, conn_id: int) -> str:
    """dpvoip's stable id of a Fritz!Box call: box, box-local start time, connection id."""
    return f"fb-{box}-{started:%Y%m%d%H%M%S}-{conn_id}"


@dataclass(frozen=True)
class BoxRules:
    """What a tracker needs to know about its box."""

    name: str
    zone: ZoneInfo
    machine_extensions: frozenset[int] = frozenset({6, *range(40, 50)})
    blocked_within: float = 2.0
    is_own_number: Callable[[str], bool] = field(default=lambda number: False)
    max_open: int = 64


@dataclass
class _Open:
    call_id: str
    direction: str
    started_local: datetime
    remote: str
    extension: int | None = None
    connected: bool = False
    forwarded_to: str = ""
    hairpin_of: str | None = None  # the call this id is the other leg of
    arrived: float | None = None  # when its RING or CALL line arrived (dpvoip's clock)


class CallTracker:
    def __init__(self, rules: BoxRules) -> None:
        self.rules = rules
        self._open: dict[int, _Open] = {}  # in the order the calls started
        self._last_identity: dict[int, tuple[str, int]] = {}
        self.evicted = 0  # calls closed because more than max_open were open

    def _identity(self, started: datetime, conn_id: int) -> str:
        """The call id; a second call on one id within one second (a blocked caller
        redialling) gets a suffix, the same one when the same lines are replayed."""
        identity = call_id(self.rules.name, started, conn_id)
        last, repeats = self._last_identity.pop(conn_id, ("", 0))
        repeats = repeats + 1 if last == identity else 0
        self._last_identity[conn_id] = (identity, repeats)  # the newest last
        if len(self._last_identity) > 2 * self.rules.max_open:
            del self._last_identity[next(iter(self._last_identity))]  # bounded as well
        return f"{identity}-{repeats + 1}" if repeats else identity

    @property
    def remembered_ids(self) -> int:
        """Connection ids whose last call id is kept (bounded like the open calls)."""
        return len(self._last_identity)

    def started_local(self, conn_id: int) -> datetime | None:
        """When the call open on ``conn_id`` started, by the box's clock (None: none)."""
        call = self._open.get(conn_id)
        return call.started_local if call is not None else None

    def _opening(self, conn_id: int, call: _Open, at: datetime) -> list[Happening]:
        """Follow ``call`` on ``conn_id``; beyond ``max_open``, close the oldest first."""
        closed: list[Happening] = []
        while len(self._open) >= self.rules.max_open:
            oldest = next(iter(self._open))
            gone = self._open.pop(oldest)
            self.evicted += 1
            if gone.hairpin_of is None:
                closed.append(Ended(gone.call_id, Outcome.INTERRUPTED, 0, at, gone.extension,
                                    Detail(Reason.ID_REUSED)))
        self._open[conn_id] = call
        return closed

    @property
    def open_calls(self) -> int:
        return sum(1 for call in self._open.values() if call.hairpin_of is None)

    def utc(self, local: datetime) -> datetime:
        """The box's wall-clock time in UTC (in an ambiguous autumn hour: the first one)."""
        return local.replace(tzinfo=self.rules.zone).astimezone(UTC)

    def feed(self, event: Event) -> list[Happening]:
        if isinstance(event, Ring):
            return self._ring(event)
        if isinstance(event, Call):
            return self._call(event)
        if isinstance(event, Connect):
            return self._connect(event)
        return self._disconnect(event)

    def close_all(self, reason: Reason, at: datetime) -> list[Happening]:
        """Close every open call as interrupted (the connection to the box was lost)."""
        ended: list[Happening] = []
        for conn_id in sorted(self._open):
            call = self._open.pop(conn_id)
            if call.hairpin_of is None:
                ended.append(Ended(call.call_id, Outcome.INTERRUPTED, 0, at, call.extension,
                                   Detail(reason)))
        return ended

    # -- events ------------------------------------------------------------------------

    def _lost_disconnect(self, conn_id: int, at: datetime) -> list[Happening]:
        previous = self._open.pop(conn_id, None)
        if previous is None or previous.hairpin_of is not None:
            return []
        return [Ended(previous.call_id, Outcome.INTERRUPTED, 0, at, previous.extension,
                      Detail(Reason.ID_REUSED))]

    def _ring(self, ring: Ring) -> list[Happening]:
        at = self.utc(ring.at)
        happened = self._lost_disconnect(ring.conn_id, at)
        if ring.caller and self.rules.is_own_number(ring.caller):
            leg = self._outgoing_to_own_number(ring.called)
            if leg is not None:
                happened += self._opening(ring.conn_id, _Open(
                    leg.call_id, "incoming", ring.at, ring.caller, hairpin_of=leg.call_id), at)
                return happened
        identity = self._identity(ring.at, ring.conn_id)
        happened += self._opening(ring.conn_id, _Open(identity, "incoming", ring.at,
                                                      ring.caller, arrived=ring.arrived), at)
        happened.append(Started(identity, self.rules.name, ring.conn_id, "incoming",
                                ring.caller, ring.called, ring.line, None, at))
        return happened

    def _outgoing_to_own_number(self, called: str) -> _Open | None:
        for call in self._open.values():
            if call.direction == "outgoing" and call.hairpin_of is None and (
                self.rules.is_own_number(call.remote)
                and _same_tail(call.remote, called)
            ):
                return call
        return None

    def _call(self, dialled: Call) -> list[Happening]:
        at = self.utc(dialled.at)
        current = self._open.get(dialled.conn_id)
        if (current is not None and current.direction == "incoming" and not current.connected
                and current.hairpin_of is None):
            # The box forwards the ringing call to an external number. (On the left-over
            # internal leg of a hairpin call whose DISCONNECT was lost, a CALL is new.)
            current.forwarded_to = dialled.called
            return [Forwarded(current.call_id, dialled.called, at)]
        happened = self._lost_disconnect(dialled.conn_id, at)
        identity = self._identity(dialled.at, dialled.conn_id)
        hairpin = bool(dialled.called) and self.rules.is_own_number(dialled.called)
        happened += self._opening(dialled.conn_id, _Open(
            identity, "outgoing", dialled.at, dialled.called, extension=dialled.extension,
            arrived=dialled.arrived), at)
        happened.append(Started(identity, self.rules.name, dialled.conn_id, "outgoing",
                                dialled.called, dialled.caller, dialled.line,
                                dialled.extension, at, hairpin=hairpin))
        return happened

    def _connect(self, connect: Connect) -> list[Happening]:
        at = self.utc(connect.at)
        call = self._open.get(connect.conn_id)
        if call is None:
            return [Unmatched(self.rules.name, connect.conn_id, at, connect.at, "CONNECT",
                              extension=connect.extension)]
        if call.hairpin_of is not None:
            return []  # the other leg's CONNECT says the same thing
        transfer = call.connected
        call.connected = True
        call.extension = connect.extension
        return [Answered(call.call_id, connect.extension, at, transfer=transfer)]

    def _disconnect(self, disconnect: Disconnect) -> list[Happening]:
        at = self.utc(disconnect.at)
        call = self._open.pop(disconnect.conn_id, None)
        if call is None:
            return [Unmatched(self.rules.name, disconnect.conn_id, at, disconnect.at,
                              "DISCONNECT", duration=disconnect.duration)]
        if call.hairpin_of is not None:
            return []
        gap = (disconnect.arrived - call.arrived
               if disconnect.arrived is not None and call.arrived is not None else None)
        outcome = decide(call.direction, call.started_local, disconnect.at, disconnect.duration,
                         call.extension if call.connected else None, self.rules,
                         arrival_gap=gap)
        detail = Detail(Reason.FORWARDED, call.forwarded_to) if call.forwarded_to else None
        if call.direction == "outgoing" and self.rules.is_own_number(call.remote):
            detail = Detail(Reason.HAIRPIN)
        return [Ended(call.call_id, outcome, disconnect.duration, at, call.extension, detail)]


def decide(
    direction: str,
    started_local: datetime,
    ended_local: datetime,
    duration: int,
    answered_on: int | None,
    rules: BoxRules,
    *,
    arrival_gap: float | None = None,
) -> Outcome:
    """The outcome of a finished call (fritzbox.md section 5). ``arrival_gap`` is the time
    between the arrivals of the call's first line and its DISCONNECT, by dpvoip's clock;
    None when unknown (a replayed capture, a call recovered from the database)."""
    if answered_on is not None:
        if direction == "incoming" and answered_on in rules.machine_extensions:
            return Outcome.VOICEMAIL
        if direction == "incoming" and answered_on == FAX_EXTENSION:
            return Outcome.FAX
        return Outcome.ANSWERED
    if duration > 0:
        return Outcome.ANSWERED  # talk time without a CONNECT we saw: it was answered
    if direction == "outgoing":
        return Outcome.NOT_REACHED
    box_span = (ended_local - started_local).total_seconds()
    if box_span <= 0:
        return Outcome.BLOCKED  # ended within the second it began, by the box: barred
    rang = rang_for(box_span, arrival_gap)
    return Outcome.BLOCKED if rang <= rules.blocked_within else Outcome.MISSED


def rang_for(box_span: float, arrival_gap: float | None) -> float:
    """How long an unanswered call rang, in seconds.

    The box's times are whole seconds, cut down: a span of ``box_span`` seconds between
    its RING and DISCONNECT means the call rang for more than ``box_span - 1`` and less
    than ``box_span + 1`` seconds, and where in that range depends on where the box's
    second boundary fell. The gap between the two lines' arrivals measures the same time
    to a fraction of a second, unless the network held a line back (a stall that delivers
    both at once: a gap of 0) or dpvoip's clock stepped. So the gap is believed only where
    the box's span allows it (less than a second away from it); else the span is."""
    if arrival_gap is not None and abs(arrival_gap - box_span) < 1:
        return arrival_gap
    return box_span


def _same_tail(a: str, b: str, digits: int = 6) -> bool:
    """Whether two spellings of a number end alike (MSNs come without area code)."""
    da, db = "".join(c for c in a if c.isdigit()), "".join(c for c in b if c.isdigit())
    if not da or not db:
        return False
    n = min(digits, len(da), len(db))
    return da[-n:] == db[-n:]


__all__ = [
    "Answered",
    "BoxRules",
    "CallTracker",
    "Ended",
    "Forwarded",
    "Happening",
    "Started",
    "Unmatched",
    "call_id",
    "decide",
    "rang_for",
]
