"""What one captured Zadarma signature can still be turned into: the checks an event
passes before it counts (docs/threat-model.md). Pure: plain data in, verdicts out.

Zadarma signs little of an event (zadarma.md 1.2): ``caller_id + called_did +
call_start`` for NOTIFY_START, NOTIFY_INTERNAL, NOTIFY_END and NOTIFY_IVR alike;
``internal + destination + call_start`` for the outgoing events. ``pbx_call_id``,
``duration``, ``disposition``, ``calltype`` and, for most events, ``destination`` and
``internal`` are not covered, and the values are concatenated without separators (the
border between caller_id and called_did can be moved). So a signature proves only that
Zadarma once sent that string. The rules below bound what the string can be made to say:

- **Binding** (``bound``): a signed string belongs to the one ``pbx_call_id`` first seen
  with it, whatever the event kind (an outgoing event's string replayed as an incoming
  one's is the same string). A withheld caller's string (``0`` or empty + the DID + the
  second) may be shared by ``HIDDEN_SHARE`` calls: two hidden callers can ring one
  number in the same second.
- **Freshness** (``freshness``): ``call_start`` within the window around the event's
  arrival, in the account's zone. Arrival, not now: a spooled event replayed after an
  outage is judged as when it came.
- **Consistency** (``admit``): the events of one call share ``call_start``; the events
  whose signature covers ``caller_id`` agree on it; the outgoing events of one leg agree
  on their ``destination``. (A moved border changes the caller's last digits.)
- **One end** (``admit``): a leg ends once. A later end that says the same is a repeat;
  one that disagrees (duration, disposition) is refused, and the first stays. A call of
  one ``normal`` leg has one end; a callback's two legs one each.
- **Bounded journal** (``admit``): at most ``journal_events`` events and
  ``journal_bytes`` bytes per call, the call's ends (one per leg) admitted beyond them,
  so that variants cannot keep the real end out.
- **Callbacks** (``verify_callback``): a call whose legs say ``callback_leg1/2`` is a
  callback (direction outgoing, the customer's number) only when dpvoip itself asked
  Zadarma for that callback: a click-to-call request of that user phone and that number
  shortly before. Otherwise it is taken as what its events say without the rewrite
  (``as_plain``) and gets no CRM writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum

from dpvoip.core.numbers import Dialling, is_withheld, normalise
from dpvoip.zadarma.events import ZadarmaEvent
from dpvoip.zadarma.signing import signed_string

#: How many calls may share the signed string of a withheld caller (``0`` + DID + second).
HIDDEN_SHARE = 4
#: Kinds whose signature covers ``caller_id``.
CALLER_SIGNED = frozenset({"NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_END", "NOTIFY_IVR",
                           "NOTIFY_ANSWER"})
#: Kinds whose signature covers ``destination`` as the number called.
OUTGOING = frozenset({"NOTIFY_OUT_START", "NOTIFY_OUT_END"})
CALLBACK_LEGS = ("callback_leg1", "callback_leg2")


@dataclass(frozen=True)
class GuardRules:
    """The bounds (``[zadarma]`` settings ``max_event_age_hours``,
    ``max_event_ahead_minutes``, ``journal_max_events``, ``journal_max_kib``)."""

    max_age: timedelta = timedelta(hours=24)
    max_ahead: timedelta = timedelta(minutes=10)
    journal_events: int = 64
    journal_bytes: int = 64 * 1024


class Reason(StrEnum):
    STALE = "stale"  # call_start too long before the arrival
    AHEAD = "ahead"  # call_start after the arrival, beyond the clock skew allowed
    BOUND_ELSEWHERE = "bound_elsewhere"  # the signed string belongs to another call
    INCONSISTENT = "inconsistent"  # contradicts the call's earlier events
    SECOND_END = "second_end"  # a leg that ended already, ended otherwise
    JOURNAL_FULL = "journal_full"  # the call's journal is at its bound


@dataclass(frozen=True)
class Verdict:
    """``accepted``; else ``reason`` and a ``detail`` for the log. ``repeat``: not
    accepted, but no attack either (an end that says what the first said)."""

    accepted: bool
    reason: Reason | None = None
    detail: str = ""
    repeat: bool = False


ACCEPTED = Verdict(True)
REPEAT = Verdict(False, repeat=True)


def refused(reason: Reason, detail: str) -> Verdict:
    return Verdict(False, reason, detail)


def signed_key(form: Mapping[str, str]) -> bytes | None:
    """The SHA-256 of the string the event's signature covers (None: an event whose
    signature this table does not know)."""
    text = signed_string(form)
    return None if text is None else hashlib.sha256(text.encode("utf-8")).digest()


def share(event: ZadarmaEvent) -> int:
    """How many calls the event's signed string may belong to."""
    if event.kind in CALLER_SIGNED and is_withheld(event.caller_id or None):
        return HIDDEN_SHARE
    return 1


def bound(event: ZadarmaEvent, others: int) -> Verdict:
    """``others``: the calls (other ``pbx_call_id``) the event's signed string is bound to
    already."""
    if others >= share(event):
        return refused(Reason.BOUND_ELSEWHERE,
                       f"its signed string belongs to {others} other call(s)")
    return ACCEPTED


def freshness(call_start: datetime | None, zone: tzinfo, received: datetime,
              rules: GuardRules) -> Verdict:
    """Whether ``call_start`` (the account's local time) is within the window around
    ``received`` (aware). An event without a start (NOTIFY_RECORD) has nothing to judge:
    its string binds its ``pbx_call_id`` itself."""
    if call_start is None:
        return ACCEPTED
    started = call_start.replace(tzinfo=zone).astimezone(UTC)
    if received - started > rules.max_age:
        return refused(Reason.STALE, f"call_start {call_start:%Y-%m-%d %H:%M:%S} is"
                                     f" {_hours(received - started)} before its arrival")
    if started - received > rules.max_ahead:
        return refused(Reason.AHEAD, f"call_start {call_start:%Y-%m-%d %H:%M:%S} is"
                                     f" {_hours(started - received)} after its arrival")
    return ACCEPTED


def form_size(form: Mapping[str, str]) -> int:
    """What a form costs in the journal: its JSON text's bytes."""
    return len(json.dumps(dict(form), ensure_ascii=False).encode("utf-8"))


def admit(event: ZadarmaEvent, size: int, before: Sequence[ZadarmaEvent],
          before_bytes: int, rules: GuardRules) -> Verdict:
    """Whether a new event (not a repeat of a journalled one: that stops earlier) joins the
    journal of its call, which holds ``before`` (``before_bytes`` bytes)."""
    verdict = _consistent(event, before)
    if not verdict.accepted:
        return verdict
    verdict = _ends(event, before)
    if not verdict.accepted or event.final:
        # An end is never refused for room: the call's variants cannot keep its real end
        # out (and the one-end rule admits one per leg at most).
        return verdict
    if len(before) + 1 > rules.journal_events:
        return refused(Reason.JOURNAL_FULL, f"the call has {len(before)} events already")
    if before_bytes + size > rules.journal_bytes:
        return refused(Reason.JOURNAL_FULL,
                       f"the call's events take {before_bytes} bytes already")
    return ACCEPTED


def same_party(a: str, b: str) -> bool:
    """Whether two spellings of a number name one party: both withheld, or one's digits end
    the other's (``6912345678`` and ``+306912345678``). A border moved between caller_id
    and called_did changes the caller's last digits."""
    if is_withheld(a or None) or is_withheld(b or None):
        return is_withheld(a or None) and is_withheld(b or None)
    da, db = _digits(a), _digits(b)
    return bool(da) and bool(db) and (da.endswith(db) or db.endswith(da))


def _consistent(event: ZadarmaEvent, before: Sequence[ZadarmaEvent]) -> Verdict:
    start = next((e.call_start for e in before if e.call_start is not None), None)
    if event.call_start is not None and start is not None and event.call_start != start:
        return refused(Reason.INCONSISTENT,
                       f"call_start {event.call_start:%Y-%m-%d %H:%M:%S}, the call's is"
                       f" {start:%Y-%m-%d %H:%M:%S}")
    if event.kind in CALLER_SIGNED:
        caller = next((e.caller_id for e in before if e.kind in CALLER_SIGNED), None)
        if caller is not None and not same_party(caller, event.caller_id):
            return refused(Reason.INCONSISTENT,
                           f"caller_id {event.caller_id[:20]!r}, the call's is {caller[:20]!r}")
    if event.kind in OUTGOING and event.destination:
        called = next((e.destination for e in before if e.kind in OUTGOING
                       and e.calltype == event.calltype and e.destination), None)
        if called is not None and not same_party(called, event.destination):
            return refused(Reason.INCONSISTENT,
                           f"destination {event.destination[:20]!r} of leg {event.calltype},"
                           f" the leg's is {called[:20]!r}")
    return ACCEPTED


def _ends(event: ZadarmaEvent, before: Sequence[ZadarmaEvent]) -> Verdict:
    if not event.final:
        return ACCEPTED
    ends = [e for e in before if e.final]
    same_leg = [e for e in ends if e.calltype == event.calltype]
    if same_leg:
        first = same_leg[0]
        if (first.duration, first.disposition) == (event.duration, event.disposition):
            return REPEAT
        return refused(Reason.SECOND_END,
                       f"{event.kind} says {event.disposition!r} {event.duration}s, the"
                       f" call ended {first.disposition!r} {first.duration}s")
    if ends and (event.calltype not in CALLBACK_LEGS
                 or any(e.calltype not in CALLBACK_LEGS for e in ends)):
        return refused(Reason.SECOND_END,
                       f"{event.kind} of leg {event.calltype[:20]!r}: the call ended already"
                       f" (leg {ends[0].calltype[:20]!r})")
    return ACCEPTED


# -- callbacks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallbackRequest:
    """A click-to-call request dpvoip made (``dpvoip.callback_request``, dialled): the
    phone Zadarma rings first, and the number dialled (E.164)."""

    from_number: str
    number_dialled: str


def is_callback(events: Iterable[ZadarmaEvent]) -> bool:
    return any(e.calltype in CALLBACK_LEGS for e in events)


def user_phones(events: Iterable[ZadarmaEvent]) -> list[str]:
    """What a callback's user leg rings (its destination, or the extension): one of them
    is the ``from`` click-to-call asked Zadarma to ring first."""
    return sorted({value for e in events if e.calltype == "callback_leg1"
                   for value in (e.destination, e.internal) if value})


def customer_numbers(events: Iterable[ZadarmaEvent], where: Dialling) -> list[str]:
    """The numbers a callback's customer leg names (normalised where they can be)."""
    return sorted({normalise(e.destination, where) or e.destination for e in events
                   if e.calltype == "callback_leg2" and e.destination})


def verify_callback(events: Sequence[ZadarmaEvent], requests: Iterable[CallbackRequest],
                    where: Dialling) -> CallbackRequest | None:
    """The click-to-call request the callback's legs answer, or None. Every event of the
    call (recording notices aside) must be a callback leg; the customer leg must name the
    number dialled, and only it; the user leg must ring the phone the request named."""
    timed = [e for e in events if e.kind != "NOTIFY_RECORD"]
    if not timed or any(e.calltype not in CALLBACK_LEGS for e in timed):
        return None
    phones, customers = user_phones(timed), customer_numbers(timed, where)
    if not phones and not customers:
        return None
    for request in requests:
        dialled = normalise(request.number_dialled, where) or request.number_dialled
        if customers and customers != [dialled]:
            continue
        if phones and request.from_number not in phones:
            continue
        return request
    return None


def as_plain(events: Iterable[ZadarmaEvent]) -> list[ZadarmaEvent]:
    """The events as what they say without the callback rewrite: every leg ``normal``."""
    return [replace(e, calltype="normal") if e.calltype in CALLBACK_LEGS else e
            for e in events]


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isascii() and c.isdigit()).lstrip("0")


def _hours(span: timedelta) -> str:
    return f"{span.total_seconds() / 3600:.1f} h"
