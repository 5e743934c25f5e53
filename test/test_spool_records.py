"""A spooled event comes back exactly as it went in; records of the previous version (an
``Ended`` with English notes) are still read."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dpvoip.core.call_log import ended_notes
from dpvoip.core.happenings import Answered, Ended, Forwarded, Happening, Started, Unmatched
from dpvoip.core.outcomes import Detail, Outcome, Reason
from dpvoip.core.texts import Texts
from dpvoip.spool.records import BadRecord, fritz_record, read_record, zadarma_record

AT = datetime(2026, 1, 15, 8, 0, 5, tzinfo=UTC)
HAPPENINGS: list[Happening] = [
    Started("fb-office-20260115100005-1", "office", 1, "incoming", "6912345678",
            "2107654321", "SIP0", None, AT, hairpin=False),
    Answered("fb-office-20260115100005-1", 40, AT, transfer=True),
    Forwarded("fb-office-20260115100005-1", "6998765432", AT),
    Ended("fb-office-20260115100005-1", Outcome.VOICEMAIL, 12, AT, 40),
    Ended("fb-office-20260115100005-1", Outcome.ANSWERED, 120, AT, 0,
          Detail(Reason.FORWARDED, "6971234567")),
    Ended("fb-office-20260115100005-1", Outcome.INTERRUPTED, 0, AT, None,
          Detail(Reason.LINK_LOST)),
    Ended("fb-office-20260115100005-1", Outcome.MISSED, 0, AT, None,
          Detail(Reason.TEXT, "κάτι \u00e9\u4e2d")),
    Unmatched("office", 3, AT, datetime(2026, 1, 15, 10, 0, 5), "DISCONNECT", None, 0),
]


@pytest.mark.parametrize("happening", HAPPENINGS, ids=lambda h: type(h).__name__)
def test_fritz_happenings_round_trip(happening: Happening) -> None:
    source, back, box = read_record(fritz_record(happening, "office"))
    assert (source, back, box) == ("fritzbox", happening, "office")


def test_an_ended_keeps_its_detail_as_a_readable_code_not_words() -> None:
    record = fritz_record(Ended("c", Outcome.INTERRUPTED, 0, AT, None,
                                Detail(Reason.RESTARTED)), "office")
    assert b'"detail":{"reason":"restarted","value":""}' in record
    assert b"notes" not in record


#: Ended records exactly as the version before the structured detail wrote them (its
#: ``fritz_record``), with its English notes.
OLD = ('{"source":"fritzbox","box":"office","kind":"Ended","fields":{"call_id":'
       '"fb-office-20260115100005-1","outcome":"%s","duration":%d,'
       '"at":"2026-01-15T08:00:05+00:00","extension":%s,"notes":"%s"}}')


@pytest.mark.parametrize(("outcome", "duration", "extension", "notes", "detail"), [
    ("interrupted", 0, "null", "interrupted: monitor connection lost",
     Detail(Reason.LINK_LOST)),
    ("interrupted", 0, "11", "interrupted: dpvoip restarted", Detail(Reason.RESTARTED)),
    ("interrupted", 0, "null", "interrupted: DISCONNECT lost, id reused",
     Detail(Reason.ID_REUSED)),
    ("missed", 0, "null", "missed: recovered after a reconnect", Detail(Reason.RECOVERED)),
    ("answered", 120, "0", "answered on extension 0: forwarded to 6971234567",
     Detail(Reason.FORWARDED, "6971234567")),
    ("answered", 60, "11", "answered on extension 11: internal call to an own number",
     Detail(Reason.HAIRPIN)),
    ("voicemail", 12, "40", "voicemail (answering machine 1)", None),
    ("blocked", 0, "null", "blocked by call barring", None),
    ("interrupted", 0, "null", "interrupted: the box caught fire",
     Detail(Reason.TEXT, "the box caught fire")),
])
def test_an_old_record_with_english_notes_is_read(outcome: str, duration: int, extension: str,
                                                   notes: str, detail: Detail | None) -> None:
    payload = (OLD % (outcome, duration, extension, notes)).encode()
    source, ended, box = read_record(payload)
    assert (source, box) == ("fritzbox", "office")
    assert ended == Ended("fb-office-20260115100005-1", Outcome(outcome), duration, AT,
                          None if extension == "null" else int(extension), detail)
    # Written again in English, the notes are the old ones (and the talk time); in Greek,
    # Greek.
    english = ended_notes(ended, Texts("en"))
    assert english.startswith(notes)
    talk = "message" if outcome == "voicemail" else "talk"
    assert english == notes + (f", {talk} {duration // 60}:{duration % 60:02d}"
                               if duration else "")
    if detail is None or detail.reason is not Reason.TEXT:
        greek = ended_notes(ended, Texts("el"))
        assert not any("a" <= ch.lower() <= "z" for ch in greek.replace("6971234567", "")), greek


def test_a_zadarma_form_round_trips_with_any_text() -> None:
    form = {"event": "NOTIFY_START", "caller_id": "+30 691 \u00e9\u4e2d", "call_start": ""}
    assert read_record(zadarma_record(form)) == ("zadarma", form, None)


def test_a_zadarma_record_names_the_provider_its_webhook_came_to() -> None:
    """So that the replay reads it with that account's zone, guard and tickets; a record
    written before it was kept names none (read as the main provider's)."""
    form = {"event": "NOTIFY_START", "pbx_call_id": "in_1"}
    assert read_record(zadarma_record(form, provider="branch")) == ("zadarma", form, "branch")
    old = b'{"source": "zadarma", "form": {"event": "NOTIFY_START", "pbx_call_id": "in_1"}}'
    assert read_record(old) == ("zadarma", form, None)


@pytest.mark.parametrize("payload", [
    b"", b"\xff", b"[]", b'{"source": "fax"}', b'{"source": "zadarma", "form": [1]}',
    b'{"source": "zadarma", "form": {"a": 1}}',
    b'{"source": "zadarma", "form": {"a": "1"}, "provider": ["branch"]}',
    b'{"source": "fritzbox", "box": "o", "kind": "Exploded", "fields": {}}',
    b'{"source": "fritzbox", "box": "o", "kind": "Answered", "fields": {"x": 1}}',
    b'{"source": "fritzbox", "box": "o", "kind": "Answered", "fields":'
    b' {"call_id": "c", "extension": 1, "at": "yesterday"}}',
    b'{"source": "fritzbox", "box": "o", "kind": "Ended", "fields": {"call_id": "c",'
    b' "outcome": "missed", "duration": 0, "at": "2026-01-15T08:00:05+00:00",'
    b' "extension": null, "detail": {"reason": "exploded"}}}',
    b'{"source": "fritzbox", "box": "o", "kind": "Ended", "fields": {"call_id": "c",'
    b' "outcome": "missed", "duration": 0, "at": "2026-01-15T08:00:05+00:00",'
    b' "extension": null, "notes": 7}}',
])
def test_what_cannot_be_read_is_a_bad_record(payload: bytes) -> None:
    with pytest.raises(BadRecord):
        read_record(payload)
