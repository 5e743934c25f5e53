"""The two contracts of the CRM's ``fritz_monitor.py``, as plain data. Pure: no I/O.

- v4, the webhook: ``POST /accounting/api/fritz-webhook/`` with ``Authorization: Bearer``,
  JSON ``{"action": "create"|"update", ...}`` (behaviour.md section 9);
- v3.5, the REST calls: ``POST /accounting/api/voip-calls/`` and
  ``PATCH /accounting/api/voip-calls/<id>/`` with ``X-API-Key`` (the CRM's
  ``VoIPCallSerializer`` answers).

Here: the token check, every field validated into ``Create`` / ``Update`` (or ``Invalid``
naming the field), the call's dpvoip id, what an update means for the call (the
happenings the ingest is given, decided from what is known of the call), and the answers'
shapes. The CRM's defects are not kept: the token only in a header, compared in constant
time, never the default; ``direction`` and ``status`` only the CRM's choices; times ISO
8601 (a naive one is the office's zone); the script's ``create_ticket`` is read and
ignored (the ingest's rules decide: an incoming missed call, once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any

from dpvoip.core.happenings import Answered, Ended, Happening, Started
from dpvoip.core.outcomes import Outcome

#: The CRM's own default token (its settings' fallback): never accepted.
INSECURE_DEFAULT_TOKEN = "change-this-token-in-production"  # noqa: S105 (refused)
#: The CRM's status and direction choices (``VoIPCall.STATUS_CHOICES``, ``DIRECTION_CHOICES``).
STATUSES = ("active", "completed", "missed", "failed")
DIRECTIONS = ("incoming", "outgoing")
#: ``accounting_voipcall.call_id`` is varchar(50).
CALL_ID_CHARS = 50
#: The longest remote number accepted (the column keeps 20; the raw value is normalised).
PHONE_CHARS = 40
#: What an Answered carries when the monitor does not say which extension took the call.
UNKNOWN_EXTENSION = 0


class Invalid(ValueError):
    """A request the contract refuses: 400 naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class BadJson(ValueError):
    """The body is not a JSON object."""


class BadAction(ValueError):
    """A webhook ``action`` other than create and update."""

    def __init__(self, action: object) -> None:
        super().__init__(f"Invalid action: {action}")


# -- the token ------------------------------------------------------------------------------

def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be used (every request is then refused), or None."""
    if not token:
        return "[legacy_monitor] token (FRITZ_API_TOKEN) is not set"
    if token == INSECURE_DEFAULT_TOKEN:
        return ("[legacy_monitor] token (FRITZ_API_TOKEN) is the CRM's default "
                f"{INSECURE_DEFAULT_TOKEN!r}")
    return None


def bearer_matches(header: bytes | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    if header is None or token_problem(token) is not None:
        return False
    return hmac.compare_digest(header, b"Bearer " + token.encode("utf-8"))


def api_key_matches(header: bytes | None, token: str) -> bool:
    """``X-API-Key: <token>``, compared in constant time."""
    if header is None or token_problem(token) is not None:
        return False
    return hmac.compare_digest(header, token.encode("utf-8"))


# -- the requests ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Create:
    call_id: str  # the monitor's own id
    phone_number: str  # the remote party as the monitor saw it ('' when withheld)
    direction: str
    started_at: datetime  # UTC


@dataclass(frozen=True)
class Update:
    row_id: int  # the CRM row's id, as the create answered it
    status: str | None
    ended_at: datetime | None  # UTC
    create_ticket: bool | None  # read, validated, never decides


def body_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadJson("the body is not JSON") from None
    if not isinstance(data, dict):
        raise BadJson("the body is not a JSON object")
    return data


def webhook_request(data: dict[str, Any], zone: tzinfo) -> Create | Update:
    """The v4 webhook's request: a create or an update (``BadAction`` otherwise)."""
    action = data.get("action")
    if action == "create":
        return create_request(data, zone)
    if action == "update":
        return update_request(data, row_id(data.get("id"), "id"), zone)
    raise BadAction(action)


def create_request(data: dict[str, Any], zone: tzinfo) -> Create:
    status = data.get("status", "active")
    if status != "active":
        raise Invalid("status", "a call is created active")
    return Create(
        call_id=monitor_call_id(data.get("call_id")),
        phone_number=_phone(data.get("phone_number")),
        direction=_choice(data.get("direction"), "direction", DIRECTIONS),
        started_at=_time(data.get("started_at"), "started_at", zone, required=True),
    )


def update_request(data: dict[str, Any], row: int, zone: tzinfo) -> Update:
    status = data.get("status")
    ticket = data.get("create_ticket")
    if ticket is not None and not isinstance(ticket, bool):
        raise Invalid("create_ticket", "must be true or false")
    return Update(
        row_id=row,
        status=None if status is None else _choice(status, "status", STATUSES),
        ended_at=_time(data.get("ended_at"), "ended_at", zone, required=False),
        create_ticket=ticket,
    )


def row_id(value: object, field: str = "id") -> int:
    """A CRM row id: a positive integer (or its digits, as in a URL)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
        raise Invalid(field, "must be a call's id (a positive integer)")
    return value


def monitor_call_id(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid("call_id", "required, a non-empty text")
    if len(value) > CALL_ID_CHARS:
        raise Invalid("call_id", f"at most {CALL_ID_CHARS} characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise Invalid("call_id", "no spaces or control characters")
    return value


def _phone(value: object) -> str:
    if value is None:
        return ""  # withheld
    if not isinstance(value, str):
        raise Invalid("phone_number", "must be a text")
    if len(value) > PHONE_CHARS or not value.isprintable():
        raise Invalid("phone_number", f"not a phone number (at most {PHONE_CHARS} "
                                      "printable characters)")
    return value.strip()


def _choice(value: object, field: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise Invalid(field, f"must be one of {', '.join(choices)}")
    return value


def _time(value: object, field: str, zone: tzinfo, required: bool) -> Any:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise Invalid(field, "required, an ISO 8601 time")
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00")
                                    if value.endswith("Z") else value)
    except ValueError:
        raise Invalid(field, f"not an ISO 8601 time: {value[:40]!r}") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=zone)  # the office's wall clock
    return at.astimezone(UTC)


# -- the call's identity --------------------------------------------------------------------

def dpvoip_call_id(label: str, call_id: str) -> str:
    """dpvoip's call id for the monitor's ``call_id``: the same every time (a repeated
    create finds its row), within the column's 50 characters."""
    whole = f"lm-{label}-{call_id}"
    if len(whole) <= CALL_ID_CHARS:
        return whole
    digest = hashlib.sha256(call_id.encode("utf-8")).hexdigest()
    return f"lm-{label}-{digest}"[:CALL_ID_CHARS]


def started(create: Create, call_id: str, box: str, row: int, hairpin: bool) -> Started:
    return Started(call_id=call_id, box=box, conn_id=0, direction=create.direction,
                   remote=create.phone_number, own_number="", line="", extension=None,
                   at=create.started_at, hairpin=hairpin, row_id=row)


# -- what an update means -------------------------------------------------------------------

@dataclass(frozen=True)
class KnownCall:
    """What is known of a call when its update arrives (from its row, or from the create
    this process answered while the database was away)."""

    row_id: int
    call_id: str
    direction: str
    phone_number: str  # as the row shows it
    started_at: datetime
    answered_at: datetime | None = None
    ended: bool = False


def outcome_of(direction: str, status: str) -> Outcome:
    """The outcome the monitor's final status means. An outgoing call nobody answered is
    ``not reached`` (the CRM's ``failed``), as dpvoip records it from the box itself: it
    never gets a ticket, whatever the script asked."""
    if status == "completed":
        return Outcome.ANSWERED
    if status == "missed":
        return Outcome.MISSED if direction == "incoming" else Outcome.NOT_REACHED
    return Outcome.FAILED


def update_happenings(call: KnownCall, update: Update, now: datetime) -> tuple[Happening, ...]:
    """The happenings an update means for ``call``, ``now`` being its arrival (UTC).

    - a call already ended: nothing (a repeated update writes nothing, no second ticket);
    - ``completed`` without ``ended_at``: answered (the v3.5 script's CONNECT), once;
    - a final status (or ``ended_at``): ended at ``ended_at`` (else at arrival);
    - ``active`` alone: nothing."""
    if call.ended:
        return ()
    final = update.status not in (None, "active")
    if update.ended_at is None and update.status == "completed":
        if call.answered_at is not None:
            return ()
        return (Answered(call.call_id, UNKNOWN_EXTENSION, now),)
    if update.ended_at is None and not final:
        return ()
    status = update.status if final and update.status else (
        "completed" if call.answered_at is not None else "missed")
    at = max(update.ended_at or now, call.started_at)
    outcome = outcome_of(call.direction, status)
    talk = 0
    if outcome is Outcome.ANSWERED:
        talk = max(0, int((at - (call.answered_at or call.started_at)).total_seconds()))
    return (Ended(call.call_id, outcome, talk, at, None),)


# -- the answers ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CallRow:
    """A call row as the answers show it (read back, or as it will be written)."""

    id: int
    call_id: str
    direction: str
    phone_number: str
    status: str
    started_at: datetime
    ended_at: datetime | None = None
    duration_seconds: int = 0
    client_id: int | None = None
    client_name: str | None = None
    client_email: str | None = None
    notes: str = ""
    ticket_created: bool = False
    ticket_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def duration_formatted(seconds: int) -> str:
    """The CRM model's ``duration_formatted``: ``HH:MM:SS``."""
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def rest_body(row: CallRow) -> dict[str, Any]:
    """The CRM's ``VoIPCallSerializer`` of the row, field for field."""
    return {
        "id": row.id, "call_id": row.call_id, "client": row.client_id,
        "client_name": row.client_name, "direction": row.direction,
        "phone_number": row.phone_number, "status": row.status,
        "started_at": _iso(row.started_at), "ended_at": _iso(row.ended_at),
        "duration_seconds": row.duration_seconds,
        "duration_formatted": duration_formatted(row.duration_seconds), "notes": row.notes,
        "ticket_created": row.ticket_created, "ticket_id": row.ticket_id,
        "client_email": row.client_email, "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
    }


def webhook_created(row: CallRow, duplicate: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "success": True, "id": row.id, "call_id": row.call_id, "client_id": row.client_id,
        "client_name": row.client_name, "is_known": row.client_id is not None,
    }
    if duplicate:
        body["duplicate"] = True
    return body


def webhook_updated(row: CallRow) -> dict[str, Any]:
    return {"success": True, "id": row.id, "status": row.status,
            "duration": row.duration_seconds}


def rest_error(error: Invalid) -> dict[str, Any]:
    """DRF's shape of a validation error: the field and its messages."""
    return {error.field: [error.message]}


def expected_row(call: KnownCall, happenings: tuple[Happening, ...]) -> CallRow:
    """The row as it will read once ``happenings`` are written: the answer while the
    database is away (the client is not known then)."""
    status, ended_at, duration = "active", None, 0
    for happening in happenings:
        if isinstance(happening, Ended):
            status, ended_at = happening.outcome.status, happening.at
            duration = int((happening.at - call.started_at).total_seconds())
    return CallRow(id=call.row_id, call_id=call.call_id, direction=call.direction,
                   phone_number=call.phone_number, status=status,
                   started_at=call.started_at, ended_at=ended_at, duration_seconds=duration)
