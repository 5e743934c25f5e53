"""A spooled event comes back exactly as it went in."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dpvoip.core.happenings import Answered, Ended, Forwarded, Happening, Started, Unmatched
from dpvoip.core.outcomes import Outcome
from dpvoip.spool.records import BadRecord, fritz_record, read_record, zadarma_record

AT = datetime(2026, 1, 15, 8, 0, 5, tzinfo=UTC)
HAPPENINGS: list[Happening] = [
    Started("fb-office-20260115100005-1", "office", 1, "incoming", "6912345678",
            "2107654321", "SIP0", None, AT, hairpin=False),
    Answered("fb-office-20260115100005-1", 40, AT, transfer=True),
    Forwarded("fb-office-20260115100005-1", "6998765432", AT),
    Ended("fb-office-20260115100005-1", Outcome.VOICEMAIL, 12, AT, 40,
          "voicemail (answering machine 1)"),
    Unmatched("office", 3, AT, datetime(2026, 1, 15, 10, 0, 5), "DISCONNECT", None, 0),
]


@pytest.mark.parametrize("happening", HAPPENINGS, ids=lambda h: type(h).__name__)
def test_fritz_happenings_round_trip(happening: Happening) -> None:
    source, back, box = read_record(fritz_record(happening, "office"))
    assert (source, back, box) == ("fritzbox", happening, "office")


def test_a_zadarma_form_round_trips_with_any_text() -> None:
    form = {"event": "NOTIFY_START", "caller_id": "+30 691 \u00e9\u4e2d", "call_start": ""}
    assert read_record(zadarma_record(form)) == ("zadarma", form, None)


@pytest.mark.parametrize("payload", [
    b"", b"\xff", b"[]", b'{"source": "fax"}', b'{"source": "zadarma", "form": [1]}',
    b'{"source": "zadarma", "form": {"a": 1}}',
    b'{"source": "fritzbox", "box": "o", "kind": "Exploded", "fields": {}}',
    b'{"source": "fritzbox", "box": "o", "kind": "Answered", "fields": {"x": 1}}',
    b'{"source": "fritzbox", "box": "o", "kind": "Answered", "fields":'
    b' {"call_id": "c", "extension": 1, "at": "yesterday"}}',
])
def test_what_cannot_be_read_is_a_bad_record(payload: bytes) -> None:
    with pytest.raises(BadRecord):
        read_record(payload)
