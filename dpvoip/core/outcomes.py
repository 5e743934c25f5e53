"""How a call ended, what the CRM's status column says about it, and whether it deserves a
missed-call ticket. Pure rules, shared by the Fritz!Box tracker, recovery and Zadarma.

The sources say how a call ended as data (the outcome, the extension, the talk time, a
``Detail`` with a reason code); ``notes`` renders that in the configured language where
the row is written, so that no source ever writes words.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from dpvoip.core.texts import Texts


class Outcome(Enum):
    ANSWERED = "answered"
    MISSED = "missed"
    VOICEMAIL = "voicemail"
    BLOCKED = "blocked"
    NOT_REACHED = "not reached"
    FAX = "fax"
    INTERRUPTED = "interrupted"
    BUSY = "busy"
    FAILED = "failed"

    @property
    def status(self) -> str:
        """The CRM's (Django's) status choice for this outcome."""
        if self in (Outcome.ANSWERED, Outcome.FAX):
            return "completed"
        if self in (Outcome.MISSED, Outcome.VOICEMAIL):
            return "missed"
        return "failed"

    def wants_ticket(self, direction: str) -> bool:
        """Missed and voicemail incoming calls only: never blocked, outgoing, answered, fax."""
        return direction == "incoming" and self in (Outcome.MISSED, Outcome.VOICEMAIL)


class Reason(StrEnum):
    """Why a call ended as it did, beyond its outcome (the codes a spool record keeps)."""

    LINK_LOST = "link_lost"  # the connection to the box's call monitor was lost
    RESTARTED = "restarted"  # dpvoip restarted while the call was open
    ID_REUSED = "id_reused"  # the box reused the connection id: the DISCONNECT was lost
    RECOVERED = "recovered"  # the end came after a reconnect, for a call found again
    FORWARDED = "forwarded"  # the box forwarded the call; value: the number
    HAIRPIN = "hairpin"  # an internal call to one of the office's own numbers
    TEXT = "text"  # value: a free text (from a spool record of an older version)
    CALL_LIST = "call_list"  # the box's own call list (TR-064) said how the call ended


@dataclass(frozen=True)
class Detail:
    reason: Reason
    value: str = ""


#: CallMonitor extension codes (fritzbox.md section 3).
FAX_EXTENSION = 5


def outcome_word(outcome: Outcome, texts: Texts) -> str:
    return texts("outcome_" + outcome.name.lower())


def machine_label(extension: int, texts: Texts) -> str:
    """``answering machine 1`` for TAM 1 (extension 40); the legacy machine is extension 6."""
    if 40 <= extension <= 49:
        return texts("machine_numbered", number=extension - 39)
    return texts("machine")


def detail_text(detail: Detail, texts: Texts) -> str:
    if detail.reason is Reason.TEXT:
        return detail.value
    if detail.reason is Reason.FORWARDED:
        return texts("detail_forwarded", number=detail.value)
    return texts("detail_" + detail.reason.value)


def with_talk(text: str, talk: int, texts: Texts, message: bool = False) -> str:
    """``text`` and the talk time, when there was talk (an answered call; for a
    ``message`` left on an answering machine, its length)."""
    if talk <= 0:
        return text
    return texts("with_message" if message else "with_talk", notes=text, talk=talk_time(talk))


def notes(outcome: Outcome, texts: Texts, extension: int | None = None, talk: int = 0,
          detail: Detail | None = None) -> str:
    """The one human line the CRM shows in the call's notes: ``answered on extension 11,
    talk 1:05``, ``interrupted: monitor connection lost``."""
    if outcome is Outcome.VOICEMAIL and extension is not None:
        text = texts("voicemail_on", machine=machine_label(extension, texts))
    elif outcome is Outcome.ANSWERED and extension is not None:
        text = texts("answered_on", extension=extension)
    elif outcome is Outcome.BLOCKED:
        text = texts("blocked_by_barring")
    else:
        text = outcome_word(outcome, texts)
    if detail is not None:
        text = f"{text}: {detail_text(detail, texts)}"
    return with_talk(text, talk, texts, message=outcome is Outcome.VOICEMAIL)


def talk_time(seconds: int) -> str:
    """``1:05``: minutes and seconds, as every language writes them."""
    return f"{seconds // 60}:{seconds % 60:02d}"
