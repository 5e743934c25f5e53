"""How a call ended, what the CRM's status column says about it, and whether it deserves a
missed-call ticket. Pure rules, shared by the Fritz!Box tracker, recovery and Zadarma."""

from __future__ import annotations

from enum import Enum


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


#: CallMonitor extension codes (fritzbox.md section 3).
FAX_EXTENSION = 5


def machine_label(extension: int) -> str:
    """``answering machine 1`` for TAM 1 (extension 40); the legacy machine is extension 6."""
    if 40 <= extension <= 49:
        return f"answering machine {extension - 39}"
    return "answering machine"


def notes(outcome: Outcome, extension: int | None = None, detail: str = "") -> str:
    """The one human line the CRM shows in the call's notes."""
    if outcome is Outcome.VOICEMAIL and extension is not None:
        text = f"voicemail ({machine_label(extension)})"
    elif outcome is Outcome.ANSWERED and extension is not None:
        text = f"answered on extension {extension}"
    elif outcome is Outcome.BLOCKED:
        text = "blocked by call barring"
    else:
        text = outcome.value
    return f"{text}: {detail}" if detail else text


def talk_time(seconds: int) -> str:
    return f"{seconds // 60}:{seconds % 60:02d}"
