"""What a call's row shows of the remote party, its notes, and the lines its call log gets
(behaviour.md sections 2 and 3), in the configured language; and what dpvoip's own log
says of a finished call. Pure.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from dpvoip.core.happenings import Ended
from dpvoip.core.matching import Match
from dpvoip.core.numbers import is_withheld
from dpvoip.core.outcomes import Detail, Reason, detail_text, notes
from dpvoip.core.texts import Texts


class LogLine(NamedTuple):
    """One line of ``accounting_voipcalllog``: the CRM's action choice and its text."""

    action: str
    text: str


class Remote(NamedTuple):
    """The remote party of a call: what its row's phone_number holds, how the texts name
    it, and whether the caller withheld the number (decided on the number, never on the
    column's text)."""

    column: str  # never blank: the CRM's model refuses a blank phone_number
    shown: str
    withheld: bool


def remote(raw: str, number: str | None, texts: Texts, hairpin: bool = False) -> Remote:
    """The CRM's phone_number: E.164, else the raw value cut to 20; for a withheld caller
    the configured marker, for an internal call to an own number the word for it (the
    office's own number is never the remote party)."""
    if hairpin:
        return Remote(texts.internal_marker, texts("own_number", number=raw.strip()), False)
    if is_withheld(raw):
        return Remote(texts.withheld_marker, texts("withheld"), True)
    column = number if number is not None else raw.strip()[:20]
    return Remote(column, column, False)


def caller_name(match: Match | None, texts: Texts) -> str:
    return match.display_name if match is not None else texts("unknown")


def matched_text(match: Match, texts: Texts) -> str:
    """Whom the number was matched to: the client, else the contact or lead, else the
    company (which has no id of its own here)."""
    if match.client is not None:
        return texts("client_matched", kind=texts("kind_client"), name=match.client.name,
                     id=match.client.id)
    if match.person is not None:
        return texts("client_matched", kind=texts("kind_" + match.person.kind),
                     name=match.person.name, id=match.person.id)
    return texts("company_matched", name=match.company_name or "")


def started_lines(direction: str, shown: str, match: Match | None,
                  texts: Texts) -> list[LogLine]:
    """The lines a new call's log starts with: who calls (or is called, ``shown`` as
    ``Remote.shown`` names it), and the match."""
    lines = [LogLine("started", texts(f"started_{direction}", number=shown,
                                      name=caller_name(match, texts)))]
    if match is not None:
        lines.append(LogLine("client_matched", matched_text(match, texts)))
    return lines


def started_notes(hairpin: bool, texts: Texts) -> str:
    """A new call row's notes: empty, but for an internal call to an own number."""
    return detail_text(Detail(Reason.HAIRPIN), texts) if hairpin else ""


def answered_line(extension: int, transfer: bool, texts: Texts) -> LogLine:
    key = "transferred" if transfer else "answered"
    return LogLine("status_changed", texts(key, extension=extension))


def forwarded_line(number: str, texts: Texts) -> LogLine:
    return LogLine("status_changed", texts("forwarded", number=number))


def ended_notes(ended: Ended, texts: Texts) -> str:
    """The finished call's notes: outcome, detail and talk time, in one line."""
    return notes(ended.outcome, texts, ended.extension, ended.duration, ended.detail)


def ended_line(notes_text: str, texts: Texts) -> LogLine:
    """The 'ended' line: the call's notes, which carry the talk time."""
    return LogLine("ended", texts("ended", notes=notes_text))


#: Where the first word group of a call's notes ends ("missed (busy)", "interrupted: ...").
_FIRST_PART = re.compile(r"[,:(;]")


def finished_text(status: str, notes: str, ticket: str = "") -> str:
    """What dpvoip's log line of a finished call says after its id: the CRM's status,
    then the call's notes, then what became of its ticket (``ticket_text``). The status
    is left out when the notes start with the same word: ``missed``, never ``missed,
    missed``; ``completed, answered on extension 11, talk 0:20`` keeps both."""
    first = _FIRST_PART.split(notes, maxsplit=1)[0].strip()
    if not notes:
        text = status
    elif not status or first.casefold() == status.casefold():
        text = notes
    else:
        text = f"{status}, {notes}"
    return f"{text}; {ticket}" if ticket else text


def ticket_text(ticket_id: int | None, calls: int = 1, joined: bool = False) -> str:
    """What became of a missed call's ticket, for dpvoip's log: ``ticket 12 created``, or
    ``added to ticket 12 (3x)`` when the call joined the number's open ticket as its third
    missed call. Without the id (a store that does not return it): ``new ticket
    created``."""
    if joined and ticket_id is not None:
        return f"added to ticket {ticket_id} ({calls}x)"
    if ticket_id is None:
        return "new ticket created"
    return f"ticket {ticket_id} created"
