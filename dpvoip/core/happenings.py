"""What happened to a call, as every source reports it to the ingest.

A Fritz!Box's tracker, the old monitor's endpoints and the spool's replay all speak these
plain records; the ingest turns each into one transaction. Times are UTC and are when the
thing happened (never when it was replayed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from dpvoip.core.outcomes import Detail, Outcome


@dataclass(frozen=True)
class Started:
    call_id: str
    box: str
    conn_id: int
    direction: str  # "incoming" | "outgoing"
    remote: str  # the remote party's number as the box sent it ('' when withheld)
    own_number: str
    line: str
    extension: int | None  # the extension that dialled (outgoing)
    at: datetime  # UTC
    hairpin: bool = False
    row_id: int | None = None  # the CRM row's id when reserved before (the old monitor's)


@dataclass(frozen=True)
class Answered:
    call_id: str
    extension: int
    at: datetime
    transfer: bool = False  # a second CONNECT: picked up or transferred elsewhere


@dataclass(frozen=True)
class Forwarded:
    """The box forwards a ringing call to an external number (a CALL on its id)."""

    call_id: str
    to_number: str
    at: datetime


@dataclass(frozen=True)
class Ended:
    """The call is over. Its notes are rendered from these fields where the row is
    written (``outcomes.notes``), in the configured language."""

    call_id: str
    outcome: Outcome
    duration: int  # the talk time, in seconds (the DISCONNECT's, Zadarma's duration)
    at: datetime
    extension: int | None  # the extension that took it (or dialled it)
    detail: Detail | None = None  # why, beyond the outcome


@dataclass(frozen=True)
class Unmatched:
    """A CONNECT or DISCONNECT for an id this tracker never saw start (after a reconnect
    or a restart): the ingest looks for a plausible open call of the box to close."""

    box: str
    conn_id: int
    at: datetime
    local_at: datetime
    kind: str  # "CONNECT" | "DISCONNECT"
    extension: int | None = None
    duration: int = 0


Happening = Started | Answered | Forwarded | Ended | Unmatched
