"""Live events as plain data: what a call's or a box's event carries, how it is written
on a Server-Sent Events stream, who may see it, and which ids a reader has settled.

Pure: no I/O, no reactor; time is passed in. The store writes the data built here (or
its SQL twin, for the steps whose facts only the database holds) into
``dpvoip.live_event`` in the transaction that made the change.
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dpvoip.core.matching import Match
from dpvoip.core.outcomes import Outcome

KINDS = ("call", "ticket", "box", "reload")
#: Who may watch (``[live] watchers``): "staff" (non-staff users are refused),
#: "everyone-own-calls" (staff see all, others the calls on their own connections),
#: "everyone" (every signed-in user sees every event).
WATCHER_POLICIES = ("staff", "everyone-own-calls", "everyone")


def utc(at: datetime | None) -> str | None:
    """A time as the wire carries it: ISO 8601 in UTC, to the second (SQL: ``UTC_SQL``)."""
    if at is None:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def client_of(match: Match | None) -> dict[str, Any] | None:
    """The caller as the page shows it: the CRM client (id and name); a contact, lead or
    company without a client, by name only (no client page to link to)."""
    if match is None:
        return None
    if match.client is not None:
        return {"id": match.client.id, "name": match.client.name}
    name = match.display_name
    return {"id": None, "name": name} if name else None


def call_state(answered: bool, outcome: Outcome | None) -> str:
    if outcome is not None:
        return "ended"
    return "answered" if answered else "ringing"


def call_data(*, call_id: str, state: str, direction: str, number: str | None,
              client: Mapping[str, Any] | None, extension: Any, box: str | None,
              at: datetime | None, outcome: Outcome | None = None,
              status: str | None = None, duration: int | None = None) -> dict[str, Any]:
    """A ``call`` event's data, every field of the wire format present."""
    return {
        "call_id": call_id, "state": state, "direction": direction, "number": number or "",
        "client": dict(client) if client is not None else None, "extension": extension,
        "outcome": outcome.value if outcome is not None else None,
        "status": status if status is not None else (
            outcome.status if outcome is not None else "active"),
        "duration": duration if state == "ended" else None,
        "at": utc(at), "box": box,
    }


def ended_changes(outcome: Outcome, duration: int, at: datetime) -> dict[str, Any]:
    """What an ended call's event changes of the call's data (the rest is the database's)."""
    return {"state": "ended", "outcome": outcome.value, "status": outcome.status,
            "duration": duration, "at": utc(at)}


def answered_changes(extension: Any, at: datetime) -> dict[str, Any]:
    return {"state": "answered", "extension": extension, "at": utc(at)}


def legs(*values: Any) -> list[str]:
    """The office's side of a call (its line, own number, extension), as digits: what a
    CRM user's ``voip_connection`` numbers are compared with."""
    found: list[str] = []
    for value in values:
        d = digits(value)
        if d and d not in found:
            found.append(d)
    return found


def digits(value: Any) -> str:
    return re.sub(r"[^0-9]", "", "" if value is None else str(value))


def same_phone(a: str, b: str) -> bool:
    """Equal digits, or (national vs international spelling) the same last nine digits."""
    if not a or not b:
        return False
    return a == b or (len(a) >= 9 and len(b) >= 9 and a[-9:] == b[-9:])


@dataclass(frozen=True)
class LiveEvent:
    """One row of ``dpvoip.live_event``: ``legs`` never leaves dpvoip."""

    id: int
    kind: str
    data: Mapping[str, Any]
    legs: tuple[str, ...] = ()

    def frame(self) -> bytes:
        """The event on the stream: id, event, one line of JSON, a blank line."""
        body = json.dumps(self.data, separators=(",", ":"), ensure_ascii=False)
        return (f"id: {self.id}\nevent: {self.kind}\ndata: {body}\n\n").encode()


#: A comment line: keeps proxies from closing an idle stream; EventSource ignores it.
KEEPALIVE = b": keepalive\n\n"


def reload_frame() -> bytes:
    """Sent once, first, to a browser whose Last-Event-ID is older than the kept window.
    No id: the browser keeps the one it had until the next event."""
    return b"event: reload\ndata: {}\n\n"


@dataclass(frozen=True)
class Viewer:
    """A signed-in CRM user as the stream filters for them."""

    user_id: int
    staff: bool
    numbers: frozenset[str] = frozenset()  # digits of their voip_connection numbers


def may_watch(viewer: Viewer, policy: str) -> bool:
    return viewer.staff or policy != "staff"


def may_see(viewer: Viewer, event: LiveEvent, policy: str) -> bool:
    """Staff (and everyone, with "everyone") see every event; another user a box's events
    and the call and ticket events of calls on their own connections."""
    if not may_watch(viewer, policy):
        return False
    if viewer.staff or policy == "everyone" or event.kind not in ("call", "ticket"):
        return True
    return any(same_phone(leg, own) for leg in event.legs for own in viewer.numbers)


def last_event_id(header: bytes | None, query: bytes | None) -> int | None:
    """The browser's Last-Event-ID (the header, else ``?last_event_id=`` of EventSource
    polyfills); None when absent. ``ValueError`` when it is not a non-negative integer."""
    raw = header if header is not None else query
    if raw is None or raw.strip() == b"":
        return None
    text = raw.strip().decode("ascii", "replace")
    if not text.isdigit() or len(text) > 18:
        raise ValueError("Last-Event-ID must be a non-negative integer")
    return int(text)


def must_reload(last: int, oldest_kept: int | None, newest_issued: int) -> bool:
    """Whether a browser that saw ``last`` may have missed events pruned since: the kept
    window starts after it, or ``last`` is an id this database never issued."""
    if last > newest_issued:
        return True
    if last == newest_issued:
        return False
    return oldest_kept is None or oldest_kept > last + 1


def page_resume_id(settled: int | None, oldest_kept: int | None, newest_issued: int
                   ) -> int | None:
    """Where a live page's first stream starts: after ``settled`` (the feed's watermark,
    read before the page's snapshot: every event up to it had committed, so the snapshot
    shows it), so that the events committed between the snapshot and the stream's opening
    are sent too (a page applies events in order, so one it already shows changes
    nothing). None (the live events only) while the feed has settled nothing, or when
    that id is outside what is kept (the stream would only ask the page to reload, and
    the reloaded page would ask again)."""
    if settled is None or must_reload(settled, oldest_kept, newest_issued):
        return None
    return settled


@dataclass
class Watermark:
    """Which event ids a reader has settled, so that a read of ``id > low`` after a
    notification or a reconnect misses nothing and delivers nothing twice.

    Ids come from a sequence when rows are inserted, but transactions commit in another
    order: id 11 may be seen before id 10 commits. Ids above ``low`` already delivered are
    kept in ``seen``; ``low`` moves up over ids delivered in a row, and over a gap (an id
    rolled back, or still in an open transaction) once the id after it has waited
    ``grace`` seconds: a transaction open longer than that is delivered when it commits,
    live, but no longer looked for after a reconnect. At most ``limit`` ids are kept."""

    low: int = 0
    grace: float = 30.0
    limit: int = 20_000
    seen: dict[int, float] = field(default_factory=dict)  # id -> when it was delivered
    _order: list[int] = field(default_factory=list)  # the ids of ``seen``, a heap

    def start_at(self, newest: int) -> None:
        """A reader that starts now takes what exists as settled."""
        self.low = max(self.low, newest)

    def fresh(self, ids: Iterable[int]) -> list[int]:
        return [i for i in ids if i > self.low and i not in self.seen]

    def delivered(self, ids: Iterable[int], now: float) -> None:
        for i in ids:
            if i > self.low and i not in self.seen:
                self.seen[i] = now
                heapq.heappush(self._order, i)
        self.settle(now)

    def settle(self, now: float) -> None:
        while self._order:
            first = self._order[0]
            if first <= self.low + 1:  # next in a row (or below: settled meanwhile)
                heapq.heappop(self._order)
                self.seen.pop(first, None)
                self.low = max(self.low, first)
                continue
            if now - self.seen[first] >= self.grace or len(self._order) > self.limit:
                self.low = first - 1  # the gap below ``first`` is given up
                continue
            break
