"""The CRM's logins, recognised without Django (crm-schema.md, "How a CRM user is recognised").

Pure: no I/O, no database, no clock (the caller passes ``now``). Three credentials:

* a Django session: ``django_session.session_data`` for the ``sessionid`` cookie, signed
  by ``django.core.signing`` with the CRM's SECRET_KEY. The caller looks the row up (and
  checks ``expire_date``); this module checks the signature and reads the user id and the
  ``_auth_user_hash`` that Django uses to drop sessions after a password change (a
  session the CRM keeps in Redis instead is decoded by ``crm.redis_sessions``, and read
  by the same ``session_login``);
* a djangorestframework-simplejwt access token (the React frontend's ``Bearer`` JWT);
* dpvoip's own API tokens (``dpvoip token create``), of which only a hash is stored.

Every refusal is a ``LoginRefused`` whose message names the reason and never the
credential or the key, so callers may log it and show it as it is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import secrets
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt


class LoginRefused(Exception):
    """Why a credential is not accepted; the message is safe to show and log (never contains
    the secret, the token or the cookie)."""


@dataclass(frozen=True)
class SessionLogin:
    user_id: int
    auth_hash: str  # the session's _auth_user_hash ("" when absent)


#: ``SessionStore.key_salt`` of Django's database session backend: the signing salt.
SESSION_SALT = "django.contrib.sessions.SessionStore"
#: The ``key_salt`` of ``AbstractBaseUser.get_session_auth_hash``.
AUTH_HASH_SALT = "django.contrib.auth.models.AbstractBaseUser.get_session_auth_hash"
#: A real session is a few hundred bytes; anything near these limits is not the CRM's.
MAX_SESSION_DATA = 64 * 1024
MAX_SESSION_JSON = 1024 * 1024
#: A simplejwt access token is ~250 characters.
MAX_JWT = 8 * 1024
#: Django's AutoField/BigAutoField range: a larger "id" is no user of the CRM.
_MAX_USER_ID = 2**63 - 1

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B62 = re.compile(r"[0-9A-Za-z]+")
_DIGITS = re.compile(r"[0-9]{1,19}")
#: header.payload.signature; the signature may be empty so that "alg": "none" is refused
#: for what it is rather than as a malformed token.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def _salted_hmac(key_salt: str, value: str, secret: str) -> hmac.HMAC:
    """Django's ``salted_hmac(..., algorithm="sha256")``: the key is SHA-256 of salt + secret
    (always hashed, even when short), so a key derived for one purpose never signs for
    another."""
    key = hashlib.sha256(key_salt.encode() + secret.encode()).digest()
    return hmac.new(key, value.encode(), hashlib.sha256)


def _b64_decode(text: str) -> bytes:
    """Django's ``b64_decode`` (urlsafe, padding restored), but strict about the alphabet:
    Python's decoder silently skips stray characters, and Django never writes any."""
    if not _B64URL.fullmatch(text):
        raise LoginRefused("session data is not base64")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise LoginRefused("session data is not base64") from e


def _inflate(data: bytes) -> bytes:
    """zlib-decompress at most MAX_SESSION_JSON bytes. The signature already proves the CRM
    wrote this, but a leaked SECRET_KEY must not turn into a memory bomb too."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_SESSION_JSON + 1)
    except zlib.error as e:
        raise LoginRefused("session data does not decompress") from e
    if len(out) > MAX_SESSION_JSON or inflater.unconsumed_tail:
        raise LoginRefused("session data decompresses to more than 1 MiB")
    if not inflater.eof:
        raise LoginRefused("session data does not decompress")
    return out


def _user_id(value: object, what: str) -> int:
    """A user id as Django writes it (``str(pk)``) or as an int; nothing looser (no sign,
    no spaces, no other digits than 0-9, no bool)."""
    if isinstance(value, bool):
        raise LoginRefused(f"{what} has no valid user id")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
    else:
        raise LoginRefused(f"{what} has no valid user id")
    if not 0 <= number <= _MAX_USER_ID:
        raise LoginRefused(f"{what} has no valid user id")
    return number


def read_session(session_data: str, secret_key: str) -> SessionLogin:
    """Decode django_session.session_data signed by Django's signing.dumps(data,
    salt='django.contrib.sessions.SessionStore', compress=True) with the JSON serializer.

    Checks the signature (constant time), decompresses (payload starting with '.'), parses
    JSON, reads _auth_user_id (a string of digits in Django; accept int too). Raises
    LoginRefused for a bad signature, bad format, no user id. Tolerates bounded sizes only:
    refuse session_data over 64 KiB and a decompressed payload over 1 MiB (zlib bomb).

    The signed timestamp is not checked: ``expire_date`` of the row is what Django trusts
    (it never passes ``max_age`` for sessions), and the caller checks that.
    """
    if not secret_key:
        raise LoginRefused("no SECRET_KEY configured")
    if len(session_data) > MAX_SESSION_DATA:
        raise LoginRefused("session data is larger than 64 KiB")
    if not session_data.isascii():
        raise LoginRefused("session data is not ASCII")
    signed, sep, signature = session_data.rpartition(":")
    if not sep:
        raise LoginRefused("session data is not signed")
    try:
        digest = _salted_hmac(SESSION_SALT + "signer", signed, secret_key).digest()
    except UnicodeEncodeError as e:
        raise LoginRefused("SECRET_KEY is not valid text") from e
    expected = base64.urlsafe_b64encode(digest).rstrip(b"=")
    if not hmac.compare_digest(expected, signature.encode("ascii")):
        raise LoginRefused("bad session signature")

    payload, sep, timestamp = signed.rpartition(":")
    if not sep or not _B62.fullmatch(timestamp):
        raise LoginRefused("session data has no timestamp")
    compressed = payload.startswith(".")
    data = _b64_decode(payload[1:] if compressed else payload)
    if compressed:
        data = _inflate(data)
    try:
        # Django's JSONSerializer decodes latin-1 (its JSON is ASCII, ensure_ascii=True).
        session: object = json.loads(data.decode("latin-1"))
    except (ValueError, RecursionError) as e:
        raise LoginRefused("session data is not JSON") from e
    if not isinstance(session, dict):
        raise LoginRefused("session data is not a JSON object")
    return session_login(session)


def session_login(session: dict[Any, Any]) -> SessionLogin:
    """The login held by a decoded Django session (whichever backend kept it): the user id
    of ``_auth_user_id`` (a string of digits in Django; an int is accepted too) and the
    ``_auth_user_hash`` ("" when absent or not a string, which no password matches)."""
    if "_auth_user_id" not in session:
        raise LoginRefused("session has no logged-in user")
    user_id = _user_id(session["_auth_user_id"], "session")
    auth_hash = session.get("_auth_user_hash", "")
    return SessionLogin(user_id, auth_hash if isinstance(auth_hash, str) else "")


def session_auth_hash(secret_key: str, password_hash: str) -> str:
    """Django's get_session_auth_hash: hex HMAC-SHA256, key = SHA256(b'django.contrib.auth.
    models.AbstractBaseUser.get_session_auth_hash' + SECRET_KEY), message =
    auth_user.password. It changes with the password, which is how Django ends every
    session of a user whose password changed."""
    return _salted_hmac(AUTH_HASH_SALT, password_hash, secret_key).hexdigest()


def session_hash_matches(secret_key: str, password_hash: str, given: str) -> bool:
    """Whether a session's ``_auth_user_hash`` still matches the user's password. Constant
    time; False when given is empty (Django, too, refuses a session without the hash)."""
    if not given:
        return False
    try:
        expected = session_auth_hash(secret_key, password_hash)
    except UnicodeEncodeError:  # lone surrogates: no password Django could have stored
        return False
    return hmac.compare_digest(expected.encode("ascii"), given.encode("utf-8", "surrogatepass"))


def _jwt_header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError) as e:
        raise LoginRefused("malformed token") from e
    return header


def _number(value: object) -> float | None:
    """A JSON number as a finite float; None for anything else (bool, NaN, Infinity, or an
    integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def read_jwt(token: str, keys: Sequence[str], now: float, leeway: float = 0.0) -> int:
    """The user id of a CRM access token (djangorestframework-simplejwt).

    HS256 ONLY (alg none/RS256/HS512 refused: the algorithm is never taken from the token),
    signed by one of keys (empty keys skipped; JWT_SIGNING_KEY first then SECRET_KEY, the
    caller orders them), exp required and > now - leeway (simplejwt's own rule), nbf if
    present <= now + leeway, token_type must be 'access' (a refresh token is refused: it
    lives a day and is meant for /token/refresh/ only), user_id claim int or digit string.

    PyJWT checks the shape and the signature; its clock-based checks are switched off and
    done here against ``now`` so that time is the caller's. A token with an ``aud`` claim
    is refused (PyJWT's default without an expected audience): the CRM's tokens carry
    none (crm-schema.md lists ``user_id``, ``token_type`` and ``exp``).
    """
    if isinstance(keys, str):  # a str is a Sequence[str] too: its letters are no keys
        raise TypeError("keys must be a sequence of keys, not one key")
    if len(token) > MAX_JWT:
        raise LoginRefused("token is longer than 8 KiB")
    if not token.isascii() or not _JWT_SHAPE.fullmatch(token):
        raise LoginRefused("malformed token")
    header = _jwt_header(token)
    if header.get("alg") != "HS256":
        raise LoginRefused("token algorithm is not HS256")
    usable = [key for key in keys if key]
    if not usable:
        raise LoginRefused("no signing key configured")
    claims: dict[str, Any] | None = None
    for key in usable:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["HS256"],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["exp"],
                },
            )
        except jwt.InvalidSignatureError:
            continue
        except jwt.MissingRequiredClaimError as e:
            raise LoginRefused("token has no expiry") from e
        except jwt.InvalidAudienceError as e:
            raise LoginRefused("token is for another audience") from e
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError) as e:
            raise LoginRefused("malformed token") from e
        break
    if claims is None:
        raise LoginRefused("bad token signature")

    exp = _number(claims.get("exp"))
    if exp is None:
        raise LoginRefused("token has no valid expiry")
    if exp <= now - leeway:
        raise LoginRefused("token expired")
    if "nbf" in claims:
        nbf = _number(claims["nbf"])
        if nbf is None or nbf > now + leeway:
            raise LoginRefused("token not yet valid")
    if claims.get("token_type") != "access":
        raise LoginRefused("not an access token")
    if "user_id" not in claims:
        raise LoginRefused("token has no user id")
    return _user_id(claims["user_id"], "token")


#: What ``dpvoip token create`` tokens start with, so that they are told from JWTs at a
#: glance (and found by secret scanners).
TOKEN_PREFIX = "dpv_"  # noqa: S105 - a prefix, not a secret
_API_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{32,128}")


def new_api_token() -> tuple[str, str]:
    """(token to show once, its hash to store). Token = TOKEN_PREFIX +
    secrets.token_urlsafe(32): 256 random bits."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, api_token_hash(token)


def api_token_hash(token: str) -> str:
    """Hex SHA-256 of the token: what the database stores and looks up. A fast, unsalted
    hash is right here, unlike for passwords: the token has 256 random bits, so there is
    nothing to guess or precompute, and a stable hash makes it an indexed lookup.
    (Lone surrogates are hashed as they are, never raised on.)"""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def looks_like_api_token(token: str) -> bool:
    """Whether ``token`` has the shape of a dpvoip API token (prefix, then 32-128 urlsafe
    base64 characters); says nothing about whether it was issued."""
    return _API_TOKEN.fullmatch(token) is not None


_BEARER = re.compile(rb"[ \t]*bearer[ \t]+([A-Za-z0-9._~+/-]+=*)[ \t]*", re.IGNORECASE)


def bearer_token(header: bytes | None) -> str | None:
    """The token of an 'Authorization: Bearer <token>' header value (scheme
    case-insensitive, RFC 7235), None otherwise: no header, another scheme, or a token
    outside RFC 6750's b64token characters (which both JWTs and dpvoip tokens are in)."""
    if header is None:
        return None
    match = _BEARER.fullmatch(header)
    return None if match is None else match.group(1).decode("ascii")
