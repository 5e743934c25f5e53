"""Zadarma's signatures, exactly as Zadarma computes them (zadarma.md sections 1.2, 2.1).

Pure. Webhooks: ``base64(hex(HMAC-SHA1(secret, S)))`` over the raw form values of the
event's fields, concatenated; compared in constant time. REST API: the parameters sorted
and encoded as PHP's ``http_build_query`` does (RFC 1738), signed with the method path and
the MD5 of that string; the signed string is what is sent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import quote_plus

#: The form fields whose raw values, concatenated, a webhook's signature covers.
SIGNED_FIELDS: Mapping[str, tuple[str, ...]] = {
    "NOTIFY_START": ("caller_id", "called_did", "call_start"),
    "NOTIFY_INTERNAL": ("caller_id", "called_did", "call_start"),
    "NOTIFY_END": ("caller_id", "called_did", "call_start"),
    "NOTIFY_IVR": ("caller_id", "called_did", "call_start"),
    "NOTIFY_ANSWER": ("caller_id", "destination", "call_start"),
    "NOTIFY_OUT_START": ("internal", "destination", "call_start"),
    "NOTIFY_OUT_END": ("internal", "destination", "call_start"),
    "NOTIFY_RECORD": ("pbx_call_id", "call_id_with_rec"),
}


def _hex_base64(secret: str, message: str) -> str:
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha1).hexdigest()
    return base64.b64encode(digest.encode("ascii")).decode("ascii")


def signed_string(form: Mapping[str, str]) -> str | None:
    """S for this event: the raw values of its signed fields (a missing one counts as "");
    None for an event this table does not know (SMS and friends sign ``result``)."""
    event = form.get("event", "")
    names = SIGNED_FIELDS.get(event)
    if names is None:
        return form.get("result") if "result" in form else None
    return "".join(form.get(name, "") for name in names)


def webhook_signature(secret: str, form: Mapping[str, str]) -> str | None:
    message = signed_string(form)
    return None if message is None else _hex_base64(secret, message)


def verify_webhook(secret: str, form: Mapping[str, str], header: str | None) -> bool:
    """Whether ``header`` is the event's signature. Constant time; the raw-digest form one
    official SDK produces by mistake is rejected (it is not what Zadarma sends)."""
    if not secret or header is None:
        return False
    try:
        expected = webhook_signature(secret, form)
        given = header.strip().encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: not what Zadarma sends
        return False
    if expected is None:
        return False
    return hmac.compare_digest(expected.encode("ascii"), given)


def php_query(params: Mapping[str, str | int]) -> str:
    """PHP's ``http_build_query`` of the parameters sorted by key (RFC 1738: space is
    ``+``; everything but ``A-Za-z0-9-_.`` percent-encoded in upper case, ``~`` too)."""

    def encode(value: str | int) -> str:
        return quote_plus(str(value), safe="").replace("~", "%7E")

    return "&".join(f"{encode(key)}={encode(params[key])}" for key in sorted(params))


def api_authorization(key: str, secret: str, method: str, query: str) -> str:
    """The ``Authorization`` header for ``method`` (the path with both slashes, e.g.
    ``/v1/request/callback/``) and ``query`` exactly as it is sent."""
    digest = hashlib.md5(query.encode(), usedforsecurity=False).hexdigest()
    return f"{key}:{_hex_base64(secret, method + query + digest)}"
