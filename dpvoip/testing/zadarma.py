"""A fake of api.zadarma.com: the REST API as Zadarma serves it, for tests and the demo.

dpvoip's Zadarma client talks to it exactly as to the real host (zadarma.md section 2), so
the tests exercise the real protocol: the ``Authorization: <key>:<signature>`` header
checked over the query or body *as received* (a client that re-encodes what it signed is
refused, as Zadarma refuses it), the 100-requests-a-minute limit and its headers, the
answers of the endpoints dpvoip uses, and the ways Zadarma and the network fail.

Like ``treq.testing``, it ships in the package: ``dpvoip zadarma-sim`` serves it (plain
TCP or TLS, whatever the endpoint description says) and the README demo points the daemon
at it. All times come from an injected ``IReactorTime``, so a ``Clock`` drives the rate
limit in tests while the network runs on the real reactor.

Pieces: ``Fault`` (a scripted failure) and ``ReceivedRequest`` (what was received) are
values; ``_Limiter`` counts requests per key; the endpoint functions turn parameters into
an ``_Answer``; ``ZadarmaFake`` does the HTTP and holds the state; ``serve`` listens.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, quote

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime, ITCPTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from dpvoip.deferreds import EmptyableSet
from dpvoip.zadarma.signing import api_authorization

RATE_LIMIT = 100
"""Requests a key may make per window: Zadarma's general limit."""

RATE_WINDOW = 60.0
"""Seconds in a rate-limit window."""

LIFETIME_DEFAULT = 1800
LIFETIME_RANGE = (180, 5_184_000)
"""Seconds a recording link may live (``lifetime``), inclusive."""

RECORD_BASE = "https://api.zadarma.com/v1/pbx/record/download/"
"""Where the fake's recording links point (never fetched: they only have to look right)."""

# zadarma.md 2.2, from the OpenAPI file; used with fullmatch, so no trailing-newline slip.
FROM_PATTERN = re.compile(r"\+?[0-9]{7,15}|[0-9]{3,5}")
TO_PATTERN = re.compile(r"\+?[0-9]{7,15}|[0-9]{5}")
SIP_PATTERN = re.compile(r"[0-9]{5}|[0-9]{3}")

_UTC_OFFSET = re.compile(r"UTC(?:([+-])([0-9]{1,2})(?::([0-9]{2}))?)?")
_BODY_METHODS = frozenset({"POST", "PUT"})
_HTML = (b"<html><head><title>502 Bad Gateway</title></head><body>"
         b"<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center>"
         b"</body></html>\n")


# --- values ------------------------------------------------------------------------------

FaultKind = Literal["error", "server_error", "html", "rate_limited", "hang", "slow_body"]


@dataclass(frozen=True)
class Fault:
    """One way a request can go wrong, scripted with ``ZadarmaFake.fail_next``.

    Build them with the class methods; each mirrors something Zadarma or the path to it
    does, so that a client's handling of it can be tested.
    """

    kind: FaultKind
    code: int = 200
    message: str = ""
    reset: int | None = None

    @classmethod
    def error(cls, message: str, code: int = 200) -> Fault:
        """``{"status":"error","message":...}`` with ``code``: Zadarma sometimes says
        error with HTTP 200, so a client must look at ``status`` and not only the code."""
        return cls("error", code, message)

    @classmethod
    def server_error(cls) -> Fault:
        """HTTP 500 with a JSON error body."""
        return cls("server_error", 500, "Internal server error")

    @classmethod
    def html(cls, code: int = 200) -> Fault:
        """An HTML page instead of JSON, as a proxy or maintenance page in front gives."""
        return cls("html", code)

    @classmethod
    def rate_limited(cls, reset: int) -> Fault:
        """HTTP 429 whose ``X-RateLimit-Reset`` is ``reset`` (unix time), whatever the
        real count is: to test a client's back-off without making 100 requests."""
        return cls("rate_limited", 429, "Too many requests", reset)

    @classmethod
    def hang(cls) -> Fault:
        """Never answer: the request is held until the client gives up or ``close()``."""
        return cls("hang")

    @classmethod
    def slow_body(cls) -> Fault:
        """Send the status line, the headers (with the full Content-Length) and part of
        the body, then nothing: a client must time out reading, not only connecting."""
        return cls("slow_body")


@dataclass(frozen=True)
class ReceivedRequest:
    """A request as it arrived, before anything was decided about it; lets a test
    assert that the client sent exactly the string it signed."""

    method: str
    path: str
    """As received, undecoded (the path Zadarma signs), e.g. ``/v1/request/callback/``."""
    query: str
    """The raw query string after ``?``; "" when there is none."""
    body: bytes
    params: Mapping[str, str]
    """Parsed from the query (GET) or the form body (POST, PUT); the last value wins."""
    authorization: str | None
    """The ``Authorization`` header, or None when absent."""
    authorized: bool
    at: float
    """The fake's clock when it arrived."""

    @property
    def signed(self) -> str:
        """What the signature must cover: the raw body for POST and PUT, else the query."""
        if self.method in _BODY_METHODS:
            return self.body.decode("utf-8", "surrogateescape")
        return self.query


@dataclass(frozen=True)
class _Quota:
    """One request's place in its key's window, as the X-RateLimit headers tell it."""

    limit: int
    remaining: int
    reset: int
    exceeded: bool


@dataclass
class _Window:
    start: float
    count: int = 0


@dataclass
class _Scripted:
    fault: Fault
    path: str | None
    times: int


@dataclass(frozen=True)
class _Answer:
    """A complete HTTP answer: status code, body, content type."""

    code: int
    body: bytes
    content_type: bytes = b"application/json; charset=utf-8"


def _json(code: int, **fields: Any) -> _Answer:
    return _Answer(code, json.dumps(fields, separators=(",", ":")).encode())


def _success(**fields: Any) -> _Answer:
    return _json(200, status="success", **fields)


def _error(code: int, message: str) -> _Answer:
    return _json(code, status="error", message=message)


# --- time zone ---------------------------------------------------------------------------


def parse_utc_offset(text: str) -> timezone:
    """The fixed offset of Zadarma's zone name (``UTC``, ``UTC+3``, ``UTC-5``,
    ``UTC+5:30``); ValueError for anything else. Zadarma names an account's zone by its
    offset, not by an IANA name, so no daylight saving rules apply."""
    match = _UTC_OFFSET.fullmatch(text)
    if match is None:
        raise ValueError(f"time zone {text!r} is not like 'UTC+3' or 'UTC-5:30'")
    sign = -1 if match[1] == "-" else 1
    hours, minutes = int(match[2] or 0), int(match[3] or 0)
    if hours > 14 or minutes >= 60:
        raise ValueError(f"time zone {text!r} is out of range")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def _wall_clock(at: float, zone: timezone) -> str:
    """Zadarma's ``YYYY-MM-DD HH:MM:SS`` in the account's zone."""
    return datetime.fromtimestamp(at, zone).strftime("%Y-%m-%d %H:%M:%S")


# --- the rate limit ----------------------------------------------------------------------


class _Limiter:
    """Fixed windows per key: the first request opens a window of ``window`` seconds,
    the ``limit + 1``-th inside it is refused, and the count starts over after it."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._windows: dict[str, _Window] = {}

    def take(self, key: str, now: float) -> _Quota:
        current = self._windows.get(key)
        if current is None or now >= current.start + self.window:
            current = self._windows[key] = _Window(now)
        current.count += 1
        return _Quota(self.limit, max(0, self.limit - current.count),
                      math.ceil(current.start + self.window), current.count > self.limit)


# --- the endpoints (pure: parameters and state in, an answer out) --------------------------


def _check(params: Mapping[str, str], name: str, pattern: re.Pattern[str],
           required: bool) -> _Answer | None:
    value = params.get(name)
    if value is None or value == "":
        return _error(400, f"Parameter '{name}' is required") if required else None
    if pattern.fullmatch(value) is None:
        return _error(400, f"Wrong parameter '{name}'")
    return None


def _number(value: str) -> int:
    """Zadarma answers the numbers of a callback as JSON numbers, without the ``+``."""
    return int(value.removeprefix("+"))


def _lifetime(params: Mapping[str, str]) -> int | None:
    text = params.get("lifetime", "")
    if text == "":
        return LIFETIME_DEFAULT
    if not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    low, high = LIFETIME_RANGE
    return value if low <= value <= high else None


# --- the fake ----------------------------------------------------------------------------


class ZadarmaFake:
    """api.zadarma.com for one API key: checks signatures, counts requests, answers the
    endpoints dpvoip uses, and fails on request (``fail_next``).

    Every request is appended to ``requests`` first, whatever its fate. Then, in order:
    the rate limit is counted (per key named in the header, signed correctly or not, as a
    gateway in front of the API would); a scripted fault answers if one matches; a key over
    its limit gets 429; a wrong or missing signature gets 401; then the endpoint answers
    (unknown path: 404, a verb other than GET: 405). Every answer carries the X-RateLimit
    headers and ``X-Zadarma-Method`` (the path asked for).
    """

    def __init__(self, key: str, secret: str, clock: IReactorTime, *,
                 rate_limit: int = RATE_LIMIT, rate_window: float = RATE_WINDOW,
                 balance: float = 10.34, currency: str = "USD", timezone: str = "UTC+3",
                 pbx_id: int = 1234, extensions: Sequence[int] = (100, 101, 102),
                 recordings: Mapping[str, Sequence[str]] | None = None,
                 record_base: str = RECORD_BASE,
                 report: Callable[[ReceivedRequest, int], None] | None = None) -> None:
        self.report = report
        """Told of every request and the status it got (the demo prints them)."""
        self.key = key
        self.secret = secret
        self.clock = clock
        self.balance = balance
        self.currency = currency
        self.timezone = timezone
        """Zadarma's name of the account's zone, as /v1/info/timezone/ gives it."""
        self.zone = parse_utc_offset(timezone)
        self.pbx_id = pbx_id
        self.extensions = list(extensions)
        self.record_base = record_base
        self.requests: list[ReceivedRequest] = []
        """Every request received, oldest first."""
        self._limiter = _Limiter(rate_limit, rate_window)
        self._scripted: list[_Scripted] = []
        self._recordings: dict[str, list[str]] = {}  # pbx_call_id -> call_id_with_rec
        self._held: EmptyableSet[Request] = EmptyableSet()
        self._ports: list[IListeningPort] = []
        self._routes: dict[str, Callable[[Mapping[str, str]], _Answer]] = {
            "/v1/request/callback/": self._callback,
            "/v1/info/balance/": self._balance,
            "/v1/info/timezone/": self._timezone,
            "/v1/pbx/record/request/": self._record,
            "/v1/pbx/internal/": self._internal,
        }
        for pbx_call_id, call_ids in (recordings or {}).items():
            for call_id in call_ids:
                self.add_recording(pbx_call_id, call_id)

    # -- what tests set up

    def add_recording(self, pbx_call_id: str, call_id: str) -> None:
        """Know a recording: ``call_id`` (NOTIFY_RECORD's ``call_id_with_rec``) of the
        call ``pbx_call_id``; a call may have several (one per leg or transfer)."""
        self._recordings.setdefault(pbx_call_id, []).append(call_id)

    def fail_next(self, fault: Fault, *, path: str | None = None, times: int = 1) -> None:
        """Answer the next ``times`` requests (to ``path`` only, if given) with ``fault``.
        Scripts queue up: a request takes the oldest that matches its path."""
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        self._scripted.append(_Scripted(fault, path, times))

    @property
    def faults_pending(self) -> int:
        """Scripted failures not used yet (counting each of ``times``)."""
        return sum(entry.times for entry in self._scripted)

    @property
    def held(self) -> int:
        """Requests held open now (hangs and slow bodies whose client is still there)."""
        return len(self._held)

    # -- serving

    def resource(self) -> Resource:
        """The whole API as one twisted.web resource, to mount at the root."""
        return _ApiResource(self)

    def site(self) -> Site:
        site = Site(self.resource())
        site.noisy = False
        return site

    def listen(self, reactor: Any, description: str) -> Deferred[IListeningPort]:
        """Listen on a server endpoint description (``tcp:0:interface=127.0.0.1``, or
        ``ssl:...`` for TLS); ``close()`` stops it."""
        listening: Deferred[IListeningPort] = serverFromString(reactor, description).listen(
            self.site())

        def keep(port: IListeningPort) -> IListeningPort:
            self._ports.append(port)
            return port

        return listening.addCallback(keep)

    def close(self) -> Deferred[None]:
        """Stop the ports ``listen()`` opened and drop the connection of every held
        request (a hung client sees the connection close, a slow body ends short); fires
        once all are gone, so a test ends with a clean reactor."""
        ports, self._ports = self._ports, []
        waiting: list[Deferred[Any]] = [maybeDeferred(port.stopListening) for port in ports]
        for request in self._held:
            _abort(request)
        waiting.append(self._held.when_empty())
        done: Deferred[Any] = DeferredList(waiting, consumeErrors=True)
        return done.addCallback(lambda _: None)

    # -- one request

    def handle(self, request: Request) -> bytes | int:
        """Answer ``request``: the bytes of the body, or NOT_DONE_YET when it is held."""
        received = self._receive(request)
        self.requests.append(received)
        key = (received.authorization or "").partition(":")[0]
        quota = self._limiter.take(key, received.at)
        request.setHeader(b"X-Zadarma-Method", received.path.encode("utf-8", "replace"))
        fault = self._take_fault(received.path)
        if fault is not None:
            return self._fail(request, fault, quota)
        _limit_headers(request, quota)
        if quota.exceeded:
            answer = _error(429, "Too many requests")
        elif not received.authorized:
            answer = _error(401, "Not authorized")
        else:
            answer = self._route(received)
        if self.report is not None:
            self.report(received, answer.code)
        return _send(request, answer)

    def _receive(self, request: Request) -> ReceivedRequest:
        method = request.method.decode("ascii", "replace")
        uri = request.uri
        path, _, query = uri.partition(b"?")
        assert request.content is not None
        request.content.seek(0)
        body = request.content.read()
        query_text = query.decode("utf-8", "surrogateescape")
        form = body.decode("utf-8", "surrogateescape") if method in _BODY_METHODS else query_text
        header = request.getHeader(b"authorization")
        authorization = None if header is None else header.decode("utf-8", "surrogateescape")
        path_text = path.decode("utf-8", "surrogateescape")
        return ReceivedRequest(
            method=method, path=path_text, query=query_text, body=body,
            params=dict(parse_qsl(form, keep_blank_values=True)),
            authorization=authorization,
            authorized=self._authorized(path_text, form, authorization),
            at=self.clock.seconds(),
        )

    def _authorized(self, path: str, signed: str, header: str | None) -> bool:
        """Whether ``header`` is Zadarma's signature of ``signed`` as received for
        ``path``. Constant time; undecodable bytes never match."""
        if header is None:
            return False
        try:
            expected = api_authorization(self.key, self.secret, path, signed).encode()
            given = header.encode()
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(expected, given)

    def _take_fault(self, path: str) -> Fault | None:
        for entry in self._scripted:
            if entry.path is None or entry.path == path:
                entry.times -= 1
                if entry.times == 0:
                    self._scripted.remove(entry)
                return entry.fault
        return None

    def _fail(self, request: Request, fault: Fault, quota: _Quota) -> bytes | int:
        if fault.kind == "rate_limited":
            assert fault.reset is not None
            quota = _Quota(quota.limit, 0, fault.reset, True)
        _limit_headers(request, quota)
        match fault.kind:
            case "error" | "server_error" | "rate_limited":
                return _send(request, _error(fault.code, fault.message))
            case "html":
                return _send(request, _Answer(fault.code, _HTML, b"text/html"))
            case "hang":
                self._hold(request)
                return NOT_DONE_YET
            case "slow_body":
                answer = self._balance({})
                request.setResponseCode(200)
                request.setHeader(b"Content-Type", answer.content_type)
                request.setHeader(b"Content-Length", str(len(answer.body)).encode())
                request.write(answer.body[: len(answer.body) // 2])
                self._hold(request)
                return NOT_DONE_YET

    def _hold(self, request: Request) -> None:
        self._held.add(request)

        def forget(result: Failure | None) -> None:
            # Finished, or (a Failure) the connection went: expected of a held request.
            self._held.discard(request)

        request.notifyFinish().addBoth(forget)

    def _route(self, received: ReceivedRequest) -> _Answer:
        endpoint = self._routes.get(received.path)
        if endpoint is None:
            return _error(404, "Method not found")
        if received.method != "GET":
            return _error(405, f"Method {received.method} not allowed, use GET")
        return endpoint(received.params)

    # -- the endpoints

    def _now(self) -> float:
        return self.clock.seconds()

    def _callback(self, params: Mapping[str, str]) -> _Answer:
        for name, pattern, required in (("from", FROM_PATTERN, True),
                                        ("to", TO_PATTERN, True),
                                        ("sip", SIP_PATTERN, False)):
            problem = _check(params, name, pattern, required)
            if problem is not None:
                return problem
        return _success(**{"from": _number(params["from"]), "to": _number(params["to"]),
                           "time": int(self._now())})

    def _balance(self, params: Mapping[str, str]) -> _Answer:
        return _success(balance=self.balance, currency=self.currency)

    def _timezone(self, params: Mapping[str, str]) -> _Answer:
        """The shape Zadarma documents (API docs and its OpenAPI file):
        ``{"status":"success","unixtime":1483228800,"datetime":"2017-01-01 00:00:00",
        "timezone":"UTC+0"}``: the zone is an offset name, the wall clock is local."""
        now = self._now()
        return _success(unixtime=int(now), datetime=_wall_clock(now, self.zone),
                        timezone=self.timezone)

    def _record(self, params: Mapping[str, str]) -> _Answer:
        lifetime = _lifetime(params)
        if lifetime is None:
            low, high = LIFETIME_RANGE
            return _error(400, f"Wrong parameter 'lifetime': {low}..{high} seconds")
        till = _wall_clock(self._now() + lifetime, self.zone)
        call_id = params.get("call_id", "")
        if call_id:
            if not any(call_id in ids for ids in self._recordings.values()):
                return _error(404, "Record not found")
            return _success(link=self._link(call_id), lifetime_till=till)
        pbx_call_id = params.get("pbx_call_id", "")
        if not pbx_call_id:
            return _error(400, "Parameter 'call_id' or 'pbx_call_id' is required")
        call_ids = self._recordings.get(pbx_call_id)
        if not call_ids:
            return _error(404, "Record not found")
        return _success(links=[self._link(one) for one in call_ids], lifetime_till=till)

    def _link(self, call_id: str) -> str:
        return f"{self.record_base}{quote(call_id, safe='')}.mp3"

    def _internal(self, params: Mapping[str, str]) -> _Answer:
        return _success(pbx_id=self.pbx_id, numbers=self.extensions)


def _limit_headers(request: Request, quota: _Quota) -> None:
    request.setHeader(b"X-RateLimit-Limit", str(quota.limit).encode())
    request.setHeader(b"X-RateLimit-Remaining", str(quota.remaining).encode())
    request.setHeader(b"X-RateLimit-Reset", str(quota.reset).encode())


def _send(request: Request, answer: _Answer) -> bytes:
    request.setResponseCode(answer.code)
    request.setHeader(b"Content-Type", answer.content_type)
    request.setHeader(b"Cache-Control", b"no-store")
    return answer.body


def _abort(request: Request) -> None:
    """Drop a held request's connection at once (no FIN handshake to wait for)."""
    channel = request.channel  # None once the request has finished
    if channel is not None and channel.transport is not None:
        cast(ITCPTransport, channel.transport).abortConnection()  # TCP and TLS alike


class _ApiResource(Resource):
    """Every path to the fake: a leaf, so that the raw path reaches ``ZadarmaFake``."""

    isLeaf = True

    def __init__(self, fake: ZadarmaFake) -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: Request) -> bytes | int:
        return self.fake.handle(request)


# --- the command -------------------------------------------------------------------------


def serve(reactor: Any, endpoint_description: str, key: str, secret: str, *,
          rate_limit: int = RATE_LIMIT, timezone: str = "UTC+3",
          recordings: Mapping[str, Sequence[str]] | None = None,
          report: Callable[[ReceivedRequest, int], None] | None = None,
          ) -> Deferred[IListeningPort]:
    """``dpvoip zadarma-sim``: serve a fake for ``key``/``secret`` where the endpoint
    description says (``tcp:8443:interface=127.0.0.1``, or ``ssl:...`` with a certificate
    for TLS); fires with the listening port. ValueError for a bad ``timezone``."""
    fake = ZadarmaFake(key, secret, reactor, rate_limit=rate_limit, timezone=timezone,
                       recordings=recordings, report=report)
    return fake.listen(reactor, endpoint_description)
