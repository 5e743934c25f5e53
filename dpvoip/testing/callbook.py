"""The box's call book: what a Fritz!Box writes into its call list, learned from the
CallMonitor lines it plays.

A real box keeps its call list (TR-064, fritzbox.md section 7) from its own state, not
from what any client heard on port 1012: a call played while nobody was connected is
still listed. ``CallBook`` follows each connection id the way the box does (RING or CALL
opens a call, CONNECT answers it, DISCONNECT ends it; ids are reused at once) and says,
as plain data, which list entries the box would write and when:

- at a call's first CONNECT, an *active* entry (Type 9 incoming, 11 outgoing), which the
  box rewrites when the call ends;
- at its DISCONNECT, the *final* entry, which the simulator puts into the list a few
  seconds later (a real box takes about 5 s): Type 1 answered (by a person or by the
  answering machine: ``Port`` 40-49 or 6), 2 missed, 3 outgoing (reached or not), 10
  blocked.

Blocked or missed: an incoming call that ends unanswered less than ``blocked_within``
seconds (1 s by default) of *play time* after its RING is one the box blocked (Type
10), a longer one is missed (Type 2). A script can say otherwise for one call with
``mark(conn_id, "blocked" | "missed")`` (the simulator's ``!list-as`` directive): the
call open on that id, or else the next one to ring on it, is listed so whatever its
timing. This is how a scenario makes the box disagree with dpvoip's own guess.

The entry's ``Date`` is the call's start as the box wrote it on its RING or CALL line,
truncated to the minute (the list has no seconds); a line whose date does not parse is
dated by its play time in the box's zone. ``Duration`` is the DISCONNECT's talk time
(the list renders it ``h:mm``, minutes rounded up). ``Port`` is the extension code of
the last CONNECT (answered and outgoing calls; empty for missed and blocked ones),
``Device`` a name for it as a box shows it.

The box's own choices where a script is odd: a RING or CALL on an id still open ends the
open call first (its DISCONNECT was lost on the port, not on the box), dated by the new
line; a CALL on an id that is ringing is the box forwarding the incoming call (spec
section 4), listed as that incoming call (answered when the forwarded leg connected);
CONNECT and DISCONNECT on an id with no open call (the call began before the script)
and lines that are not CallMonitor events are ignored.

Pure: no I/O, no reactor; play times are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from dpvoip.fritzbox.calllist import (
    ACTIVE_INCOMING,
    ACTIVE_OUTGOING,
    BLOCKED,
    INCOMING,
    MISSED,
    OUTGOING,
    ListedCall,
)

BOX_TIME = "%d.%m.%y %H:%M:%S"
MARKS = ("blocked", "missed")


@dataclass(frozen=True)
class Listing:
    """An entry the box writes: ``key`` names the call (the same for its active and its
    final entry), ``entry`` has id 0 (the list numbers it), ``at`` is the play time of
    the line that caused it; ``final`` entries are due in the list a while after ``at``,
    active ones at once."""

    key: int
    entry: ListedCall
    at: float
    final: bool


@dataclass
class _Open:
    key: int
    outgoing: bool
    remote: str
    own_number: str
    date: datetime
    rang_at: float
    extension: str = ""
    connected_at: float | None = None
    forwarded: bool = False
    mark: str | None = None


def device_name(extension: str) -> str:
    """What a box calls the device behind an extension code (spec section 3)."""
    try:
        code = int(extension)
    except ValueError:
        return ""
    names = {3: "Callthrough", 4: "ISDN", 5: "Fax", 6: "Anrufbeantworter"}
    if code in (0, 1, 2):
        return f"FON {code + 1}"
    if 10 <= code <= 19:
        return f"Mobilteil {code - 9}"
    if 20 <= code <= 29:
        return f"IP-Telefon {code - 19}"
    if 40 <= code <= 49:
        return f"Anrufbeantworter {code - 39}"
    return names.get(code, "")


@dataclass
class CallBook:
    """Follows CallMonitor lines per connection id; ``feed`` returns the list entries
    they make (see the module docstring)."""

    zone: ZoneInfo
    blocked_within: float = 1.0
    _open: dict[int, _Open] = field(default_factory=dict)
    _marks: dict[int, str] = field(default_factory=dict)
    _next_key: int = 1

    @property
    def open_ids(self) -> list[int]:
        """Connection ids with a call going on now."""
        return sorted(self._open)

    def mark(self, conn_id: int, kind: str) -> None:
        """List the call on ``conn_id`` (open now, else the next to ring on it) as
        ``blocked`` or ``missed`` when it ends unanswered."""
        if kind not in MARKS:
            raise ValueError(f"unknown mark {kind!r}; one of {', '.join(MARKS)}")
        call = self._open.get(conn_id)
        if call is not None and not call.outgoing:
            call.mark = kind
        else:
            self._marks[conn_id] = kind

    def feed(self, line: str, at: float) -> list[Listing]:
        """One CallMonitor line played at ``at`` (POSIX seconds): the entries it makes."""
        fields = line.strip().split(";")
        if len(fields) < 4:
            return []
        event = fields[1]
        try:
            conn_id = int(fields[2])
        except ValueError:
            return []
        date = self._date(fields[0], at)
        if event == "RING" and len(fields) >= 5:
            done = self._end_lost(conn_id, at)
            self._start(conn_id, False, fields[3], fields[4], date, at)
            return done
        if event == "CALL" and len(fields) >= 6:
            ringing = self._open.get(conn_id)
            if ringing is not None and not ringing.outgoing and ringing.connected_at is None:
                ringing.forwarded = True
                return []
            done = self._end_lost(conn_id, at)
            self._start(conn_id, True, fields[5].removesuffix("#"), fields[4], date, at)
            call = self._open[conn_id]
            call.extension = fields[3]
            return done
        if event == "CONNECT":
            return self._connect(conn_id, fields[3], at)
        if event == "DISCONNECT":
            ended = self._open.pop(conn_id, None)
            if ended is None:
                return []
            try:
                talk = max(int(fields[3]), 0)
            except ValueError:
                talk = self._talk(ended, at)
            return [self._final(ended, talk, at)]
        return []

    # -- the calls

    def _start(self, conn_id: int, outgoing: bool, remote: str, own_number: str,
               date: datetime, at: float) -> None:
        call = _Open(self._next_key, outgoing, remote, own_number, date, at)
        self._next_key += 1
        if not outgoing and conn_id in self._marks:
            call.mark = self._marks.pop(conn_id)
        self._open[conn_id] = call

    def _connect(self, conn_id: int, extension: str, at: float) -> list[Listing]:
        call = self._open.get(conn_id)
        if call is None:
            return []
        if not call.forwarded:
            call.extension = extension
        if call.connected_at is None:
            call.connected_at = at
        elif call.forwarded:
            return []
        kind = ACTIVE_OUTGOING if call.outgoing else ACTIVE_INCOMING
        return [Listing(call.key, self._entry(call, kind, 0), at, final=False)]

    def _end_lost(self, conn_id: int, at: float) -> list[Listing]:
        """A new call on an id still open: the box ended the old one (its DISCONNECT
        was lost on the port only)."""
        call = self._open.pop(conn_id, None)
        return [] if call is None else [self._final(call, self._talk(call, at), at)]

    @staticmethod
    def _talk(call: _Open, at: float) -> int:
        return 0 if call.connected_at is None else max(int(at - call.connected_at), 0)

    def _final(self, call: _Open, talk: int, at: float) -> Listing:
        if call.outgoing:
            kind = OUTGOING
        elif call.connected_at is not None:
            kind = INCOMING
        elif call.mark is not None:
            kind = BLOCKED if call.mark == "blocked" else MISSED
        else:
            kind = BLOCKED if at - call.rang_at < self.blocked_within else MISSED
        if kind in (MISSED, BLOCKED):
            talk = 0
        return Listing(call.key, self._entry(call, kind, talk), at, final=True)

    @staticmethod
    def _entry(call: _Open, kind: int, talk: int) -> ListedCall:
        reached = kind not in (MISSED, BLOCKED) and not call.forwarded
        extension = call.extension if reached else ""
        return ListedCall(0, kind, call.remote, call.own_number, "",
                          device_name(extension) if extension else "", extension,
                          call.date, talk)

    def _date(self, text: str, at: float) -> datetime:
        try:
            date = datetime.strptime(text.strip(), BOX_TIME)
        except ValueError:
            date = datetime.fromtimestamp(at, self.zone).replace(tzinfo=None)
        return date.replace(second=0, microsecond=0)


@dataclass
class LineSplitter:
    """Bytes as the box wrote them on the port (``!raw`` may split or join lines) back
    into lines: LF or CRLF ends one, UTF-8 with replacement, empty lines skipped."""

    _pending: bytes = b""

    def push(self, data: bytes) -> list[str]:
        *complete, self._pending = (self._pending + data).split(b"\n")
        lines = (raw.removesuffix(b"\r").decode("utf-8", "replace") for raw in complete)
        return [line for line in lines if line.strip()]
