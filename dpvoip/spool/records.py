"""What a spool record holds: an event exactly as the ingest entry point receives it.

Pure. A Fritz!Box happening is kept with its fields and the name of its box (the box's
rules come from the configuration when it is replayed); a Zadarma event is kept as the
raw form it arrived as (parsed again at replay, by the same code). JSON, so that an
administrator can read a spool that will not replay.

An ``Ended`` keeps its detail as a code (``{"reason": "forwarded", "value": "0697..."}``),
never words: the notes are written in the configured language at replay. A record of the
versions before that holds English notes instead (``"notes": "interrupted: monitor
connection lost"``); its detail is read back from the phrases those versions wrote, and
an unknown one is kept as a free text.
"""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import datetime
from typing import Any

from dpvoip.core.happenings import Answered, Ended, Forwarded, Happening, Started, Unmatched
from dpvoip.core.outcomes import Detail, Outcome, Reason

_KINDS: dict[str, type[Any]] = {
    cls.__name__: cls for cls in (Started, Answered, Forwarded, Ended, Unmatched)
}
_TIMES = frozenset({"at", "local_at"})
#: Fields written only when set (a ``Started``'s reserved ``row_id``, the old monitor's);
#: a record without one reads as None.
_OPTIONAL = frozenset({"row_id"})
#: The details the versions before the structured ``Ended`` wrote into its notes, after
#: the outcome and ": " (``interrupted: monitor connection lost``).
_LEGACY_DETAILS = {
    "monitor connection lost": Reason.LINK_LOST,
    "dpvoip restarted": Reason.RESTARTED,
    "DISCONNECT lost, id reused": Reason.ID_REUSED,
    "recovered after a reconnect": Reason.RECOVERED,
    "internal call to an own number": Reason.HAIRPIN,
}
_LEGACY_FORWARDED = "forwarded to "


class BadRecord(ValueError):
    """A record this version cannot read (written by another version, or damaged)."""


def fritz_record(happening: Happening, box: str, received: datetime | None = None) -> bytes:
    values: dict[str, Any] = {}
    for spec in fields(happening):
        value = getattr(happening, spec.name)
        if spec.name in _OPTIONAL and value is None:
            continue  # a box's record as before: an older version still reads it
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, Outcome):
            value = value.value
        elif isinstance(value, Detail):
            value = {"reason": value.reason.value, "value": value.value}
        values[spec.name] = value
    return _dump({"source": "fritzbox", "box": box, "kind": type(happening).__name__,
                  "fields": values, **_arrival(received)})


def zadarma_record(form: dict[str, str], received: datetime | None = None,
                   provider: str | None = None) -> bytes:
    """A Zadarma webhook's form, with the provider whose webhook it came to (its account's
    zone, guard and tickets apply at the replay)."""
    named = {} if provider is None else {"provider": provider}
    return _dump({"source": "zadarma", "form": form, **named, **_arrival(received)})


def _arrival(received: datetime | None) -> dict[str, str]:
    """When the event arrived (UTC): the ingest writes its rows as at that time, so a
    replay writes what a commit at once would have."""
    return {} if received is None else {"received": received.isoformat()}


def read_received(payload: bytes) -> datetime | None:
    """When the event of a record arrived; None for a record written before dpvoip kept
    it (or a damaged one: ``read_record`` says what is wrong with it)."""
    try:
        value = json.loads(payload).get("received")
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except (ValueError, AttributeError):
        return None


def read_record(payload: bytes) -> tuple[str, Any, Any]:
    """("fritzbox", happening, box name) or ("zadarma", form, provider name: None for a
    record written before dpvoip kept it)."""
    try:
        data = json.loads(payload)
        if data["source"] == "zadarma":
            form = data["form"]
            if not isinstance(form, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in form.items()):
                raise BadRecord("a Zadarma record without its form")
            provider = data.get("provider")
            if provider is not None and not isinstance(provider, str):
                raise BadRecord("a Zadarma record whose provider is not a name")
            return "zadarma", form, provider
        if data["source"] == "fritzbox":
            kind = _KINDS[data["kind"]]
            values = dict(data["fields"])
            for name in _TIMES & values.keys():
                values[name] = datetime.fromisoformat(values[name])
            if kind is Ended:
                values["outcome"] = Outcome(values["outcome"])
                values["detail"] = (legacy_detail(values.pop("notes")) if "notes" in values
                                    else _detail(values.get("detail")))
            return "fritzbox", kind(**values), str(data["box"])
    except BadRecord:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise BadRecord(f"unreadable spool record: {error}") from None
    raise BadRecord(f"a spool record of unknown source {data.get('source')!r}")


def _detail(data: Any) -> Detail | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("value", ""), str):
        raise BadRecord(f"a detail that is no detail: {data!r}")
    return Detail(Reason(data["reason"]), data.get("value", ""))


def legacy_detail(notes: Any) -> Detail | None:
    """The detail in the English notes of an older version's record: a known phrase
    becomes its code, any other text stays a free detail. The part before ": " (the
    outcome, the extension) is rendered again from the record's other fields."""
    if not isinstance(notes, str):
        raise BadRecord(f"notes that are no text: {notes!r}")
    _, colon, detail = notes.partition(": ")
    if not colon or not detail:
        return None
    if detail in _LEGACY_DETAILS:
        return Detail(_LEGACY_DETAILS[detail])
    if detail.startswith(_LEGACY_FORWARDED):
        return Detail(Reason.FORWARDED, detail.removeprefix(_LEGACY_FORWARDED))
    return Detail(Reason.TEXT, detail)


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
