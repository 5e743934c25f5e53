"""The Fritz!Box call list (TR-064 ``GetCallList``'s XML) as typed, immutable data.

Pure: bytes in, a ``CallList`` out. The list is what recovers the calls the CallMonitor
port missed, so one odd entry must not cost the others: a ``<Call>`` without a usable
``Id``, ``Type`` or ``Date`` is skipped and counted, and only a document that is not a
call list at all (not XML, no ``<timestamp>``, too big) is refused with ``CallListError``.

The XML comes from the network: it is read with defusedxml (no DTD, no entity expansion,
no external entities) after a size check, and no error message repeats more than a few
characters of it.

Format (fritzbox.md section 7): ``<root><timestamp>T</timestamp><Call>...</Call>...``,
newest first; ``Date`` is ``dd.mm.yy HH:MM`` in the box's local time (no seconds),
``Duration`` is ``h:mm`` with the minutes rounded up by the box.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

INCOMING, MISSED, OUTGOING, ACTIVE_INCOMING, BLOCKED, ACTIVE_OUTGOING = 1, 2, 3, 9, 10, 11

#: Types whose remote party is the called number (the office dialled).
OUTGOING_TYPES = frozenset({OUTGOING, ACTIVE_OUTGOING})
#: Calls still going on: the box rewrites them when they end.
ACTIVE_TYPES = frozenset({ACTIVE_INCOMING, ACTIVE_OUTGOING})
#: The answering machines' ports (TAM 1-10 on 40-49, the old single TAM on 6).
MACHINE_PORTS = frozenset({*(str(port) for port in range(40, 50)), "6"})

MAX_BYTES = 4_000_000

_DATE = re.compile(r"([0-9]{1,2})\.([0-9]{1,2})\.([0-9]{2}|[0-9]{4}) +([0-9]{1,2}):([0-9]{2})")
_DURATION = re.compile(r"([0-9]{1,4}):([0-9]{2})")
_NUMBER = re.compile(r"[0-9]{1,18}")


class CallListError(ValueError):
    """A document that is not a usable call list; the message says what is wrong."""


@dataclass(frozen=True)
class ListedCall:
    """One entry of the box's call list."""

    id: int
    type: int              # 1, 2, 3, 9, 10, 11 (others kept as given)
    remote: str            # `Called` for types 3 and 11, else `Caller`; '' when withheld
    own_number: str        # `CalledNumber` for incoming types, `CallerNumber` for outgoing
    name: str
    device: str
    port: str              # "40".."49" or "6": the answering machine (TAM)
    date: datetime         # naive box-local wall time, minute resolution
    duration_seconds: int  # from "h:mm" (the box rounds minutes up)

    @property
    def direction(self) -> str:
        """``"outgoing"`` for types 3 and 11, else ``"incoming"``."""
        return "outgoing" if self.type in OUTGOING_TYPES else "incoming"

    @property
    def active(self) -> bool:
        """A call still going on (9, 11): its entry will change when it ends."""
        return self.type in ACTIVE_TYPES

    def by_machine(self, machine_ports: Collection[str] = MACHINE_PORTS) -> bool:
        """Whether an answering machine took the call (its ``Port``)."""
        return self.port in machine_ports


@dataclass(frozen=True)
class CallList:
    """The list as the box sent it: its stamp and its entries, newest first."""

    timestamp: int
    calls: tuple[ListedCall, ...]
    skipped: int = 0       # <Call> elements left out because they were malformed


def parse_call_list(data: bytes, max_bytes: int = MAX_BYTES) -> CallList:
    """Read a call list document; raises ``CallListError`` when it is not one."""
    if len(data) > max_bytes:
        raise CallListError(f"the call list is larger than {max_bytes} bytes")
    try:
        root = fromstring(data, forbid_dtd=True, forbid_entities=True,
                          forbid_external=True)
    except DefusedXmlException:
        raise CallListError("the call list holds a DTD or entities, which are refused"
                            ) from None
    except ParseError as error:
        raise CallListError(f"the call list is not XML ({_short(str(error))})") from None
    if _local(root.tag) != "root":
        raise CallListError(f"the call list's root element is <{_short(_local(root.tag))}>, "
                            "not <root>")
    stamp = _text(root, "timestamp")
    if not _NUMBER.fullmatch(stamp):
        raise CallListError("the call list has no numeric <timestamp>")
    calls: list[ListedCall] = []
    skipped = 0
    for element in root:
        if _local(element.tag) != "Call":
            continue
        call = _call(element)
        if call is None:
            skipped += 1
        else:
            calls.append(call)
    return CallList(int(stamp), tuple(calls), skipped)


def _call(element: Element) -> ListedCall | None:
    """One entry, or None when it lacks a usable Id, Type, Date or Duration."""
    identifier, kind = _text(element, "Id"), _text(element, "Type")
    if not _NUMBER.fullmatch(identifier) or not _NUMBER.fullmatch(kind):
        return None
    date = parse_date(_text(element, "Date"))
    duration = parse_duration(_text(element, "Duration") or "0:00")
    if date is None or duration is None or int(identifier) == 0:
        return None
    type_ = int(kind)
    outgoing = type_ in OUTGOING_TYPES
    return ListedCall(
        id=int(identifier),
        type=type_,
        remote=_text(element, "Called" if outgoing else "Caller"),
        own_number=_text(element, "CallerNumber" if outgoing else "CalledNumber"),
        name=_text(element, "Name"),
        device=_text(element, "Device"),
        port=_text(element, "Port"),
        date=date,
        duration_seconds=duration,
    )


def parse_date(text: str) -> datetime | None:
    """``dd.mm.yy HH:MM`` (a four-digit year is taken too) as a naive datetime."""
    match = _DATE.fullmatch(text.strip())
    if match is None:
        return None
    day, month, year, hour, minute = (int(part) for part in match.groups())
    try:
        return datetime(year + 2000 if year < 100 else year, month, day, hour, minute)
    except ValueError:
        return None


def parse_duration(text: str) -> int | None:
    """``h:mm`` as seconds (``0:01`` is 60, ``12:34`` is 45240)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match.group(2)) > 59:
        return None
    return (int(match.group(1)) * 60 + int(match.group(2))) * 60


def _text(parent: Element, name: str) -> str:
    """The stripped text of ``parent``'s first child called ``name``; '' when absent."""
    for child in parent:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return ""


def _local(tag: str) -> str:
    """A tag without its ``{namespace}``."""
    return tag.rpartition("}")[2]


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
