"""The CRM's sales side of a call (behaviour.md section 6): a finished call of a matched
contact or lead leaves one line on the person's active deal, and an answered one marks the
person as in touch today. Pure: "today" comes from the time passed in; the store writes
the result with targeted updates, once per call.

A Zadarma call knows its person when it ends (its journal is matched again at every
event): ``sales_touch``. A PBX's call ends with an ``Ended`` that names only the call; its
person (and its direction) are what its start recorded in the database, so its end
carries ``end_touch``: the same lines with the name left for the statement to fill in,
so that the touch rides in the statement that finishes the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, tzinfo

from dpvoip.core.outcomes import Outcome, outcome_word, talk_time
from dpvoip.core.texts import Texts

#: Stands for the person's name in an ``EndTouch``'s lines (no template contains it).
PERSON = "\x1fperson\x1f"


@dataclass(frozen=True)
class SalesTouch:
    """What one finished call writes on the CRM's sales side."""

    in_touch_on: date | None  # the contact's or lead's new ``was_in_touch`` (answered only)
    workflow_line: str  # prepended to the active deal's ``workflow``


@dataclass(frozen=True)
class EndTouch:
    """What a call's end writes on the sales side once the store knows the person its
    start matched and the direction it recorded: each direction's workflow line split
    around the person's name (the text before it, the text after it)."""

    in_touch_on: date | None  # answered only
    incoming: tuple[str, str]
    outgoing: tuple[str, str]

    def line(self, direction: str, person: str) -> str:
        """The line as the store writes it (what its SQL computes; for tests and logs)."""
        head, tail = self.outgoing if direction == "outgoing" else self.incoming
        return head + person + tail


def sales_touch(direction: str, finished: Outcome | None, duration: int,
                person: str | None, now: datetime, zone: tzinfo,
                texts: Texts) -> SalesTouch | None:
    """The touch of a call that has just ``finished`` so (None while it runs, and for
    the later events of a finished call), by a contact or lead named ``person`` (None
    when the caller is neither): nothing unless both are there. The date is today in
    the office's ``zone``; the line in the configured language."""
    if finished is None or person is None:
        return None
    today = now.astimezone(zone).date()
    return SalesTouch(
        in_touch_on=today if finished is Outcome.ANSWERED else None,
        workflow_line=texts(f"workflow_{direction}", date=f"{today:%d.%m.%Y}", name=person,
                            outcome=outcome_word(finished, texts), talk=talk_time(duration)),
    )


def end_touch(finished: Outcome, duration: int, ended: datetime, zone: tzinfo,
              texts: Texts) -> EndTouch | None:
    """The sales side of a call that ended so at ``ended`` (its date in the office's
    ``zone``), for the person and direction its start recorded: ``sales_touch``'s lines.
    None for a call dpvoip lost track of (interrupted: a reconnect, a restart): how it
    went is unknown, and a line saying so on the deal would only be noise to the
    salesperson; the call row and its notes keep it."""
    if finished is Outcome.INTERRUPTED:
        return None
    halves: dict[str, tuple[str, str]] = {}
    in_touch_on = None
    for direction in ("incoming", "outgoing"):
        touch = sales_touch(direction, finished, duration, PERSON, ended, zone, texts)
        assert touch is not None  # finished and a person: always a touch
        head, _, tail = touch.workflow_line.partition(PERSON)
        halves[direction] = (head, tail)
        in_touch_on = touch.in_touch_on
    return EndTouch(in_touch_on, halves["incoming"], halves["outgoing"])
