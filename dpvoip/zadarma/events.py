"""Zadarma's webhook events as typed data (zadarma.md section 1.3). Pure.

Values are kept as received but for surrounding white space (the signature is checked
on the raw form before this); numbers are normalised elsewhere, only for matching.
Optional fields are simply absent. An event this module does not know is returned as
``UnknownEvent``: it is answered 200 and counted, and creates no call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

KNOWN = ("NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_ANSWER", "NOTIFY_END",
         "NOTIFY_OUT_START", "NOTIFY_OUT_END", "NOTIFY_RECORD", "NOTIFY_IVR")

#: Fields an event cannot do without (besides ``event``). Not ``caller_id``: Zadarma sends
#: it empty (or ``0``) for a hidden number, and such a call is recorded as withheld.
REQUIRED: Mapping[str, tuple[str, ...]] = {
    "NOTIFY_START": ("pbx_call_id", "call_start"),
    "NOTIFY_INTERNAL": ("pbx_call_id", "call_start"),
    "NOTIFY_ANSWER": ("pbx_call_id", "call_start"),
    "NOTIFY_END": ("pbx_call_id", "call_start"),
    "NOTIFY_OUT_START": ("pbx_call_id", "call_start", "destination"),
    "NOTIFY_OUT_END": ("pbx_call_id", "call_start", "destination"),
    "NOTIFY_RECORD": ("pbx_call_id", "call_id_with_rec"),
    "NOTIFY_IVR": ("pbx_call_id", "call_start"),
}

_CALL_START = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_LIMIT = 200  # no field Zadarma sends is longer; a longer one is not Zadarma


#: Seconds: a week. Longer is no call, and would not fit the CRM's integer column anyway.
MAX_DURATION = 7 * 24 * 3600

#: The fields dpvoip reads. Their values must be free of control characters (a C0 or C1
#: control, DEL) and of any digit that is not ASCII: ``'²'.isdigit()`` is True and
#: ``int('²')`` raises, and no phone number, extension or count of Zadarma's is written so.
READ_FIELDS = ("event", "pbx_call_id", "call_start", "caller_id", "called_did", "internal",
               "destination", "last_internal", "duration", "disposition", "status_code",
               "is_recorded", "call_id_with_rec", "calltype", "transfer_from")

#: The fields whose digits become an extension (``int()``, the integer column
#: ``call_detail.extension``): a value of ASCII digits must fit PostgreSQL's ``integer``.
#: ``internal`` is the extension of a leg (and the own side of an outgoing call),
#: ``last_internal`` the one that ended it. ``destination`` is a phone number, kept as text
#: (a number of 10 or more digits is usual there); ``duration`` is bounded by
#: ``MAX_DURATION``; ``status_code`` is kept as text.
EXTENSION_FIELDS = ("internal", "last_internal")
MAX_INTEGER = 2_147_483_647  # PostgreSQL's integer

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class BadEvent(ValueError):
    """A form that claims to be a known event but lacks or garbles a field, or a form with
    a field that no database could store (a NUL in its name or value). The message names
    the field (``field``), escaped: it is answered to the sender and logged."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def shown(text: str, limit: int = 40) -> str:
    """``text`` quoted for a message: control characters and non-ASCII escaped, cut."""
    return ascii(text[:limit])


def check_storable(form: Mapping[str, str]) -> None:
    """``BadEvent`` naming the first field whose name or value holds a NUL, which neither
    PostgreSQL's text nor its ``jsonb`` can store. Checked first, whatever the event."""
    for name, value in form.items():
        if "\x00" in name:
            raise BadEvent(f"field name {shown(name)} holds a NUL character", name)
        if "\x00" in value:
            raise BadEvent(f"field {shown(name)} holds a NUL character", name)


def check_form(form: Mapping[str, str]) -> None:
    """``BadEvent`` naming the first field of a known event whose name or value is longer
    than any of Zadarma's, whose value dpvoip reads and holds a control character or a
    digit that is not ASCII, or whose extension does not fit PostgreSQL's integer.

    With ``check_storable``, this is what makes a form one that can be recorded: such a
    form is refused with 400 and never acknowledged, so that it can never wait in the
    spool for a replay that cannot apply it."""
    for name, value in form.items():
        if len(name) > _LIMIT:
            raise BadEvent(f"field name {shown(name)} is longer than {_LIMIT} characters",
                           name)
        if len(value) > _LIMIT:
            raise BadEvent(f"field {shown(name)} is longer than {_LIMIT} characters", name)
        if name in READ_FIELDS:
            if _CONTROL.search(value):
                raise BadEvent(f"field {shown(name)} holds a control character", name)
            if not value.isascii() and any(ch.isnumeric() for ch in value):
                raise BadEvent(f"field {shown(name)} holds a digit that is not ASCII "
                               f"({shown(value, 20)})", name)
    for name in EXTENSION_FIELDS:
        value = form.get(name, "").strip()
        if value.isascii() and value.isdigit() and (len(value) > 10
                                                    or int(value) > MAX_INTEGER):
            raise BadEvent(f"field {name!r} ({shown(value, 20)}) is beyond any extension "
                           f"(at most {MAX_INTEGER})", name)


@dataclass(frozen=True)
class ZadarmaEvent:
    kind: str
    pbx_call_id: str
    call_start: datetime | None  # the account's local time, no zone
    caller_id: str = ""
    called_did: str = ""
    internal: str = ""
    destination: str = ""
    last_internal: str = ""
    duration: int = 0
    disposition: str = ""
    status_code: str = ""
    is_recorded: bool = False
    call_id_with_rec: str = ""
    calltype: str = "normal"
    transfer_from: str = ""

    @property
    def outgoing(self) -> bool:
        return self.kind in ("NOTIFY_OUT_START", "NOTIFY_OUT_END") or self.calltype in (
            "callback_leg1", "callback_leg2")

    @property
    def final(self) -> bool:
        return self.kind in ("NOTIFY_END", "NOTIFY_OUT_END")


@dataclass(frozen=True)
class UnknownEvent:
    kind: str


def parse_event(form: Mapping[str, str]) -> ZadarmaEvent | UnknownEvent:
    """The event of ``form``; ``BadEvent`` naming the field when one cannot be read or
    stored (``check_storable``, also for an event dpvoip does not know; ``check_form``)."""
    check_storable(form)
    kind = form.get("event", "").strip()
    if kind not in KNOWN:
        return UnknownEvent(kind[:40])
    check_form(form)
    missing = [name for name in REQUIRED[kind] if not form.get(name, "").strip()]
    if missing:
        raise BadEvent(f"{kind} lacks {', '.join(missing)}", missing[0])
    start = form.get("call_start", "").strip()
    try:
        if start and not _CALL_START.fullmatch(start):
            raise ValueError
        # The pattern above is ISO 8601's; fromisoformat checks the ranges as strptime
        # would, ten times faster.
        call_start = datetime.fromisoformat(start) if start else None
    except ValueError:
        raise BadEvent(f"call_start {shown(start, 30)} is not YYYY-MM-DD HH:MM:SS",
                       "call_start") from None
    if call_start is not None and not 2000 <= call_start.year <= 2100:
        raise BadEvent(f"call_start {shown(start, 30)} is not a plausible time of a call",
                       "call_start")
    duration_text = form.get("duration", "").strip() or "0"
    if not (duration_text.isascii() and duration_text.isdigit()):
        raise BadEvent(f"duration {shown(duration_text, 20)} is not a number of seconds",
                       "duration")
    if len(duration_text) > 12 or int(duration_text) > MAX_DURATION:
        raise BadEvent(f"duration {shown(duration_text, 20)} is longer than any call",
                       "duration")
    recorded = form.get("is_recorded", "").strip() or "0"
    if recorded not in ("0", "1"):
        raise BadEvent(f"is_recorded {shown(recorded, 10)} is not 0 or 1", "is_recorded")
    return ZadarmaEvent(
        kind=kind,
        pbx_call_id=form["pbx_call_id"].strip(),
        call_start=call_start,
        caller_id=form.get("caller_id", "").strip(),
        called_did=form.get("called_did", "").strip(),
        internal=form.get("internal", "").strip(),
        destination=form.get("destination", "").strip(),
        last_internal=form.get("last_internal", "").strip(),
        duration=int(duration_text),
        disposition=form.get("disposition", "").strip(),
        status_code=form.get("status_code", "").strip(),
        is_recorded=recorded == "1",
        call_id_with_rec=form.get("call_id_with_rec", "").strip(),
        calltype=form.get("calltype", "").strip() or "normal",
        transfer_from=form.get("transfer_from", "").strip(),
    )


def call_id(pbx_call_id: str) -> str:
    """dpvoip's id of a Zadarma call (fits the CRM's 50 characters): ``zd-in_<40 hex>``."""
    return f"zd-{pbx_call_id}"[:50]
