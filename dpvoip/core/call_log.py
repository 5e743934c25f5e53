"""What a call's row shows of the remote party, and the lines its call log gets
(behaviour.md sections 2 and 3), in the configured language. Pure.
"""

from __future__ import annotations

from typing import NamedTuple

from dpvoip.core.matching import Match
from dpvoip.core.numbers import is_withheld
from dpvoip.core.outcomes import talk_time
from dpvoip.core.texts import Texts


class LogLine(NamedTuple):
    """One line of ``accounting_voipcalllog``: the CRM's action choice and its text."""

    action: str
    text: str


def remote_column(raw: str, number: str | None) -> str:
    """The CRM's phone_number: E.164, else the raw value cut to 20, '' when withheld."""
    if is_withheld(raw):
        return ""
    return number if number is not None else raw.strip()[:20]


def shown_number(phone: str, texts: Texts) -> str:
    """The remote party as the texts name it ('withheld number' for a blank column)."""
    return phone or texts("withheld")


def caller_name(match: Match | None, texts: Texts) -> str:
    return match.display_name if match is not None else texts("unknown")


def matched_text(match: Match, texts: Texts) -> str:
    """Whom the number was matched to: the client, else the contact or lead, else the
    company (which has no id of its own here)."""
    if match.client is not None:
        return texts("client_matched", kind="client", name=match.client.name,
                     id=match.client.id)
    if match.person is not None:
        return texts("client_matched", kind=match.person.kind, name=match.person.name,
                     id=match.person.id)
    return texts("client_matched", kind="company", name=match.company_name or "", id="-")


def started_lines(direction: str, phone: str, match: Match | None,
                  texts: Texts) -> list[LogLine]:
    """The lines a new call's log starts with: who calls (or is called), and the match."""
    lines = [LogLine("started", texts(f"started_{direction}",
                                      number=shown_number(phone, texts),
                                      name=caller_name(match, texts)))]
    if match is not None:
        lines.append(LogLine("client_matched", matched_text(match, texts)))
    return lines


def answered_line(extension: int, transfer: bool, texts: Texts) -> LogLine:
    key = "transferred" if transfer else "answered"
    return LogLine("status_changed", texts(key, extension=extension))


def forwarded_line(number: str, texts: Texts) -> LogLine:
    return LogLine("status_changed", texts("forwarded", number=number))


def ended_line(notes: str, duration: int, texts: Texts) -> LogLine:
    return LogLine("ended", texts("ended", notes=notes, talk=talk_time(duration)))
