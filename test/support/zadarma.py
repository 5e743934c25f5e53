"""What the tests of dpvoip's Zadarma client and of the fake Zadarma API share: the
account's key and secret, the moment the fake's clock starts at, the API's paths, and the
signing vectors of zadarma.md 2.1 (made with key ``testkey``, secret ``testsecret``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

KEY, SECRET = "testkey", "testsecret"
#: 17 June 2025 07:28:29 UTC: summer, 10:28:29 in the account's zone (UTC+3, Athens).
T0 = datetime(2025, 6, 17, 7, 28, 29, tzinfo=UTC).timestamp()
CALLBACK, BALANCE, TIMEZONE = "/v1/request/callback/", "/v1/info/balance/", "/v1/info/timezone/"
RECORD, INTERNAL = "/v1/pbx/record/request/", "/v1/pbx/internal/"
SMS, STATISTICS = "/v1/sms/send/", "/v1/statistics/pbx/"
LOOPBACK = "tcp:0:interface=127.0.0.1"


class Vector(NamedTuple):
    """One request of zadarma.md 2.1: what is signed (the query of a GET, the body of a
    POST) exactly as sent, and the Authorization header Zadarma expects for it."""

    path: str
    verb: str
    signed: str
    authorization: str


VECTORS = (
    Vector(CALLBACK, "GET", "format=json&from=100&to=%2B442012345678",
           "testkey:ZGY5OTI5OTMwMWY2ODBhNDUxNWM3ZTlkNGVlZjE0MjhjNTA1MDBiNA=="),
    Vector(CALLBACK, "GET", "from=100&to=%2B442012345678",
           "testkey:ZmIwOGY1YzgwOGFjNTliYmI2OTNmMzJiZTdlZTk5ZTM3YzcyM2JjZQ=="),
    Vector(CALLBACK, "GET", "from=100&predicted=1&sip=100&to=442012345678",
           "testkey:NDE2OGZhYTFjYzY5OWJmNmQyMTliNzE3YTJhNDBhODk4NzUwM2ZhMA=="),
    Vector(BALANCE, "GET", "",
           "testkey:YWMyNjcxZTQ5ZGI0OGJmOWNiZWExY2UxZDdjNzU0MTYzN2UzNGM1YQ=="),
    Vector(STATISTICS, "GET",
           "end=2024-01-01+23%3A59%3A59&start=2024-01-01+00%3A00%3A00&version=2",
           "testkey:MDNhNGMzZmRhMzMzZjE5YTBjNjc2YWZhNDJiNDZiMmEyYzFjNjNlOA=="),
    Vector(SMS, "POST", "message=Hi+%7E+there&number=442012345678",
           "testkey:OTUyZmQ4MTA3M2Q1ZGY0NzE0ZTRmZGQzZTAwMGRhN2I1ZTcwOGI4MA=="),
)


def authorization(path: str, signed: str) -> str:
    """The vector's Authorization for ``path`` with ``signed``."""
    [found] = [v.authorization for v in VECTORS if (v.path, v.signed) == (path, signed)]
    return found
