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


class BadEvent(ValueError):
    """A form that claims to be a known event but lacks or garbles a field."""


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
    kind = form.get("event", "").strip()
    if kind not in KNOWN:
        return UnknownEvent(kind[:40])
    for name, value in form.items():
        if len(value) > _LIMIT:
            raise BadEvent(f"field {name[:40]!r} is longer than {_LIMIT} characters")
    missing = [name for name in REQUIRED[kind] if not form.get(name, "").strip()]
    if missing:
        raise BadEvent(f"{kind} lacks {', '.join(missing)}")
    start = form.get("call_start", "").strip()
    try:
        if start and not _CALL_START.fullmatch(start):
            raise ValueError
        # The pattern above is ISO 8601's; fromisoformat checks the ranges as strptime
        # would, ten times faster.
        call_start = datetime.fromisoformat(start) if start else None
    except ValueError:
        raise BadEvent(f"call_start {start[:30]!r} is not YYYY-MM-DD HH:MM:SS") from None
    if call_start is not None and not 2000 <= call_start.year <= 2100:
        raise BadEvent(f"call_start {start[:30]!r} is not a plausible time of a call")
    duration_text = form.get("duration", "").strip() or "0"
    if not (duration_text.isascii() and duration_text.isdigit()):
        raise BadEvent(f"duration {duration_text[:20]!r} is not a number of seconds")
    if int(duration_text[:12]) > MAX_DURATION or len(duration_text) > 12:
        raise BadEvent(f"duration {duration_text[:20]!r} is longer than any call")
    recorded = form.get("is_recorded", "").strip() or "0"
    if recorded not in ("0", "1"):
        raise BadEvent(f"is_recorded {recorded[:10]!r} is not 0 or 1")
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
