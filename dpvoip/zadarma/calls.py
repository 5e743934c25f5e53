"""What a Zadarma call is, given whichever of its events have arrived. Pure.

Zadarma does not promise an order (NOTIFY_END was seen before NOTIFY_INTERNAL, and
NOTIFY_RECORD can come first), so the call is never updated step by step: it is computed
again from every event of its ``pbx_call_id`` received so far. The same set of events
gives the same call whatever their order, and a repeated event changes nothing.

A click-to-call callback has two legs with one ``pbx_call_id``: leg 1 rings the user,
leg 2 the customer. It is one outgoing call to the customer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from dpvoip.core.outcomes import Outcome, outcome_word, with_talk
from dpvoip.core.texts import Texts
from dpvoip.zadarma.events import ZadarmaEvent

#: Dispositions that mean the other side never picked up (as opposed to a failure).
_UNANSWERED = frozenset({"busy", "cancel", "no answer"})


@dataclass(frozen=True)
class ZadarmaCall:
    pbx_call_id: str
    direction: str  # "incoming" | "outgoing"
    remote: str  # as Zadarma sent it; '' when not known yet or hidden
    own_number: str  # the DID called, or the extension that called out
    started: datetime | None  # the account's local time
    answered: bool
    extension: str  # who took it (incoming) or made it (outgoing)
    outcome: Outcome | None  # None while the call is not over
    duration: int
    disposition: str
    recording: str  # call_id_with_rec, for the recording link later
    callback: bool

    @property
    def final(self) -> bool:
        return self.outcome is not None


def _first(values: Iterable[str]) -> str:
    return next((value for value in values if value), "")


def summarise(events: Iterable[ZadarmaEvent]) -> ZadarmaCall | None:
    """The call its events describe, or None while only a recording notice has come."""
    received = sorted(events, key=_order)
    if not received:
        return None
    pbx_call_id = received[0].pbx_call_id
    callback = any(e.calltype.startswith("callback_leg") for e in received)
    outgoing = callback or any(e.kind in ("NOTIFY_OUT_START", "NOTIFY_OUT_END")
                               for e in received)
    timed = [e for e in received if e.kind != "NOTIFY_RECORD"]
    recording = _first(e.call_id_with_rec for e in received
                       if e.kind == "NOTIFY_RECORD" or e.is_recorded)
    if not timed:
        return None
    started = min((e.call_start for e in timed if e.call_start is not None), default=None)
    if callback:
        customer = [e for e in timed if e.calltype == "callback_leg2"]
        user = [e for e in timed if e.calltype == "callback_leg1"]
        remote = _first(e.destination for e in customer)
        own = _first([*(e.internal for e in customer), *(e.internal for e in user),
                      *(e.destination for e in user)])
        leg = customer or user
    elif outgoing:
        remote = _first(e.destination for e in timed)
        own = _first(e.internal for e in timed)
        leg = timed
    else:
        remote = _first(e.caller_id for e in timed)
        own = _first(e.called_did for e in timed)
        leg = timed
    if remote == "0":
        remote = ""  # Zadarma's hidden number
    answers = [e for e in leg if e.kind == "NOTIFY_ANSWER"]
    ends = [e for e in leg if e.final]
    end = ends[-1] if ends else None
    if callback and end is None:
        # Leg 1 ended unanswered: the user did not pick up, the customer was never rung.
        user_end = [e for e in timed if e.calltype == "callback_leg1" and e.final]
        if user_end and user_end[-1].disposition != "answered":
            end = user_end[-1]
    answered = bool(answers) or (end is not None and end.disposition == "answered")
    extension = _first([*(e.last_internal for e in reversed(ends)),
                        *(e.internal for e in reversed(answers)),
                        *(e.internal for e in reversed(leg))])
    if outgoing and not callback:
        extension = own
    outcome = None if end is None else decide(
        "outgoing" if outgoing else "incoming", end.disposition, answered)
    disposition = end.disposition if end is not None else ""
    return ZadarmaCall(
        pbx_call_id=pbx_call_id,
        direction="outgoing" if outgoing else "incoming",
        remote=remote,
        own_number=own,
        started=started,
        answered=answered,
        extension=extension,
        outcome=outcome,
        duration=end.duration if end is not None and answered else 0,
        disposition=disposition,
        recording=recording,
        callback=callback,
    )


def decide(direction: str, disposition: str, answered: bool) -> Outcome:
    if answered or disposition == "answered":
        return Outcome.ANSWERED
    if disposition in _UNANSWERED or not disposition:
        return Outcome.MISSED if direction == "incoming" else Outcome.NOT_REACHED
    return Outcome.FAILED


def describe(call: ZadarmaCall, texts: Texts) -> str:
    """The finished call's notes in the configured language: the outcome, Zadarma's
    disposition when it says more (``missed (busy)``), whether it was a callback, the talk
    time of an answered call; '' while the call is not over."""
    if call.outcome is None:
        return ""
    text = outcome_word(call.outcome, texts)
    disposition = call.disposition
    if disposition and disposition != "answered" and disposition != call.outcome.value:
        text = f"{text} ({disposition_word(disposition, texts)})"
    if call.callback:
        text = texts("with_callback", notes=text)
    return with_talk(text, call.duration, texts)


def disposition_word(disposition: str, texts: Texts) -> str:
    """Zadarma's disposition in the configured language; one it adds later as it is."""
    key = "disposition_" + "_".join(disposition.replace(",", " ").split())
    return texts(key) if texts.has(key) else disposition


def _order(event: ZadarmaEvent) -> tuple[int, str]:
    """A fixed order of kinds, so that the summary never depends on arrival order."""
    kinds = ("NOTIFY_START", "NOTIFY_OUT_START", "NOTIFY_IVR", "NOTIFY_INTERNAL",
             "NOTIFY_ANSWER", "NOTIFY_END", "NOTIFY_OUT_END", "NOTIFY_RECORD")
    return (kinds.index(event.kind), f"{event.calltype}|{event.internal}|{event.destination}")
