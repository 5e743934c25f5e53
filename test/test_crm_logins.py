"""The CRM's logins (``dpvoip.crm_logins``), against crm-schema.md "How a CRM user is recognised".

* Known answers made by real Django 5.2.19 and djangorestframework-simplejwt 5.5.1 (the
  generator script is at the end of this docstring): sessions in both branches of
  ``signing.dumps(compress=True)``, ``get_session_auth_hash`` before and after a password
  change, access and refresh tokens signed with JWT_SIGNING_KEY or SECRET_KEY.
* A builder written from the algorithm, checked against those vectors byte for byte, then
  used for what Django does not write on request: tampered, truncated, foreign, oversized
  and zlib-bomb sessions, and hand-forged JWT headers (none, HS512, RS256).
* Properties (hypothesis): arbitrary text as session data or token raises nothing but
  LoginRefused; any signed JSON is read as a model of Django's login says.

Generator (run in a throwaway venv: ``pip install django djangorestframework
djangorestframework-simplejwt``; ``python gen.py`` then ``python gen.py jwt-key``, two
processes because simplejwt builds its token backend at import time)::

    import datetime as dt
    import sys

    import django
    from django.conf import settings

    SECRET_KEY = "django-insecure-dpvoip-test-secret-0123456789abcdefghijklmnop"
    JWT_KEY = "jwt-signing-key-for-dpvoip-tests-9876543210"
    WITH_JWT_KEY = sys.argv[1:] == ["jwt-key"]
    settings.configure(
        SECRET_KEY=SECRET_KEY,
        INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes",
                        "django.contrib.sessions", "rest_framework",
                        "rest_framework_simplejwt"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        USE_TZ=True,
        SIMPLE_JWT={"SIGNING_KEY": JWT_KEY} if WITH_JWT_KEY else {},
    )
    django.setup()

    from django.contrib.auth.hashers import make_password
    from django.contrib.auth.models import User
    from django.contrib.sessions.backends.db import SessionStore
    from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

    PASSWORD = make_password("correct horse battery staple", salt="dpvoipsalt0123",
                             hasher="pbkdf2_sha256")
    NEW_PASSWORD = make_password("Tr0ub4dor&3", salt="dpvoipsalt4567",
                                 hasher="pbkdf2_sha256")
    user = User(id=7, username="anna", password=PASSWORD)
    ISSUED = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)

    def frozen(token, lifetime):
        token.set_iat(at_time=ISSUED)
        token.set_exp(from_time=ISSUED, lifetime=lifetime)
        return str(token)

    if WITH_JWT_KEY:
        print("ACCESS_JWT_KEY =", repr(frozen(AccessToken.for_user(user),
                                              dt.timedelta(minutes=5))))
        print("REFRESH_JWT_KEY =", repr(frozen(RefreshToken.for_user(user),
                                               dt.timedelta(days=1))))
        sys.exit()
    print("ISSUED =", int(ISSUED.timestamp()))
    print("ACCESS_SECRET_KEY =", repr(frozen(AccessToken.for_user(user),
                                             dt.timedelta(minutes=5))))
    print("PASSWORD =", repr(PASSWORD))
    print("NEW_PASSWORD =", repr(NEW_PASSWORD))
    auth_hash = user.get_session_auth_hash()
    print("AUTH_HASH =", repr(auth_hash))
    print("NEW_AUTH_HASH =", repr(User(id=7, password=NEW_PASSWORD).get_session_auth_hash()))
    login = {"_auth_user_id": "7",
             "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
             "_auth_user_hash": auth_hash}
    print("SESSION_LOGIN =", repr(SessionStore().encode(login)))
    print("SESSION_LONG =", repr(SessionStore().encode(
        dict(login, _auth_user_id="42", django_language="de",
             recent_searches=["Müller GmbH", "+49 30 1234567"] * 40))))
    print("SESSION_PLAIN =", repr(SessionStore().encode({"_auth_user_id": "5"})))
    print("SESSION_INT_ID =", repr(SessionStore().encode({"_auth_user_id": 9})))
    print("SESSION_ANONYMOUS =", repr(SessionStore().encode({"django_language": "de"})))
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import string
import tracemalloc
import zlib
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dpvoip.crm.logins import (
    MAX_SESSION_DATA,
    MAX_SESSION_JSON,
    TOKEN_PREFIX,
    LoginRefused,
    SessionLogin,
    api_token_hash,
    bearer_token,
    looks_like_api_token,
    new_api_token,
    read_jwt,
    read_session,
    session_auth_hash,
    session_hash_matches,
)

# --- Known answers (see the generator above) ----------------------------------------------

SECRET_KEY = "django-insecure-dpvoip-test-secret-0123456789abcdefghijklmnop"
JWT_KEY = "jwt-signing-key-for-dpvoip-tests-9876543210"
OTHER_KEY = "some-other-crm-instance-secret-key-abcdefghijklmnopqrstuvw"
PASSWORD = "pbkdf2_sha256$1000000$dpvoipsalt0123$yt2tg7Zb1TEL9okUcKrAvKVfpDattkwkRytOHrshNe0="
NEW_PASSWORD = "pbkdf2_sha256$1000000$dpvoipsalt4567$pjXheoFyiN9SnFDjerK2MiX3ychZNI9Rn/UmVXKClL4="
AUTH_HASH = "d5be6a6eaf0dc70b0ac9175caabbd17143cd642379c0ab347c27f2a82b655341"
NEW_AUTH_HASH = "875e711a991377950c3d767fb6024649de587b2ec7da282e1b8b1578774e8860"
BACKEND = "django.contrib.auth.backends.ModelBackend"

#: When SessionStore().encode() ran: base62 "1xVqJw", the middle field of every session.
SIGNED_AT = 1795525948
SESSION_LOGIN = (
    ".eJxVjDsOwjAQBe_iGln-L6Gk5wzW7trBAWRLcVIh7o4spYD2zcx7i4j7VuLe8xqXJC4CxOl3I-RnrgOkB9Z7k9zq"
    "ti4khyIP2uWtpfy6Hu7fQcFeRu0pBwwZZ5UYFCnkSYNnRKKkQTvLKThjYWKFZB2wgdng2VDw3jotPl8UyThG"
    ":1xVqJw:yvRRXWD10tAb2yYnIjonLgkVudMm7WvZ0ZEmrOF7L9I"
)
SESSION_LONG = (
    ".eJztzj1uwzAMBeCrGFpbGPpXnbFLuuQETSFQFB0ndWxAsqcid6-MZEgv0EkLh8ePD_xhHtZl8Gum5M-R7ZiW7PU5DIDf"
    "NG2beIHpNLc4T0s6h3Yj7WOb28McaXx_2D8FA-RhuzaBLFiCnkd0PHDATjiDACFE4YRWGK2WynXIISjtULpewpsM1hil"
    "RSm9P-DHMlc40VZKJU6ENC0-EyQcKLPdJzscV857HEdKzf4aPop60V2jeCOk0sa6ElRTTTXVVPPf5uv2Czrxru0"
    ":1xVqJw:4PsnLfvA271v7on5i7is4OMyDRvYaZmIya455yOcBfY"
)
SESSION_PLAIN = "eyJfYXV0aF91c2VyX2lkIjoiNSJ9:1xVqJw:Ec8Fn_yl58xpfVZdRAtS0D5z7tOrR7JGHftA0P-lIq8"
SESSION_INT_ID = "eyJfYXV0aF91c2VyX2lkIjo5fQ:1xVqJw:128GpqUTlF407V6mMNCfMeas8jvZyFlbvmsA6bzxTVM"
SESSION_ANONYMOUS = (
    "eyJkamFuZ29fbGFuZ3VhZ2UiOiJkZSJ9:1xVqJw:cMyCNs-tj1BhfNk7THPmB6C3kA4oAouOG7U9x6bCvCM"
)
LOGIN: dict[str, object] = {
    "_auth_user_id": "7",
    "_auth_user_backend": BACKEND,
    "_auth_user_hash": AUTH_HASH,
}
LONG_LOGIN: dict[str, object] = dict(
    LOGIN,
    _auth_user_id="42",
    django_language="de",
    recent_searches=["Müller GmbH", "+49 30 1234567"] * 40,
)

#: simplejwt tokens for user 7 issued at 2024-05-01T12:00:00Z: access lives 5 minutes
#: (exp ISSUED + 300), refresh a day.
ISSUED = 1714564800
ACCESS_EXP = ISSUED + 300
NOW = ISSUED + 60
ACCESS_JWT_KEY = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ0b2tlbl90eXBlIjoiYWNjZXNzIiwiZXhwIjoxNzE0NTY1MTAwLCJp"
    "YXQiOjE3MTQ1NjQ4MDAsImp0aSI6ImFmZjE2ZjMwMmEwNjRiZmJiYjM2ZjFmNjE0NWRjZTg3IiwidXNlcl9pZCI6IjcifQ"
    ".cHgvtnUx5ndq8zu9qSKQCVLYeq3JFKdc87CVLATe66g"
)
REFRESH_JWT_KEY = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCIsImV4cCI6MTcxNDY1MTIwMCwi"
    "aWF0IjoxNzE0NTY0ODAwLCJqdGkiOiI3ZjdlODQ5ZTE2N2E0ZGU2YWJlNDQ1YTE1NmZiZGVjYyIsInVzZXJfaWQiOiI3In0"
    ".ujTKqKXNS52RJqs00IhFjyu7lQFUVOvRLgL_LR7AK4o"
)
ACCESS_SECRET_KEY = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ0b2tlbl90eXBlIjoiYWNjZXNzIiwiZXhwIjoxNzE0NTY1MTAwLCJp"
    "YXQiOjE3MTQ1NjQ4MDAsImp0aSI6IjJkZWYzMGRjNzg5NDRiYzE5MWZhMWNiYjBmMTkwZjVmIiwidXNlcl9pZCI6IjcifQ"
    ".tLlJHcqC542tsAOFCfofLISbuZIJeT47NhqLJ7BzHZg"
)
CRM_KEYS = (JWT_KEY, SECRET_KEY)  # a CRM with JWT_SIGNING_KEY: that first, then SECRET_KEY
PLAIN_CRM_KEYS = ("", SECRET_KEY)  # a CRM without one: the caller passes ""

# --- Builders, from the algorithm (not from the module under test) ------------------------

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b62(number: int) -> str:
    digits = ""
    while True:
        number, digit = divmod(number, 62)
        digits = BASE62[digit] + digits
        if not number:
            return digits


def sign(value: str, secret: str) -> str:
    """``value:signature`` as Django's Signer with the session salt."""
    key = hashlib.sha256(b"django.contrib.sessions.SessionStore" + b"signer" + secret.encode())
    mac = hmac.new(key.digest(), value.encode(), hashlib.sha256).digest()
    return f"{value}:{b64(mac)}"


def signed_payload(payload: str, secret: str = SECRET_KEY, timestamp: int = SIGNED_AT) -> str:
    return sign(f"{payload}:{b62(timestamp)}", secret)


def session(
    data: object, secret: str = SECRET_KEY, *, compress: bool = True, timestamp: int = SIGNED_AT
) -> str:
    """``signing.dumps(data, salt=..., compress=compress)``: compressed only when shorter."""
    raw = json.dumps(data, separators=(",", ":")).encode("latin-1")
    if compress:
        packed = zlib.compress(raw)
        if len(packed) < len(raw) - 1:
            return signed_payload("." + b64(packed), secret, timestamp)
    return signed_payload(b64(raw), secret, timestamp)


def forge_jwt(
    claims: Mapping[str, object] | str,
    key: str,
    header: Mapping[str, object] | None = None,
    digest: Any = hashlib.sha256,
) -> str:
    """A JWT with exactly this header, signed by HMAC with ``digest`` (the header's alg is
    not looked at, so lies about it can be told)."""
    head = b64(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = claims if isinstance(claims, str) else json.dumps(claims)
    signing_input = f"{head}.{b64(body.encode())}"
    mac = hmac.new(key.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(mac)}"


def access_claims(**changes: object) -> dict[str, object]:
    claims: dict[str, object] = {
        "token_type": "access",
        "exp": ACCESS_EXP,
        "iat": ISSUED,
        "jti": "0123456789abcdef0123456789abcdef",
        "user_id": "7",
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


def refused(match: str) -> Any:
    return pytest.raises(LoginRefused, match=match)


# --- Sessions ------------------------------------------------------------------------------


class TestBuilderIsDjango:
    """The builder rebuilds Django's output byte for byte, so what it makes below is what
    the CRM would write."""

    # Django compresses only when that is shorter: the logins came out compressed (a
    # leading "."), the short ones plain, so both of read_session's branches have vectors.
    @pytest.mark.parametrize(
        ("data", "expected"),
        [
            (LOGIN, SESSION_LOGIN),
            (LONG_LOGIN, SESSION_LONG),
            ({"_auth_user_id": "5"}, SESSION_PLAIN),
            ({"_auth_user_id": 9}, SESSION_INT_ID),
            ({"django_language": "de"}, SESSION_ANONYMOUS),
        ],
        ids=["compressed", "compressed-long", "plain", "plain-int-id", "plain-anonymous"],
    )
    def test_rebuilds(self, data: object, expected: str) -> None:
        assert session(data) == expected


class TestReadSession:
    def test_django_login_compressed(self) -> None:
        assert read_session(SESSION_LOGIN, SECRET_KEY) == SessionLogin(7, AUTH_HASH)

    def test_django_long_session(self) -> None:
        assert read_session(SESSION_LONG, SECRET_KEY) == SessionLogin(42, AUTH_HASH)

    def test_django_uncompressed_without_hash(self) -> None:
        assert read_session(SESSION_PLAIN, SECRET_KEY) == SessionLogin(5, "")

    def test_django_int_user_id(self) -> None:
        assert read_session(SESSION_INT_ID, SECRET_KEY) == SessionLogin(9, "")

    def test_anonymous_session_has_no_user(self) -> None:
        with refused("no logged-in user"):
            read_session(SESSION_ANONYMOUS, SECRET_KEY)

    def test_other_secret(self) -> None:
        with refused("bad session signature"):
            read_session(SESSION_LOGIN, OTHER_KEY)

    def test_no_secret(self) -> None:
        with refused("no SECRET_KEY"):
            read_session(SESSION_LOGIN, "")

    @pytest.mark.parametrize("position", [0, 1, 10, 60, 150])
    def test_tampered_payload(self, position: int) -> None:
        original = SESSION_LOGIN[position]
        assert original != ":"
        tampered = SESSION_LOGIN[:position] + ("A" if original != "A" else "B")
        tampered += SESSION_LOGIN[position + 1 :]
        with refused("bad session signature"):
            read_session(tampered, SECRET_KEY)

    def test_user_id_swapped_in_payload(self) -> None:
        _, _, rest = SESSION_PLAIN.partition(":")
        with refused("bad session signature"):
            read_session(b64(b'{"_auth_user_id":"1"}') + ":" + rest, SECRET_KEY)

    def test_tampered_timestamp(self) -> None:
        with refused("bad session signature"):
            read_session(SESSION_PLAIN.replace(":1xVqJw:", ":1xVqJx:"), SECRET_KEY)

    def test_tampered_signature(self) -> None:
        last = SESSION_LOGIN[-1]
        tampered = SESSION_LOGIN[:-1] + ("A" if last != "A" else "B")
        with refused("bad session signature"):
            read_session(tampered, SECRET_KEY)

    def test_padded_signature(self) -> None:
        with refused("bad session signature"):
            read_session(SESSION_LOGIN + "=", SECRET_KEY)

    def test_dropped_compression_mark(self) -> None:
        with refused("bad session signature"):
            read_session(SESSION_LOGIN[1:], SECRET_KEY)

    @pytest.mark.parametrize("length", [0, 1, 20, 150, 160, 170, len(SESSION_LOGIN) - 1])
    def test_truncated(self, length: int) -> None:
        with pytest.raises(LoginRefused):
            read_session(SESSION_LOGIN[:length], SECRET_KEY)

    def test_not_signed(self) -> None:
        with refused("not signed"):
            read_session("eyJfYXV0aF91c2VyX2lkIjoiNSJ9", SECRET_KEY)

    def test_no_timestamp(self) -> None:
        with refused("no timestamp"):
            read_session(sign(b64(b'{"_auth_user_id":"5"}'), SECRET_KEY), SECRET_KEY)

    @pytest.mark.parametrize("timestamp", ["", "-1", "1xVq.Jw", "1xVq_Jw"])
    def test_bad_timestamp(self, timestamp: str) -> None:
        data = sign(b64(b'{"_auth_user_id":"5"}') + ":" + timestamp, SECRET_KEY)
        with refused("no timestamp"):
            read_session(data, SECRET_KEY)

    def test_no_user_id(self) -> None:
        data = {"_auth_user_backend": BACKEND, "_auth_user_hash": AUTH_HASH}
        with refused("no logged-in user"):
            read_session(session(data), SECRET_KEY)

    def test_non_json(self) -> None:
        with refused("not JSON"):
            read_session(signed_payload(b64(b"not json at all")), SECRET_KEY)

    def test_compressed_non_json(self) -> None:
        with refused("not JSON"):
            read_session(signed_payload("." + b64(zlib.compress(b"x" * 100))), SECRET_KEY)

    def test_json_not_an_object(self) -> None:
        with refused("not a JSON object"):
            read_session(session(["_auth_user_id", "7"]), SECRET_KEY)

    def test_deeply_nested_json(self) -> None:
        with refused("not JSON"):
            read_session(signed_payload("." + b64(zlib.compress(b"[" * 200_000))), SECRET_KEY)

    @pytest.mark.parametrize("payload", ["eyJ!YXV0aF91c2VyX2lkIjoiNSJ9", "eyJfY", ".eyJ+", "a=="])
    def test_not_base64(self, payload: str) -> None:
        with refused("not base64"):
            read_session(signed_payload(payload), SECRET_KEY)

    def test_corrupt_zlib(self) -> None:
        with refused("does not decompress"):
            read_session(signed_payload("." + b64(b"definitely not zlib")), SECRET_KEY)

    def test_truncated_zlib_stream(self) -> None:
        packed = zlib.compress(json.dumps(LONG_LOGIN).encode())
        with refused("does not decompress"):
            read_session(signed_payload("." + b64(packed[:-10])), SECRET_KEY)

    def test_zlib_bomb(self) -> None:
        bomb = b'{"_auth_user_id":"7","pad":"' + b"a" * (8 * MAX_SESSION_JSON) + b'"}'
        data = signed_payload("." + b64(zlib.compress(bomb, 9)))
        assert len(data) < MAX_SESSION_DATA  # small on the wire: only the inflate limit stops it
        with refused("more than 1 MiB"):
            read_session(data, SECRET_KEY)

    def test_zlib_bomb_is_not_inflated(self) -> None:
        """Refused before it is inflated, not after: memory stays near the 1 MiB limit."""
        bomb = b'{"_auth_user_id":"7","pad":"' + b"a" * (40 * MAX_SESSION_JSON) + b'"}'
        data = signed_payload("." + b64(zlib.compress(bomb, 9)))
        assert len(data) < MAX_SESSION_DATA
        del bomb
        tracemalloc.start()
        try:
            with refused("more than 1 MiB"):
                read_session(data, SECRET_KEY)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 * MAX_SESSION_JSON

    def test_decompressed_limit_is_exact(self) -> None:
        def of_size(size: int) -> str:
            head = b'{"_auth_user_id":"7","pad":"'
            raw = head + b"a" * (size - len(head) - 2) + b'"}'
            assert len(raw) == size
            return signed_payload("." + b64(zlib.compress(raw)))

        assert read_session(of_size(MAX_SESSION_JSON), SECRET_KEY) == SessionLogin(7, "")
        with refused("more than 1 MiB"):
            read_session(of_size(MAX_SESSION_JSON + 1), SECRET_KEY)

    def test_session_data_limit_is_exact(self) -> None:
        def padded(length: int) -> str:
            return session({"_auth_user_id": "7", "pad": "a" * length}, compress=False)

        # Base64 grows by 1 or 2 characters a byte: find the longest pad that still fits.
        pad = (MAX_SESSION_DATA - len(padded(0))) * 3 // 4 + 2
        assert len(padded(pad)) > MAX_SESSION_DATA
        while len(padded(pad)) > MAX_SESSION_DATA:
            pad -= 1
        assert MAX_SESSION_DATA - 2 <= len(padded(pad)) <= MAX_SESSION_DATA
        assert read_session(padded(pad), SECRET_KEY) == SessionLogin(7, "")
        assert len(padded(pad + 1)) > MAX_SESSION_DATA
        with refused("larger than 64 KiB"):
            read_session(padded(pad + 1), SECRET_KEY)

    def test_non_ascii(self) -> None:
        with refused("not ASCII"):
            read_session(SESSION_LOGIN.replace("e", "é", 1), SECRET_KEY)

    @pytest.mark.parametrize(
        ("user_id", "expected"),
        [("7", 7), (7, 7), ("007", 7), ("0", 0), (0, 0), ("9223372036854775807", 2**63 - 1)],
    )
    def test_user_id_accepted(self, user_id: object, expected: int) -> None:
        assert read_session(session({"_auth_user_id": user_id}), SECRET_KEY).user_id == expected

    @pytest.mark.parametrize(
        "user_id",
        [
            "",
            "-1",
            -1,
            "+7",
            " 7",
            "7 ",
            "7a",
            "0x7",
            "٣",
            "7.0",
            7.0,
            True,
            None,
            [7],
            {"id": 7},
            2**63,
            "9223372036854775808",
        ],
    )
    def test_user_id_refused(self, user_id: object) -> None:
        with refused("no valid user id"):
            read_session(session({"_auth_user_id": user_id}), SECRET_KEY)

    @pytest.mark.parametrize("auth_hash", [None, 1, ["x"], {"a": "b"}])
    def test_auth_hash_not_a_string_is_empty(self, auth_hash: object) -> None:
        data = {"_auth_user_id": "7", "_auth_user_hash": auth_hash}
        assert read_session(session(data), SECRET_KEY) == SessionLogin(7, "")

    def test_timestamp_not_checked(self) -> None:
        """expire_date of the row decides, as in Django: a session signed long ago reads."""
        assert read_session(session(LOGIN, timestamp=0), SECRET_KEY) == SessionLogin(7, AUTH_HASH)

    def test_message_never_echoes_credential(self) -> None:
        for data, secret in [(SESSION_LOGIN, OTHER_KEY), (SESSION_LOGIN[:-3], SECRET_KEY)]:
            with pytest.raises(LoginRefused) as info:
                read_session(data, secret)
            message = str(info.value)
            assert SESSION_LOGIN[-20:-3] not in message
            assert OTHER_KEY not in message and SECRET_KEY not in message


# --- Session auth hash ---------------------------------------------------------------------


class TestSessionAuthHash:
    def test_django_known_answers(self) -> None:
        assert session_auth_hash(SECRET_KEY, PASSWORD) == AUTH_HASH
        assert session_auth_hash(SECRET_KEY, NEW_PASSWORD) == NEW_AUTH_HASH

    def test_independent_recomputation(self) -> None:
        salt = b"django.contrib.auth.models.AbstractBaseUser.get_session_auth_hash"
        key = hashlib.sha256(salt + OTHER_KEY.encode()).digest()
        expected = hmac.new(key, PASSWORD.encode(), hashlib.sha256).hexdigest()
        assert session_auth_hash(OTHER_KEY, PASSWORD) == expected
        assert expected != AUTH_HASH

    def test_matches(self) -> None:
        assert session_hash_matches(SECRET_KEY, PASSWORD, AUTH_HASH) is True

    def test_password_changed(self) -> None:
        assert session_hash_matches(SECRET_KEY, NEW_PASSWORD, AUTH_HASH) is False
        assert session_hash_matches(SECRET_KEY, NEW_PASSWORD, NEW_AUTH_HASH) is True

    @pytest.mark.parametrize(
        "given", ["", AUTH_HASH.upper(), AUTH_HASH[:-1], AUTH_HASH + "0", " " + AUTH_HASH, "\udcff"]
    )
    def test_mismatch(self, given: str) -> None:
        assert session_hash_matches(SECRET_KEY, PASSWORD, given) is False

    def test_other_secret(self) -> None:
        assert session_hash_matches(OTHER_KEY, PASSWORD, AUTH_HASH) is False

    def test_empty_password_still_needs_a_hash(self) -> None:
        assert session_hash_matches(SECRET_KEY, "", "") is False
        assert session_hash_matches(SECRET_KEY, "", session_auth_hash(SECRET_KEY, "")) is True

    def test_session_then_password(self) -> None:
        """The whole check dpvoip makes for a ``sessionid`` cookie."""
        login = read_session(SESSION_LOGIN, SECRET_KEY)
        assert session_hash_matches(SECRET_KEY, PASSWORD, login.auth_hash) is True
        assert session_hash_matches(SECRET_KEY, NEW_PASSWORD, login.auth_hash) is False
        plain = read_session(SESSION_PLAIN, SECRET_KEY)
        assert session_hash_matches(SECRET_KEY, PASSWORD, plain.auth_hash) is False


# --- JWT -----------------------------------------------------------------------------------


class TestReadJwt:
    def test_simplejwt_with_jwt_signing_key(self) -> None:
        assert read_jwt(ACCESS_JWT_KEY, CRM_KEYS, NOW) == 7

    def test_simplejwt_with_secret_key(self) -> None:
        assert read_jwt(ACCESS_SECRET_KEY, CRM_KEYS, NOW) == 7
        assert read_jwt(ACCESS_SECRET_KEY, PLAIN_CRM_KEYS, NOW) == 7
        assert read_jwt(ACCESS_SECRET_KEY, [SECRET_KEY], NOW) == 7

    def test_jwt_key_token_needs_the_jwt_key(self) -> None:
        with refused("bad token signature"):
            read_jwt(ACCESS_JWT_KEY, PLAIN_CRM_KEYS, NOW)

    def test_foreign_key(self) -> None:
        with refused("bad token signature"):
            read_jwt(ACCESS_JWT_KEY, [OTHER_KEY], NOW)
        with refused("bad token signature"):
            read_jwt(forge_jwt(access_claims(), OTHER_KEY), CRM_KEYS, NOW)

    def test_no_key(self) -> None:
        with refused("no signing key"):
            read_jwt(ACCESS_JWT_KEY, ["", ""], NOW)
        with refused("no signing key"):
            read_jwt(ACCESS_JWT_KEY, [], NOW)

    def test_one_key_as_str_is_a_programming_error(self) -> None:
        with pytest.raises(TypeError):
            read_jwt(ACCESS_SECRET_KEY, SECRET_KEY, NOW)

    def test_refresh_token_refused(self) -> None:
        refresh_now = ISSUED + 3600  # the access token is dead, the refresh token is not
        with refused("not an access token"):
            read_jwt(REFRESH_JWT_KEY, CRM_KEYS, refresh_now)
        with refused("expired"):
            read_jwt(ACCESS_JWT_KEY, CRM_KEYS, refresh_now)

    @pytest.mark.parametrize("token_type", ["refresh", "sliding", "untyped", "Access", None, 1])
    def test_token_type(self, token_type: object) -> None:
        token = forge_jwt(access_claims(token_type=token_type), SECRET_KEY)
        with refused("not an access token"):
            read_jwt(token, CRM_KEYS, NOW)

    def test_expiry_boundary(self) -> None:
        assert read_jwt(ACCESS_JWT_KEY, CRM_KEYS, ACCESS_EXP - 0.001) == 7
        with refused("expired"):
            read_jwt(ACCESS_JWT_KEY, CRM_KEYS, ACCESS_EXP)
        with refused("expired"):
            read_jwt(ACCESS_JWT_KEY, CRM_KEYS, ACCESS_EXP + 86400 * 365)

    def test_leeway(self) -> None:
        assert read_jwt(ACCESS_JWT_KEY, CRM_KEYS, ACCESS_EXP + 5, leeway=10) == 7
        with refused("expired"):
            read_jwt(ACCESS_JWT_KEY, CRM_KEYS, ACCESS_EXP + 5, leeway=5)

    def test_time_is_the_callers(self) -> None:
        """Issued in 2024, five minutes of life: only the ``now`` passed in can accept it."""
        far_future = forge_jwt(access_claims(exp=4_102_444_800), SECRET_KEY)  # 2100
        assert read_jwt(far_future, CRM_KEYS, 4_102_444_799) == 7
        with refused("expired"):
            read_jwt(far_future, CRM_KEYS, 4_102_444_800)

    @pytest.mark.parametrize("exp", [None, "1714565100", True, [ACCESS_EXP]])
    def test_exp_required_and_numeric(self, exp: object) -> None:
        with refused("no (valid )?expiry"):
            read_jwt(forge_jwt(access_claims(exp=exp), SECRET_KEY), CRM_KEYS, NOW)

    @pytest.mark.parametrize("exp", ["NaN", "Infinity", "1" + "0" * 400])
    def test_exp_not_a_finite_number(self, exp: str) -> None:
        body = json.dumps(access_claims(exp=0)).replace('"exp": 0', f'"exp": {exp}')
        assert exp in body
        with refused("no valid expiry"):
            read_jwt(forge_jwt(body, SECRET_KEY), CRM_KEYS, NOW)

    def test_nbf_not_a_finite_number(self) -> None:
        body = json.dumps(access_claims(nbf=0)).replace('"nbf": 0', '"nbf": ' + "9" * 400)
        with refused("not yet valid"):
            read_jwt(forge_jwt(body, SECRET_KEY), CRM_KEYS, NOW)

    def test_float_exp(self) -> None:
        assert read_jwt(forge_jwt(access_claims(exp=NOW + 0.5), SECRET_KEY), CRM_KEYS, NOW) == 7

    def test_not_before(self) -> None:
        token = forge_jwt(access_claims(nbf=NOW + 30), SECRET_KEY)
        with refused("not yet valid"):
            read_jwt(token, CRM_KEYS, NOW)
        assert read_jwt(token, CRM_KEYS, NOW + 30) == 7
        assert read_jwt(token, CRM_KEYS, NOW, leeway=30) == 7

    def test_iat_in_the_future_is_not_judged_by_the_real_clock(self) -> None:
        token = forge_jwt(access_claims(iat=4_102_444_000, exp=4_102_444_800), SECRET_KEY)
        assert read_jwt(token, CRM_KEYS, 4_102_444_100) == 7

    @pytest.mark.parametrize(("user_id", "expected"), [("7", 7), (7, 7), ("12", 12), (0, 0)])
    def test_user_id(self, user_id: object, expected: int) -> None:
        token = forge_jwt(access_claims(user_id=user_id), SECRET_KEY)
        assert read_jwt(token, CRM_KEYS, NOW) == expected

    @pytest.mark.parametrize("user_id", ["", "abc", "-1", -1, "7.0", 7.5, True, [7], 2**63])
    def test_user_id_refused(self, user_id: object) -> None:
        token = forge_jwt(access_claims(user_id=user_id), SECRET_KEY)
        with refused("no valid user id"):
            read_jwt(token, CRM_KEYS, NOW)

    def test_no_user_id(self) -> None:
        token = forge_jwt(access_claims(user_id=None), SECRET_KEY)
        with refused("no user id"):
            read_jwt(token, CRM_KEYS, NOW)

    def test_pyjwt_encoded_token(self) -> None:
        token = jwt.encode(access_claims(user_id=31), JWT_KEY, algorithm="HS256")
        assert read_jwt(token, CRM_KEYS, NOW) == 31

    @pytest.mark.parametrize("alg", ["none", "None", "NONE"])
    def test_alg_none(self, alg: str) -> None:
        head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        token = f"{head}.{b64(json.dumps(access_claims()).encode())}."
        with refused("not HS256"):
            read_jwt(token, CRM_KEYS, NOW)

    def test_hs512_with_the_right_key(self) -> None:
        header = {"alg": "HS512", "typ": "JWT"}
        token = forge_jwt(access_claims(), SECRET_KEY, header=header, digest=hashlib.sha512)
        with refused("not HS256"):
            read_jwt(token, CRM_KEYS, NOW)

    @pytest.mark.parametrize("alg", ["RS256", "ES256", "HS384", "hs256", "HS256 ", None, 256])
    def test_other_alg_headers(self, alg: object) -> None:
        """Key confusion: an HS256 MAC under a header that claims something else."""
        token = forge_jwt(access_claims(), SECRET_KEY, header={"alg": alg, "typ": "JWT"})
        with refused("not HS256"):
            read_jwt(token, CRM_KEYS, NOW)

    def test_no_alg(self) -> None:
        token = forge_jwt(access_claims(), SECRET_KEY, header={"typ": "JWT"})
        with refused("not HS256"):
            read_jwt(token, CRM_KEYS, NOW)

    def test_hs512_mac_under_hs256_header(self) -> None:
        token = forge_jwt(access_claims(), SECRET_KEY, digest=hashlib.sha512)
        with refused("bad token signature"):
            read_jwt(token, CRM_KEYS, NOW)

    def test_tampered_claims(self) -> None:
        head, _, rest = ACCESS_JWT_KEY.partition(".")
        _, _, signature = rest.partition(".")
        claims = access_claims(user_id="1")
        token = f"{head}.{b64(json.dumps(claims).encode())}.{signature}"
        with refused("bad token signature"):
            read_jwt(token, CRM_KEYS, NOW)

    def test_audience_refused(self) -> None:
        token = forge_jwt(access_claims(aud="other-service"), SECRET_KEY)
        with refused("another audience"):
            read_jwt(token, CRM_KEYS, NOW)

    @pytest.mark.parametrize(
        "token",
        [
            "",
            "garbage",
            "a.b",
            "a.b.c",
            "a.b.c.d",
            "...",
            ACCESS_JWT_KEY + ".",
            ACCESS_JWT_KEY.replace(".", "..", 1),
            " " + ACCESS_JWT_KEY,
            ACCESS_JWT_KEY.replace("e", "é", 1),
            "Bearer " + ACCESS_JWT_KEY,
            b64(b"[]") + "." + b64(b"{}") + ".c2ln",
            b64(b'"HS256"') + "." + b64(b"{}") + ".c2ln",
            b64(b"[" * 5000) + "." + b64(b"{}") + ".c2ln",
            TOKEN_PREFIX + "x" * 43,
        ],
    )
    def test_garbage(self, token: str) -> None:
        with pytest.raises(LoginRefused):
            read_jwt(token, CRM_KEYS, NOW)

    def test_deeply_nested_claims(self) -> None:
        with refused("malformed"):
            read_jwt(forge_jwt("[" * 5000, SECRET_KEY), CRM_KEYS, NOW)

    def test_payload_not_an_object(self) -> None:
        with refused("malformed"):
            read_jwt(forge_jwt("[1, 2]", SECRET_KEY), CRM_KEYS, NOW)

    def test_too_long(self) -> None:
        token = forge_jwt(access_claims(pad="a" * 9000), SECRET_KEY)
        with refused("longer than 8 KiB"):
            read_jwt(token, CRM_KEYS, NOW)

    def test_message_never_echoes_credential(self) -> None:
        with pytest.raises(LoginRefused) as info:
            read_jwt(ACCESS_JWT_KEY, [OTHER_KEY], NOW)
        message = str(info.value)
        assert ACCESS_JWT_KEY.rpartition(".")[2] not in message
        assert OTHER_KEY not in message


# --- Bearer header and dpvoip's API tokens -----------------------------------------------


class TestBearer:
    @pytest.mark.parametrize(
        ("header", "expected"),
        [
            (b"Bearer abc.def.ghi", "abc.def.ghi"),
            (b"bearer abc.def.ghi", "abc.def.ghi"),
            (b"BEARER dpv_x-y_z", "dpv_x-y_z"),
            (b"BeArEr  tok==", "tok=="),
            (b"  Bearer tok  ", "tok"),
            (b"Bearer\ttok", "tok"),
            (b"Bearer a+b/c~d", "a+b/c~d"),
            (b"Bearer " + ACCESS_JWT_KEY.encode(), ACCESS_JWT_KEY),
        ],
    )
    def test_token(self, header: bytes, expected: str) -> None:
        assert bearer_token(header) == expected

    @pytest.mark.parametrize(
        "header",
        [
            None,
            b"",
            b"Bearer",
            b"Bearer ",
            b"Bearer  ",
            b"Bearertok",
            b"Bearer a b",
            b"Bearer a,b",
            b"Bearer =abc",
            b"Basic dXNlcjpwYXNz",
            b"Token abc",
            b"abc.def.ghi",
            b"Bearer t\xc3\xa9",
            b"Bearer tok\r\nX-Other: 1",
        ],
    )
    def test_not_a_bearer_token(self, header: bytes | None) -> None:
        assert bearer_token(header) is None


class TestApiTokens:
    def test_new_token(self) -> None:
        token, digest = new_api_token()
        assert token.startswith(TOKEN_PREFIX) and token.startswith("dpv_")
        assert len(token) == len("dpv_") + 43  # token_urlsafe(32): 32 bytes, unpadded base64
        assert digest == hashlib.sha256(token.encode()).hexdigest()
        assert digest == api_token_hash(token) == api_token_hash(token)
        assert looks_like_api_token(token) is True
        assert bearer_token(b"Bearer " + token.encode()) == token

    def test_tokens_differ(self) -> None:
        made = [new_api_token() for _ in range(50)]
        assert len({token for token, _ in made}) == 50
        assert len({digest for _, digest in made}) == 50

    def test_hash_known_answer(self) -> None:
        token = "dpv_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"
        expected = "6c1670a7597862348d53e88167065c21865538ac518e54286b143bd2224ff1df"
        assert api_token_hash(token) == expected
        assert api_token_hash(token + "H") != expected

    def test_hash_never_raises(self) -> None:
        assert len(api_token_hash("dpv_\udcff")) == 64

    @pytest.mark.parametrize(
        "token",
        [
            "",
            "dpv_",
            "dpv_" + "a" * 31,
            "dpv_" + "a" * 129,
            "DPV_" + "a" * 43,
            "xpv_" + "a" * 43,
            "dpv_" + "a" * 42 + "=",
            "dpv_" + "a" * 42 + ".",
            "dpv_" + "a" * 42 + "é",
            " dpv_" + "a" * 43,
            "dpv_" + "a" * 43 + "\n",
            ACCESS_JWT_KEY,
        ],
    )
    def test_not_api_tokens(self, token: str) -> None:
        assert looks_like_api_token(token) is False

    @pytest.mark.parametrize("token", ["dpv_" + "a" * 32, "dpv_" + "Z9_-" * 32, "dpv_" + "-" * 43])
    def test_api_token_shapes(self, token: str) -> None:
        assert looks_like_api_token(token) is True


# --- Properties ----------------------------------------------------------------------------

b64_text = st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=200)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.builds(lambda a, b, c: f"{a}:{b}:{c}", b64_text, b64_text, b64_text),
        st.builds(lambda a, b, c: f".{a}:{b}:{c}", b64_text, b64_text, b64_text),
    )
)
@example("")
@example(":")
@example("::")
@example(".:0:")
@example(SESSION_LOGIN[:-1])
def test_random_session_data_only_refused(data: str) -> None:
    with pytest.raises(LoginRefused):
        read_session(data, SECRET_KEY)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def expected_login(data: object) -> SessionLogin | None:
    """A model of Django's login session: a dict whose ``_auth_user_id`` is str(pk)."""
    if not isinstance(data, dict) or "_auth_user_id" not in data:
        return None
    user_id = data["_auth_user_id"]
    if isinstance(user_id, bool):
        return None
    if isinstance(user_id, str) and user_id.isascii() and user_id.isdigit() and len(user_id) < 20:
        user_id = int(user_id)
    if not isinstance(user_id, int) or not 0 <= user_id < 2**63:
        return None
    auth_hash = data.get("_auth_user_hash", "")
    return SessionLogin(user_id, auth_hash if isinstance(auth_hash, str) else "")


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"_auth_user_id": json_values | st.integers(0, 10**12).map(str)},
            optional={"_auth_user_hash": json_values, "other": json_values},
        ),
    ),
    st.booleans(),
)
def test_signed_json_read_as_django_would(data: object, compress: bool) -> None:
    signed = session(data, compress=compress)
    expected = expected_login(data)
    if expected is None:
        with pytest.raises(LoginRefused):
            read_session(signed, SECRET_KEY)
    else:
        assert read_session(signed, SECRET_KEY) == expected


jwt_shaped = st.builds(lambda a, b, c: f"{a}.{b}.{c}", b64_text, b64_text, b64_text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), jwt_shaped), st.floats(allow_nan=False))
@example("", NOW)
@example("..", NOW)
@example(ACCESS_JWT_KEY[:-1], NOW)
def test_random_token_only_refused(token: str, now: float) -> None:
    with pytest.raises(LoginRefused):
        read_jwt(token, CRM_KEYS, now)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100) | st.builds(lambda b: b"Bearer " + b, st.binary(max_size=60)))
def test_random_header_is_a_token_or_none(header: bytes) -> None:
    token = bearer_token(header)
    assert token is None or (token.encode() in header and " " not in token)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_api_token_helpers_total(token: str) -> None:
    assert len(api_token_hash(token)) == 64
    assert looks_like_api_token(token) is (
        token.startswith("dpv_")
        and 32 <= len(token) - 4 <= 128
        and all(ch in string.ascii_letters + string.digits + "-_" for ch in token[4:])
    )
