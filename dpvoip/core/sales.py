"""The CRM's sales side of a call (behaviour.md section 6): a finished call of a matched
contact or lead leaves one line on the person's active deal, and an answered one marks the
person as in touch today. Pure: "today" comes from the time passed in; the store writes
the result with targeted updates, once per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, tzinfo

from dpvoip.core.outcomes import Outcome, outcome_word, talk_time
from dpvoip.core.texts import Texts


@dataclass(frozen=True)
class SalesTouch:
    """What one finished call writes on the CRM's sales side."""

    in_touch_on: date | None  # the contact's or lead's new ``was_in_touch`` (answered only)
    workflow_line: str  # prepended to the active deal's ``workflow``


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
