"""Reconciling a box's own call list with what dpvoip recorded (fritzbox.md section 7).

The CallMonitor port only shows what happens while dpvoip listens; the box's call list
(TR-064) remembers every call. This module decides, as plain data and without I/O, what
one read of the list means: which list entries are calls the monitor recorded (linked,
and finished or corrected where the list knows better), which are calls the monitor never
saw (recovered through the ingest, with the normal rules), and how far the list has been
processed (the state stored with the calls, in the same transaction).

The rules:
- an entry links to a recorded call of the same box, direction and normalised remote
  number (a withheld number matches a withheld one) whose start lies within
  [Date - 60 s, Date + 120 s) (the list's Date is box-local with minute resolution); one
  entry links one call, the nearest start first, entries in the order the box numbered
  them;
- a linked call left open or closed as interrupted is finished with the list's outcome;
  a linked incoming call recorded as missed that rang no longer than the blocking window
  (one second of slack for the box's second resolution) and that the list says was
  blocked (Type 10) becomes blocked, and a recorded blocked call that the list says was
  missed (Type 2) becomes missed: the box decided, not the timestamps;
- an entry no recorded call matches is a call the monitor never saw: recovered, with a
  call id of its own derived from the box, its date and its list id (so a second run,
  also after a crash, inserts nothing twice);
- active entries (Type 9, 11) are never passed: neither they nor any later entry is
  processed, and the stored id stays below them;
- a list whose newest id is lower than the stored one was reset (so was one of another
  timestamp that holds ids at or below the stored one): it is read again by
  days and matched by time alone (the old links are dropped with it); an entry dated
  before the last read of the old list that matches nothing is not recovered (the old
  list had it: it is recorded, or it was before the first run);
- a first run (no state stored) is a baseline: nothing dated before it is recovered (an
  office turning TR-064 on must not get a week of old tickets), later entries are
  linked or recovered as usual.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo

from dpvoip.core.happenings import Ended, Started
from dpvoip.core.numbers import Dialling, is_withheld, normalise
from dpvoip.core.outcomes import FAX_EXTENSION, Detail, Outcome, Reason
from dpvoip.fritzbox.listed import BLOCKED, INCOMING, MISSED, OUTGOING, CallList, ListedCall

#: Where a recorded call's start may lie around an entry's Date to be the same call.
LINK_BEFORE = timedelta(seconds=60)
LINK_AFTER = timedelta(seconds=120)
#: The box's second resolution: a ring measured by its timestamps may be off by this.
SECOND_SLACK = 1.0
#: Recovered calls never started on a connection id the box uses (they are 0 and up), so
#: that a CONNECT or DISCONNECT of an unknown id never finds one of them.
NO_CONNECTION = -1


@dataclass(frozen=True)
class ListState:
    """How far a box's list was processed: the highest final id, the list's timestamp."""

    last_id: int
    timestamp: int


@dataclass(frozen=True)
class ListRules:
    """What the rules need to know about the box."""

    box: str
    zone: tzinfo
    where: Dialling = Dialling()
    machine_ports: frozenset[int] = frozenset({6, *range(40, 50)})
    blocked_within: float = 2.0


@dataclass(frozen=True)
class Recorded:
    """A call dpvoip recorded for the box, as the store reads it."""

    call_id: str
    direction: str
    remote_raw: str  # the remote number as the box sent it
    remote_number: str | None  # E.164, None when withheld or not a number
    started_at: datetime  # aware
    ended_at: datetime | None
    status: str  # the CRM row's status
    outcome: str | None  # dpvoip's outcome (``Outcome.value``), None while open
    list_id: int | None  # the list entry it is linked to


@dataclass(frozen=True)
class Finish:
    """A recorded call left open or interrupted, finished with the list's outcome (the
    ingest's recovering end)."""

    entry_id: int
    ended: Ended


@dataclass(frozen=True)
class Correction:
    """A finished call whose outcome the list contradicts (blocked <-> missed)."""

    entry_id: int
    call_id: str
    was: Outcome
    becomes: Outcome
    at: datetime  # the call's end as recorded


@dataclass(frozen=True)
class Recovery:
    """An entry the monitor never saw: the call as the ingest's happenings."""

    entry_id: int
    started: Started
    ended: Ended


@dataclass(frozen=True)
class Plan:
    state: ListState  # to store with the changes
    links: tuple[tuple[str, int], ...] = ()  # (call_id, entry id), new links only
    finishes: tuple[Finish, ...] = ()
    corrections: tuple[Correction, ...] = ()
    recoveries: tuple[Recovery, ...] = ()
    already: int = 0  # entries linked before (a second run)
    skipped: int = 0  # entries of a type the rules do not know
    held_back: int = 0  # active entries, and the entries after the first of them
    too_old: int = 0  # entries before the first run, or before a reset and unmatched
    reset: bool = False
    baseline: bool = False
    types: dict[int, int] = field(default_factory=dict)  # entries processed, by type

    @property
    def writes(self) -> bool:
        """Whether the plan changes anything (the state included)."""
        return bool(self.links or self.finishes or self.corrections or self.recoveries)


def was_reset(state: ListState | None, listed: CallList) -> bool:
    """The box's list starts again (cleared, or the box reset): its newest id is lower
    than the highest one processed; or, asked for the entries after that id, the box
    answered with a list of another timestamp holding entries at or below it (it sends
    the whole list when the timestamp asked for is no longer its own: a list that was
    reset and has grown past the old id since)."""
    if state is None or not listed.calls:
        return False
    ids = [call.id for call in listed.calls]
    if max(ids) < state.last_id:
        return True
    return listed.timestamp != state.timestamp and min(ids) <= state.last_id


def local_to_utc(local: datetime, zone: tzinfo) -> datetime:
    return local.replace(tzinfo=zone).astimezone(UTC)


def port_number(port: str) -> int | None:
    text = port.strip()
    return int(text) if text.isdigit() else None


def outcome_of(entry: ListedCall, rules: ListRules) -> Outcome | None:
    """The outcome an entry says (None: a type the rules do not know, or still active)."""
    if entry.type == INCOMING:
        port = port_number(entry.port)
        if port in rules.machine_ports:
            return Outcome.VOICEMAIL
        if port == FAX_EXTENSION:
            return Outcome.FAX
        return Outcome.ANSWERED
    if entry.type == MISSED:
        return Outcome.MISSED
    if entry.type == OUTGOING:
        return Outcome.ANSWERED if entry.duration_seconds > 0 else Outcome.NOT_REACHED
    if entry.type == BLOCKED:
        return Outcome.BLOCKED
    return None


def number_key(raw: str, number: str | None) -> str:
    """What two records of one call share: the E.164 number; '' for a withheld caller;
    else the digits the box sent (an extension, a service code)."""
    if number:
        return number
    if is_withheld(raw):
        return ""
    return "".join(c for c in raw if c.isdigit()) or raw.strip()


def list_call_id(box: str, entry: ListedCall) -> str:
    """dpvoip's id of a call recovered from the list: stable across runs, and distinct
    after a reset of the list (the ids start again, the dates do not)."""
    return f"fb-{box}-list-{entry.date:%y%m%d%H%M}-{entry.id}"


def processing(state: ListState | None, listed: CallList, reset: bool
               ) -> tuple[list[ListedCall], int, int]:
    """The entries to process, oldest first (those after the stored id, or all of a
    reset list), stopped before the first active one; the count of those held back, and
    the new highest final id processed."""
    floor = 0 if reset or state is None else state.last_id
    newer = sorted((call for call in listed.calls if call.id > floor), key=lambda c: c.id)
    cut = next((n for n, call in enumerate(newer) if call.active), len(newer))
    taken, held = newer[:cut], len(newer) - cut
    last = max((call.id for call in taken), default=floor)
    if state is not None and not reset:
        last = max(last, state.last_id)
    return taken, held, last


def time_range(entries: Iterable[ListedCall], zone: tzinfo) -> tuple[datetime, datetime] | None:
    """Where the recorded calls that may link to ``entries`` started (UTC)."""
    dates = [local_to_utc(entry.date, zone) for entry in entries]
    if not dates:
        return None
    return min(dates) - LINK_BEFORE, max(dates) + LINK_AFTER


def plan(state: ListState | None, listed: CallList, recorded: Sequence[Recorded],
         rules: ListRules, *, reset: bool = False, baseline_since: datetime | None = None,
         reset_since: datetime | None = None) -> Plan:
    """What one read of the list changes. ``recorded``: the box's calls in the entries'
    time range (``time_range``). ``reset``: the list was reset (``was_reset``) and read
    again by days; the calls' old links are dropped with it. ``baseline_since``: at the
    first run (no ``state``), entries dated before it are left alone. ``reset_since``:
    after a reset, entries dated before it (the last read of the old list, less a margin)
    are only linked, never recovered: the old list had them, so they are recorded or were
    before the first run."""
    entries, held, last = processing(state, listed, reset)
    new_state = ListState(last, listed.timestamp)
    baseline = state is None and not reset
    too_old = 0
    old: set[int] = set()
    if baseline and baseline_since is not None:
        kept = [e for e in entries if local_to_utc(e.date, rules.zone) >= baseline_since]
        too_old, entries = len(entries) - len(kept), kept
    elif baseline:
        too_old, entries = len(entries), []
    elif reset and reset_since is not None:
        old = {e.id for e in entries if local_to_utc(e.date, rules.zone) < reset_since}

    free = {call.call_id: call for call in recorded}
    links: list[tuple[str, int]] = []
    finishes: list[Finish] = []
    corrections: list[Correction] = []
    recoveries: list[Recovery] = []
    already = skipped = 0
    types: dict[int, int] = {}
    for entry in entries:
        outcome = outcome_of(entry, rules)
        if outcome is None:
            skipped += 1
            continue
        types[entry.type] = types.get(entry.type, 0) + 1
        call = _link(entry, free, rules, reset)
        if call is None and entry.id in old:
            too_old += 1
            continue
        if call is None:
            recoveries.append(_recovery(entry, outcome, rules))
            continue
        del free[call.call_id]
        if call.list_id == entry.id and not reset:
            already += 1
        else:
            links.append((call.call_id, entry.id))
        if call.status == "active" or call.outcome == Outcome.INTERRUPTED.value:
            finishes.append(_finish(entry, call, outcome))
            continue
        correction = _correction(entry, call, rules)
        if correction is not None:
            corrections.append(correction)
    return Plan(new_state, tuple(links), tuple(finishes), tuple(corrections),
                tuple(recoveries), already, skipped, held, too_old, reset, baseline, types)


def _link(entry: ListedCall, free: dict[str, Recorded], rules: ListRules, reset: bool
          ) -> Recorded | None:
    """The recorded call ``entry`` is: its own link first, else the nearest start in the
    window among the calls of its direction and number not linked to another entry."""
    if not reset:
        for call in free.values():
            if call.list_id == entry.id:
                return call
    date = local_to_utc(entry.date, rules.zone)
    key = number_key(entry.remote, normalise(entry.remote, rules.where))
    best: Recorded | None = None
    for call in free.values():
        if call.list_id is not None and not reset:
            continue
        if call.direction != entry.direction:
            continue
        if not date - LINK_BEFORE <= call.started_at < date + LINK_AFTER:
            continue
        if number_key(call.remote_raw, call.remote_number) != key:
            continue
        if best is None or (abs(call.started_at - date), call.started_at) < (
                abs(best.started_at - date), best.started_at):
            best = call
    return best


def _extension(entry: ListedCall) -> int | None:
    return port_number(entry.port)


def _finish(entry: ListedCall, call: Recorded, outcome: Outcome) -> Finish:
    at = call.started_at + timedelta(seconds=entry.duration_seconds)
    return Finish(entry.id, Ended(call.call_id, outcome, entry.duration_seconds, at,
                                  _extension(entry), Detail(Reason.CALL_LIST)))


def _correction(entry: ListedCall, call: Recorded, rules: ListRules) -> Correction | None:
    """Blocked or missed, as the box decided (issue 16 point 3)."""
    if call.direction != "incoming" or call.outcome is None:
        return None
    at = call.ended_at or call.started_at
    if call.outcome == Outcome.MISSED.value and entry.type == BLOCKED:
        rang = (at - call.started_at).total_seconds()
        if rang <= rules.blocked_within + SECOND_SLACK:
            return Correction(entry.id, call.call_id, Outcome.MISSED, Outcome.BLOCKED, at)
        return None
    if call.outcome == Outcome.BLOCKED.value and entry.type == MISSED:
        return Correction(entry.id, call.call_id, Outcome.BLOCKED, Outcome.MISSED, at)
    return None


def _recovery(entry: ListedCall, outcome: Outcome, rules: ListRules) -> Recovery:
    identity = list_call_id(rules.box, entry)
    started_at = local_to_utc(entry.date, rules.zone)
    ended_at = started_at + timedelta(seconds=entry.duration_seconds)
    extension = _extension(entry)
    started = Started(identity, rules.box, NO_CONNECTION, entry.direction, entry.remote,
                      entry.own_number, "", extension if entry.direction == "outgoing"
                      else None, started_at)
    ended = Ended(identity, outcome, entry.duration_seconds, ended_at, extension,
                  Detail(Reason.CALL_LIST))
    return Recovery(entry.id, started, ended)
