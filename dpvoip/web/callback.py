"""Click-to-call over HTTP: the CRM's popup (HTML and plain text) and its JSON clients.

Translation only: who is asking comes from a ``LoginService`` (``Logins``), every decision
about the call from a ``CallbackService`` (``ClickToCall``); the two Protocols below say
what the pages ask of them, so that the routes run as well on the real services over the
in-memory fakes of ``dpvoip.testing.memory``. What is decided here is what HTTP alone can
tell: a GET never dials, a POST that rides on the CRM's cookie must come from an allowed
origin (another site could otherwise make a signed-in user's browser dial), and the
answer's format follows the request's (form in, plain text out; JSON in or asked for,
JSON out).
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlsplit

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from dpvoip.click_to_call.callbacks import (
    BadCallId,
    CallbackOutcome,
    Connection,
    NoRecording,
    valid_call,
)
from dpvoip.click_to_call.errors import DatabaseUnreachable
from dpvoip.click_to_call.logins import CrmUser, NotSignedIn
from dpvoip.core.rate_limit import RateLimiter
from dpvoip.providers.interface import ProviderError
from dpvoip.web.errors import HttpError, error_answer, json_body, media_type
from dpvoip.web.sources import Network, client_address, peer_host, trusted

log = Logger()

NO_CONNECTION = ("You do not have a VoiP connection configured. Please contact your "
                 "administrator.")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_PAGE_HEADERS = {
    b"Content-Security-Policy": b"default-src 'none'; style-src 'unsafe-inline'; "
                                b"form-action 'self'; frame-ancestors 'self'",
    b"X-Frame-Options": b"SAMEORIGIN",
    b"Referrer-Policy": b"same-origin",
    b"X-Content-Type-Options": b"nosniff",
    b"Cache-Control": b"no-store",
}


class LoginService(Protocol):
    """Who is asking (``click_to_call.logins.Logins``)."""

    def identify(self, request: IRequest) -> Awaitable[CrmUser]:
        """The signed-in CRM user; ``NotSignedIn`` (saying why) or
        ``DatabaseUnreachable`` otherwise."""
        ...


class CallbackService(Protocol):
    """Click-to-call's decisions (``click_to_call.callbacks.ClickToCall``). A database
    that does not answer is ``DatabaseUnreachable``, from every method."""

    def connections(self, user: CrmUser) -> Awaitable[list[Connection]]:
        """The user's active connections."""
        ...

    def dial(self, user: CrmUser, connection_id: str, number: str, sip: str = "",
             predicted: bool = False) -> Awaitable[CallbackOutcome]:
        """Check, dial and record; Zadarma's failures come back as the outcome."""
        ...

    def refused(self, user: CrmUser | None, connection_id: str, number: str,
                outcome: CallbackOutcome) -> Awaitable[CallbackOutcome]:
        """Record a request refused before the checks (no login, a cross-site post)."""
        ...

    def recording_link(self, user: CrmUser, call: str) -> Awaitable[str]:
        """A fresh link to the call's recording, for a user who may hear it; ``BadCallId``,
        ``NoRecording`` or a provider's ``ProviderError`` (Zadarma's ``ZadarmaApiError``
        among them) otherwise."""
        ...


@dataclass
class CallbackPages:
    logins: LoginService
    calls: CallbackService
    allowed_origins: Sequence[str]
    login_url: str
    clock: Any
    proxies: Sequence[Network] = ()
    #: Refused anonymous posts per client address: each is recorded, so a flood must not
    #: become a flood of rows. Beyond it: 429, counted, not recorded.
    anonymous: RateLimiter = field(default_factory=lambda: RateLimiter(20, 60.0))
    #: Recording links per user: each costs one of the Zadarma requests click-to-call needs.
    recordings: RateLimiter = field(default_factory=lambda: RateLimiter(20, 60.0))
    unrecorded_floods: int = 0

    # -- GET: show, never dial -----------------------------------------------------------

    async def page(self, request: IRequest) -> bytes:
        check_query(request)
        number = _arg(request, b"number")[:64]
        wants_json = _wants_json(request)
        try:
            user = await self.logins.identify(request)
            connections = await self.calls.connections(user)
        except NotSignedIn as refused:
            return self._not_signed_in(request, refused, wants_json)
        except DatabaseUnreachable:
            raise HttpError(503, "the CRM database is not reachable; try again shortly") \
                from None
        if wants_json:
            body: dict[str, Any] = {"number": number, "user": user.username,
                                    "connections": [c.as_json() for c in connections]}
            if not connections:
                body["message"] = NO_CONNECTION
            return _send(request, 200, "application/json; charset=utf-8", json_body(body))
        if not connections:
            return _send(request, 200, "text/plain; charset=utf-8", NO_CONNECTION.encode())
        return _send(request, 200, "text/html; charset=utf-8",
                     _page(number, user, connections), _PAGE_HEADERS)

    def _not_signed_in(self, request: IRequest, refused: NotSignedIn, wants_json: bool) -> bytes:
        target = request.uri.decode("latin-1")
        login = f"{self.login_url}?next={quote(target, safe='')}"
        if wants_json:
            return error_answer(request, HttpError(401, refused.message), login_url=login)
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>Sign in</title></head>"
            f"<body><p>{html.escape(refused.message)}.</p>"
            f"<p><a href='{html.escape(login, quote=True)}'>Sign in to the CRM</a>, then "
            "open this page again.</p></body></html>"
        )
        return _send(request, 401, "text/html; charset=utf-8", page.encode(), _PAGE_HEADERS)

    # -- POST: dial ----------------------------------------------------------------------

    async def dial(self, request: IRequest) -> bytes:
        kind = media_type(request.getHeader(b"Content-Type"))
        as_json = kind == "application/json"
        if not as_json and kind not in FORM_TYPES:
            raise HttpError(415, f"Content-Type {kind or 'none'} not supported; send a form "
                            "or application/json")
        check_query(request)
        connection_id, number, sip, predicted = (_json_fields(request) if as_json
                                                 else _form_fields(request, kind))
        try:
            user = await self.logins.identify(request)
        except NotSignedIn as not_signed_in:
            wait = self.anonymous.take(self._sender(request), self.clock.seconds())
            if wait is not None:
                self.unrecorded_floods += 1
                return self._answer(request, as_json, CallbackOutcome(
                    429, "too many requests without signing in", retry_after=wait))
            outcome = await self.calls.refused(None, connection_id, number,
                                               CallbackOutcome(401, not_signed_in.message))
            return self._answer(request, as_json, outcome)
        except DatabaseUnreachable:
            return self._answer(request, as_json, CallbackOutcome(
                503, "the CRM database is not reachable; try again shortly"))
        try:
            if user.via == "session" and not self._same_origin(request):
                log.warn("click-to-call of {user} refused: cross-site request",
                         user=user.username)
                outcome = await self.calls.refused(user, connection_id, number, CallbackOutcome(
                    403, "this request does not come from the CRM's own pages"))
            else:
                outcome = await self.calls.dial(user, connection_id, number, sip, predicted)
        except DatabaseUnreachable:
            outcome = CallbackOutcome(503, "the CRM database is not reachable; try again "
                                           "shortly")
        return self._answer(request, as_json, outcome)

    def _answer(self, request: IRequest, as_json: bool, outcome: CallbackOutcome) -> bytes:
        if outcome.retry_after is not None:
            request.setHeader(b"Retry-After", retry_after(outcome.retry_after).encode())
        if as_json:
            if not outcome.ok:
                return error_answer(request, HttpError(outcome.status, outcome.message))
            body = json_body({"ok": True, "message": outcome.message, "number": outcome.number})
            return _send(request, outcome.status, "application/json; charset=utf-8", body)
        text = outcome.message if outcome.ok else f"Error! {outcome.message}"
        return _send(request, outcome.status, "text/plain; charset=utf-8", text.encode())

    def _same_origin(self, request: IRequest) -> bool:
        """Whether a cookie-authenticated POST comes from the CRM's own pages.

        ``Sec-Fetch-Site: same-origin`` is set by the browser itself (a page cannot forge
        it) and survives any proxy. Otherwise the Origin (else the Referer) must be one of
        ``allowed_origins``, or, when none is configured, the host the browser addressed
        (``Host``, or ``X-Forwarded-Host`` set by a proxy that rewrites it, believed only
        when the request comes from one of the trusted proxies: anyone else may write any
        header); a browser cannot set either header on a cross-site form post."""
        if _header(request, b"Sec-Fetch-Site") == "same-origin":
            return True
        source = _header(request, b"Origin") or _header(request, b"Referer")
        seen = origin_of(source)
        if seen is None:
            return False
        if self.allowed_origins:
            return seen in {origin_of(o) for o in self.allowed_origins}
        _, name, port = seen  # the scheme is the proxy's business: only the host counts
        headers = ((b"X-Forwarded-Host", b"Host") if self._from_proxy(request)
                   else (b"Host",))
        for header in headers:
            for host in _header(request, header).split(","):
                addressed = _host_and_port(host.strip().lower())
                if addressed and addressed[0] == name and addressed[1] in (None, port):
                    return True
        return False

    def _from_proxy(self, request: IRequest) -> bool:
        """Whether the direct peer is one of the trusted proxies."""
        return trusted(peer_host(request.getClientAddress()), self.proxies)

    # -- GET recording: a fresh link -----------------------------------------------------

    def _sender(self, request: IRequest) -> str:
        peer = request.getClientAddress()
        forwarded = request.requestHeaders.getRawHeaders(b"X-Forwarded-For", [])
        return client_address(peer_host(peer),
                              [h.decode("latin-1") for h in forwarded], self.proxies) or "?"

    async def recording(self, request: IRequest, call: str) -> bytes:
        check_query(request)
        if not valid_call(call):
            raise HttpError(400, str(BadCallId(call)))
        try:
            user = await self.logins.identify(request)
            wait = self.recordings.take(user.id, self.clock.seconds())
            if wait is not None:
                raise HttpError(429, f"too many recordings asked; try again in "
                                f"{math.ceil(wait)} s", {"Retry-After": str(math.ceil(wait))})
            link = await self.calls.recording_link(user, call)
        except BadCallId as bad:
            raise HttpError(400, str(bad)) from None
        except NotSignedIn as refused:
            raise HttpError(401, refused.message) from None
        except NoRecording as missing:
            raise HttpError(404, str(missing)) from None
        except ProviderError as error:  # any provider's: its status and message
            headers = ({"Retry-After": retry_after(error.retry_after)}
                       if error.retry_after is not None else {})
            raise HttpError(error.status, error.message, headers) from None
        except DatabaseUnreachable:
            raise HttpError(503, "the CRM database is not reachable; try again shortly") \
                from None
        request.setResponseCode(302)
        request.setHeader(b"Location", link.encode("ascii", "replace"))
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        return b""


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(text: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin or URL, default ports made explicit; None when it
    is not an http(s) origin (``null``, garbage)."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[parts.scheme]


def _host_and_port(host: str) -> tuple[str, int | None] | None:
    parts = urlsplit(f"//{host}")
    try:
        port = parts.port
    except ValueError:
        return None
    return (parts.hostname, port) if parts.hostname else None


def _header(request: IRequest, name: bytes) -> str:
    value = request.getHeader(name)
    return bytes(value).decode("latin-1") if value else ""


def _send(request: IRequest, status: int, content_type: str, body: bytes,
          headers: dict[bytes, bytes] | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", content_type.encode())
    request.setHeader(b"Cache-Control", b"no-store")
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    return body


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_text(name: str, value: str) -> None:
    """A 400 naming the parameter when its value holds a NUL or another control
    character: nothing a number, an id or an extension is written with, and a NUL is
    what PostgreSQL cannot store."""
    if _CONTROL.search(value):
        raise HttpError(400, f"{name[:40]!a} holds a control character")


def check_query(request: IRequest) -> None:
    """``check_text`` for every name and value of the query string."""
    query = bytes(request.uri).partition(b"?")[2]
    for key, values in parse_qs(query.decode("latin-1"), keep_blank_values=True,
                                encoding="utf-8", errors="replace").items():
        check_text(key, key)
        for value in values:
            check_text(key, value)


def _arg(request: IRequest, name: bytes) -> str:
    values = request.args.get(name) or [b""]
    return bytes(values[0]).decode("utf-8", "replace").strip()


def _wants_json(request: IRequest) -> bool:
    accept = (request.getHeader(b"Accept") or b"").decode("latin-1").lower()
    return "application/json" in accept and "text/html" not in accept


def _form_fields(request: IRequest, kind: str) -> tuple[str, str, str, bool]:
    """The form's own fields: values in the query string do not count, so a link cannot
    supply what the user did not submit."""
    if kind == "application/x-www-form-urlencoded":
        request.content.seek(0)
        body = request.content.read().decode("latin-1")
        parsed: dict[str, list[str]] = parse_qs(body, keep_blank_values=True,
                                                encoding="utf-8", errors="replace")
    else:
        query = request.uri.decode("latin-1").partition("?")[2]
        in_query = parse_qs(query, keep_blank_values=True)
        parsed = {}
        for key, values in request.args.items():
            name = bytes(key).decode("utf-8", "replace")
            if name not in in_query:
                parsed[name] = [bytes(v).decode("utf-8", "replace") for v in values]

    def field(name: str) -> str:
        return str((parsed.get(name) or [""])[0]).strip()

    return (field("callerid"), field("to_number"), field("sip"),
            field("predicted").lower() in ("1", "true", "on", "yes"))


def _json_fields(request: IRequest) -> tuple[str, str, str, bool]:
    try:
        request.content.seek(0)
        data = json.loads(request.content.read())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise HttpError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise HttpError(400, "send a JSON object: {\"connection\": id, \"number\": \"...\"}")
    connection = data.get("connection")
    number = data.get("number")
    sip = data.get("sip", "")
    predicted = data.get("predicted", False)
    if isinstance(connection, bool) or not isinstance(connection, int | str):
        raise HttpError(400, "connection must be the id of one of your connections")
    if not isinstance(number, str):
        raise HttpError(400, "number must be a string")
    if not isinstance(sip, str | int) or isinstance(sip, bool):
        raise HttpError(400, "sip must be a string")
    if not isinstance(predicted, bool):
        raise HttpError(400, "predicted must be true or false")
    return str(connection), number, str(sip), predicted


def _page(number: str, user: CrmUser, connections: list[Connection]) -> bytes:
    """The popup: the number, the connection to ring first, the Call button. The form posts
    back to this same path; the browser adds the Origin that the POST is checked against."""
    options = "".join(
        f"<option value='{c.id}'>{html.escape(c.callerid)} ({html.escape(c.provider)})"
        "</option>" for c in connections
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Call "
        f"{html.escape(number)}</title><style>body{{font-family:sans-serif;margin:1.5em}}"
        "label,select,input,button{display:block;margin:.4em 0}</style></head><body>"
        f"<p>Signed in as {html.escape(user.name)}.</p>"
        "<form method='post' action=''>"
        f"<label>Number <input name='to_number' value='{html.escape(number, quote=True)}' "
        "required maxlength='64'></label>"
        f"<label>Ring first <select name='callerid'>{options}</select></label>"
        "<button type='submit'>Call</button></form>"
        "<p>Your phone rings first; the number is called when you answer.</p>"
        "</body></html>"
    )
    return page.encode("utf-8")


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up (a client told to come back a
    moment early would only be refused again), at least one."""
    return str(max(1, math.ceil(seconds)))
