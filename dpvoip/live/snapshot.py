"""What the live page shows, as plain data: the calls in progress and of today, the open
tickets, the boxes, and who is looking (the snapshot the store reads and the page renders)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Client:
    id: int
    name: str


@dataclass(frozen=True)
class LiveCall:
    """A call as the page shows it; ``state`` is ``ringing``, ``answered`` or ``ended``,
    as in the event stream."""

    call_id: str
    state: str
    direction: str
    number: str  # E.164, or the CRM's marker (withheld, internal) when it has no number
    client: Client | None
    extension: str | None
    outcome: str | None  # ``core.outcomes.Outcome`` values, ended calls only
    status: str  # the CRM's status column
    duration: int | None  # talk time in seconds (else the CRM's duration), ended only
    at: datetime  # when it started
    box: str | None  # the Fritz!Box's name, or "zadarma"


@dataclass(frozen=True)
class LiveTicket:
    ticket_id: int
    call_id: str
    number: str
    client: Client | None
    count: int  # missed calls in it
    created_at: datetime


@dataclass(frozen=True)
class LiveBox:
    box: str
    connected: bool
    since: datetime | None
    age_seconds: float  # since the daemon last reported it


@dataclass(frozen=True)
class Snapshot:
    in_progress: list[LiveCall]
    recent: list[LiveCall]
    tickets: list[LiveTicket]
    boxes: list[LiveBox]
    #: The events table as the same snapshot saw it: (the oldest id kept, the newest id
    #: ever issued), to tell whether a page's first stream may resume from an id.
    window: tuple[int | None, int] = (None, 0)


@dataclass(frozen=True)
class Ringing:
    """The incoming calls ringing now (what a CRM page just opened pops up at once), and
    the events table's window as the same snapshot saw it (see ``Snapshot.window``)."""

    calls: list[LiveCall]
    window: tuple[int | None, int] = (None, 0)


@dataclass(frozen=True)
class Viewer:
    """The signed-in user as the page needs them: staff or not, and their phones."""

    user_id: int
    staff: bool
    numbers: tuple[str, ...]  # their active voip_connection numbers, as written
