"""The zone call_start is read in, from what Zadarma states about the account."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from dpvoip.zadarma.account import account_zone

ATHENS = ZoneInfo("Europe/Athens")
WINTER = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)
SUMMER = datetime(2026, 7, 15, 10, 0, tzinfo=UTC)


def test_the_office_zone_is_used_when_its_offset_is_the_stated_one() -> None:
    # so that the change to summer time is followed without asking again
    assert account_zone("UTC+2", ATHENS, WINTER) is ATHENS
    assert account_zone("UTC+3", ATHENS, SUMMER) is ATHENS


def test_another_offset_is_used_as_a_fixed_offset() -> None:
    zone = account_zone("UTC+3", ATHENS, WINTER)
    assert zone == timezone(timedelta(hours=3))
    local = datetime(2026, 1, 15, 12, 0, tzinfo=zone)
    assert local.astimezone(UTC).hour == 9


@pytest.mark.parametrize(("stated", "hours", "minutes"), [
    ("UTC-5", -5, 0), ("GMT+1", 1, 0), ("UTC+5:30", 5, 30), ("utc+0545", 5, 45),
    ("UTC", 0, 0), ("UTC+0", 0, 0), ("UTC - 3", -3, 0),
])
def test_offsets_as_zadarma_writes_them(stated: str, hours: int, minutes: int) -> None:
    sign = -1 if hours < 0 else 1
    expected = timedelta(hours=hours, minutes=sign * minutes)
    zone = account_zone(stated, ATHENS, WINTER)
    assert zone is not None
    assert zone.utcoffset(WINTER) == expected


def test_an_iana_name_is_taken_as_it_is() -> None:
    assert account_zone("Europe/Berlin", ATHENS, WINTER) == ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize("stated", ["", "UTC+15", "UTC+2:75", "Mars/Olympus", "2", "UTC+a"])
def test_what_cannot_be_read_is_none(stated: str) -> None:
    assert account_zone(stated, ATHENS, WINTER) is None
