"""The Fritz!Box CallMonitor line format: one event per line, fields split by ``;``.

Pure: a line (already decoded) goes in, a typed event or a ``BadLine`` with the reason
comes out. Tolerates what real boxes send (a missing line field on old firmware, extra
trailing fields, an empty caller for a withheld number) and rejects the rest, so that
the protocol can log, count and skip it.

Every event has an ``arrived`` field the parser leaves None: the I/O edge that received the
line (``FritzBox.line_received``) sets it to the time the line arrived by dpvoip's clock
(sub-second), because the box's own times have one-second resolution and the tracker
needs both to tell a blocked call from a missed one (docs/decisions.md, issue 16). An
event replayed from a capture or built by a test has none, and is decided by the box's
times alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime


class BadLine(ValueError):
    """A line that is not a CallMonitor event; the message says why."""


@dataclass(frozen=True)
class Ring:
    """An incoming call rings. ``caller`` is empty when the number is withheld."""

    at: datetime
    conn_id: int
    caller: str
    called: str
    line: str
    arrived: float | None = None  # by dpvoip's clock, seconds; None: unknown


@dataclass(frozen=True)
class Call:
    """An outgoing call is dialled. Note the layout: the remote number is field 5."""

    at: datetime
    conn_id: int
    extension: int
    caller: str
    called: str
    line: str
    arrived: float | None = None  # by dpvoip's clock, seconds; None: unknown


@dataclass(frozen=True)
class Connect:
    """A call is answered on ``extension`` (or an outgoing call is picked up)."""

    at: datetime
    conn_id: int
    extension: int
    number: str
    arrived: float | None = None  # by dpvoip's clock, seconds; None: unknown


@dataclass(frozen=True)
class Disconnect:
    """A call ends; ``duration`` is talk time in seconds since CONNECT (0 if none)."""

    at: datetime
    conn_id: int
    duration: int
    arrived: float | None = None  # by dpvoip's clock, seconds; None: unknown


Event = Ring | Call | Connect | Disconnect

#: C0 controls (NUL among them), DEL and C1 controls: never in a CallMonitor line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_MINIMUM_FIELDS = {"RING": 5, "CALL": 6, "CONNECT": 5, "DISCONNECT": 4}


def parse(line: str) -> Event:
    """The event of one line (without its line ending). Raises BadLine."""
    text = line.strip()
    if not text:
        raise BadLine("empty line")
    control = _CONTROL.search(text)
    if control is not None:
        # A NUL (or another control character) is no part of a CallMonitor line, and
        # PostgreSQL cannot store a NUL: the line is refused here, whole, and the box's
        # other lines go on (before, a RING holding one failed in the database).
        raise BadLine(f"a control character {control.group()!r} at position "
                      f"{control.start()}")
    fields = text.split(";")
    if text.endswith(";"):
        fields.pop()  # every line ends with ';': that is no empty last field
    if len(fields) < 2:
        raise BadLine("not a CallMonitor line (no ';')")
    kind = fields[1].strip()
    needed = _MINIMUM_FIELDS.get(kind)
    if needed is None:
        raise BadLine(f"unknown event {kind[:20]!r}")
    if len(fields) < needed:
        raise BadLine(f"{kind} needs {needed - 1} fields, got {len(fields) - 1}")
    at = _time(fields[0])
    conn_id = _number(fields[2], "connection id")
    if kind == "RING":
        return Ring(at, conn_id, fields[3].strip(), fields[4].strip(), _optional(fields, 5))
    if kind == "CALL":
        return Call(at, conn_id, _number(fields[3], "extension"), fields[4].strip(),
                    fields[5].strip(), _optional(fields, 6))
    if kind == "CONNECT":
        return Connect(at, conn_id, _number(fields[3], "extension"), fields[4].strip())
    return Disconnect(at, conn_id, _number(fields[3], "duration"))


def _time(text: str) -> datetime:
    """``dd.mm.yy HH:MM:SS`` by position (strptime is the parser's slowest part)."""
    value = text.strip()
    try:
        if (len(value) != 17 or value[2] != "." or value[5] != "." or value[8] != " "
                or value[11] != ":" or value[14] != ":" or not value.isascii()
                or not (value[0:2] + value[3:5] + value[6:8] + value[9:11] + value[12:14]
                        + value[15:17]).isdigit()):
            raise ValueError  # int() would take "-1" or " 5"
        return datetime(2000 + int(value[6:8]), int(value[3:5]), int(value[0:2]),
                        int(value[9:11]), int(value[12:14]), int(value[15:17]))
    except ValueError:
        raise BadLine(f"bad time {text[:20]!r} (expected dd.mm.yy HH:MM:SS)") from None


def _number(text: str, what: str) -> int:
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 9:
        raise BadLine(f"bad {what} {value[:20]!r}")
    return int(value)


def _optional(fields: list[str], index: int) -> str:
    return fields[index].strip() if len(fields) > index else ""
