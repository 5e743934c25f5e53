"""What an event must stay behind while the spool is replayed: its call, and its number.

During a replay, a new event whose call and number have nothing left in the spool may go
straight to the database: it cannot overtake anything it depends on. The events of one
call must reach the database in order (a call's end after its start), and so must the
missed calls of one number (they are grouped into one ticket, in order). Everything else
is independent, so the spool only holds back the calls that are in it, and a replay no
longer keeps the whole office in spool mode while it drains.

Plain functions of plain data: the durable entry point counts the keys of what it spools
and releases them as the replay applies each record.
"""

from __future__ import annotations

from collections.abc import Mapping

from dpvoip.core.happenings import Ended, Happening, Started, Unmatched

#: Keys of one event; None: it cannot be told (it must wait behind everything spooled).
Keys = tuple[str, ...] | None


def number_key(number: str) -> str:
    """One number however it was written (``+30 210...``, ``0030210...``, ``210...``): its
    last nine digits, as the lanes of the replay and the directory's match use them.
    A withheld number ('') is a key of its own: withheld calls stay in order together."""
    digits = "".join(c for c in number if c.isdigit())
    return "n:" + (digits[-9:] or number)


def happening_keys(happening: Happening, numbers: Mapping[str, str]) -> Keys:
    """A Fritz!Box event's keys. A call's end makes its missed-call ticket, so it needs
    the number its start had (``numbers``: call id -> number, of the starts seen); an end
    whose start this process never saw, and a CONNECT/DISCONNECT the ingest matches by
    looking in the database (``Unmatched``), cannot be told."""
    if isinstance(happening, Unmatched):
        return None
    call = "c:" + happening.call_id
    if isinstance(happening, Started):
        return (call, number_key(happening.remote))
    if isinstance(happening, Ended):
        number = numbers.get(happening.call_id)
        return None if number is None else (call, number_key(number))
    return (call,)  # answered, forwarded: only the call's own order matters


#: Zadarma's outgoing calls' events: their ``caller_id`` is the office's own number (the
#: CallerID it dials out with), shared by every outgoing call, and not in their signed
#: string (internal + destination + call_start).
_OUT_EVENTS = ("NOTIFY_OUT_START", "NOTIFY_OUT_END")


def zadarma_keys(pbx_call_id: str, form: Mapping[str, str], outgoing: bool) -> Keys:
    """A Zadarma event's keys: its call, the caller (incoming: the ticket's number; also
    what the signature binds) and, for an outgoing call or a callback's leg, the
    destination. An incoming call's ``destination`` (NOTIFY_ANSWER's: the extension that
    answered, or the office's number) is shared by the office's calls like ``called_did``
    and is not a key: as one, every answered call arriving during a replay waited behind
    the spooled answers of that extension. For the same reason an outgoing call's
    ``caller_id`` (the office's number) is not one: its customer is the destination. A
    callback's legs keep both, as their signed string holds the caller_id."""
    if form.get("event") in _OUT_EVENTS:
        fields: tuple[str, ...] = ("destination",)
    else:
        fields = ("caller_id", "destination") if outgoing else ("caller_id",)
    keys = ["zd:" + pbx_call_id]
    for field in fields:
        if form.get(field):
            keys.append(number_key(form[field]))
    return tuple(keys)
