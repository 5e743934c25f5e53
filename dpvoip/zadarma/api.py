"""Zadarma's REST API over treq: signed as Zadarma checks it, bounded in time and in rate.

The signed string is built once (``php_query``) and sent byte for byte: an HTTP client's
own parameter encoding reorders and re-encodes, and Zadarma then refuses the signature.
One deadline covers the connection, the request and the whole answer body, so a server
that sends headers and then stalls cannot hold a user's click for ever. Every failure
becomes one ``ZadarmaApiError`` carrying the status dpvoip answers with and a message
safe to show (never the key or the secret).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import ResponseFailed
from twisted.web.iweb import IResponse

from dpvoip.core.errors import summary
from dpvoip.core.rate_limit import RateLimiter
from dpvoip.deferreds import within
from dpvoip.http_body import BodyTooBig, read_body
from dpvoip.providers.interface import ProviderError
from dpvoip.zadarma.signing import api_authorization, php_query

log = Logger()

API_URL = "https://api.zadarma.com"
SANDBOX_URL = "https://api-sandbox.zadarma.com"
MAX_ANSWER_BYTES = 1_048_576


class ZadarmaApiError(ProviderError):
    """A request to Zadarma that did not succeed; ``status`` is what dpvoip answers (a
    provider's error, as click-to-call answers every provider's: ``message``,
    ``retry_after``)."""

    status = 502


class ZadarmaRefused(ZadarmaApiError):
    """Zadarma answered ``status: error`` or an HTTP error: its message is shown."""


class ZadarmaRateLimited(ZadarmaApiError):
    status = 429


class ZadarmaTimeout(ZadarmaApiError):
    status = 504


class ZadarmaBadAnswer(ZadarmaApiError):
    """Not the JSON Zadarma sends (a proxy's error page, a truncated body)."""


class ZadarmaUnreachable(ZadarmaApiError):
    """No connection, a DNS failure, or a certificate that does not prove the name."""


class ZadarmaNotConfigured(ZadarmaApiError):
    status = 503


@dataclass(frozen=True)
class CallbackAccepted:
    from_number: str
    to_number: str
    time: int | None


@dataclass(frozen=True)
class Reply:
    """A decoded answer and the rate-limit headers that came with it."""

    body: dict[str, Any]
    remaining: int | None
    reset: float | None


def base_url(configured: str, sandbox: bool) -> str:
    if configured:
        return configured.rstrip("/")
    return SANDBOX_URL if sandbox else API_URL


class ZadarmaApi:
    """One signed request at a time: callers pass the method path and its parameters."""

    def __init__(
        self,
        http: Any,
        clock: IReactorTime,
        key: str,
        secret: str,
        url: str,
        timeout: float,
        per_minute: int,
    ) -> None:
        self._http = http
        self._clock = clock
        self._key = key
        self._secret = secret
        self._url = url
        self._timeout = timeout
        self._limiter = RateLimiter(per_minute, 60.0)
        self._blocked_until = 0.0

    @property
    def configured(self) -> bool:
        return bool(self._key and self._secret)

    async def request(self, method: str, params: Mapping[str, str | int] | None = None,
                      verb: str = "GET") -> Reply:
        """Sign and send; the decoded answer of a success, else a ZadarmaApiError."""
        if not self.configured:
            raise ZadarmaNotConfigured("Zadarma API keys are not configured ([zadarma] key, "
                                       "secret)")
        now = self._clock.seconds()
        if now < self._blocked_until:
            wait = self._blocked_until - now
            raise ZadarmaRateLimited(
                f"Zadarma's rate limit is reached; try again in {math.ceil(wait)} s", wait)
        wait_local = self._limiter.take("api", now)
        if wait_local is not None:
            raise ZadarmaRateLimited(
                f"too many requests to Zadarma; try again in {math.ceil(wait_local)} s",
                wait_local)
        query = php_query(params or {})
        headers = {"Authorization": [api_authorization(self._key, self._secret, method, query)]}
        url = self._url + method
        data: bytes | None = None
        if verb == "GET":
            url += "?" + query if query else ""
        else:
            data = query.encode("ascii")
            headers["Content-Type"] = ["application/x-www-form-urlencoded"]
        exchange = Deferred.fromCoroutine(self._exchange(verb, url, headers, data))
        try:
            # At the deadline (or when our caller gives up) the exchange is cancelled: its
            # connection is aborted rather than left to a server that stalls.
            response, body = await within(self._clock, exchange, self._timeout,
                                          cancel_work=True)
        except (defer.TimeoutError, CancelledError):
            raise ZadarmaTimeout(
                f"Zadarma did not answer within {self._timeout:g} s") from None
        except Exception as error:
            raise self._unreachable(error) from None
        return self._decode(method, response, body)

    @staticmethod
    def _unreachable(error: Exception) -> Exception:
        """The error a transport failure is shown as (others pass through unchanged)."""
        if isinstance(error, DNSLookupError):
            return ZadarmaUnreachable("Zadarma's API host name does not resolve")
        if isinstance(error, ConnectError):
            return ZadarmaUnreachable(f"cannot connect to Zadarma: {summary(error)}")
        if isinstance(error, ResponseFailed):
            return ZadarmaUnreachable(_response_failed(error))
        if isinstance(error, ZadarmaApiError):
            return error
        # RequestNotSent, RequestTransmissionFailed (a stale pooled connection) and the like
        return ZadarmaUnreachable(f"the request to Zadarma failed: {summary(error)}")


    async def _exchange(self, verb: str, url: str, headers: dict[str, list[str]],
                        data: bytes | None) -> tuple[IResponse, bytes]:
        response = await self._http.request(verb, url, headers=headers, data=data,
                                            allow_redirects=False)
        try:
            body = await read_body(response, MAX_ANSWER_BYTES)
        except BodyTooBig:
            raise ZadarmaBadAnswer("Zadarma's answer is too large") from None
        return response, body

    def _decode(self, method: str, response: IResponse, body: bytes) -> Reply:
        remaining = _header_number(response, b"X-RateLimit-Remaining")
        reset = _header_number(response, b"X-RateLimit-Reset")
        try:
            decoded = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            decoded = None
        if response.code == 429:
            now = self._clock.seconds()
            # a reset in the past, absurdly far (milliseconds?) or missing: one minute
            until = reset if reset is not None and now < reset <= now + 3600 else now + 60
            self._blocked_until = max(self._blocked_until, until)
            raise ZadarmaRateLimited(
                f"Zadarma's rate limit is reached; try again in {math.ceil(until - now)} s",
                until - now)
        if not isinstance(decoded, dict):
            raise ZadarmaBadAnswer(
                f"Zadarma answered {method} with HTTP {response.code} and no JSON")
        message = str(decoded.get("message") or "").strip()[:300]
        if response.code >= 400 or decoded.get("status") != "success":
            raise ZadarmaRefused(message or f"Zadarma answered {method} with HTTP "
                                            f"{response.code}")
        return Reply(decoded, None if remaining is None else int(remaining), reset)

    # -- the methods dpvoip uses -----------------------------------------------------------

    async def callback(self, from_number: str, to_number: str, sip: str = "",
                       predicted: bool = False) -> CallbackAccepted:
        params: dict[str, str | int] = {"from": from_number, "to": to_number}
        if sip:
            params["sip"] = sip
        if predicted:
            params["predicted"] = 1
        reply = await self.request("/v1/request/callback/", params)
        time = reply.body.get("time")
        return CallbackAccepted(
            str(reply.body.get("from", from_number)), str(reply.body.get("to", to_number)),
            int(time) if isinstance(time, int | str) and str(time).isdigit() else None,
        )

    async def recording_link(self, call_id: str = "", pbx_call_id: str = "",
                             lifetime: int = 1800) -> str:
        """A temporary link to a call's recording (the first one of a PBX call)."""
        params: dict[str, str | int] = {"lifetime": lifetime}
        if call_id:
            params["call_id"] = call_id
        else:
            params["pbx_call_id"] = pbx_call_id
        reply = await self.request("/v1/pbx/record/request/", params)
        link = reply.body.get("link")
        links = reply.body.get("links")
        if not link and isinstance(links, list) and links:
            link = links[0]
        if not isinstance(link, str) or not link.startswith(("https://", "http://")):
            raise ZadarmaBadAnswer("Zadarma gave no link to the recording")
        return link

    async def timezone(self) -> str:
        """The account's time zone as Zadarma states it (e.g. ``UTC+2``)."""
        reply = await self.request("/v1/info/timezone/")
        zone = reply.body.get("timezone")
        if not isinstance(zone, str) or not zone:
            raise ZadarmaBadAnswer("Zadarma's time zone answer has no timezone")
        return zone


def _header_number(response: IResponse, name: bytes) -> float | None:
    values = response.headers.getRawHeaders(name) or []
    try:
        number = float(values[0]) if values else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _response_failed(error: ResponseFailed) -> str:
    """TLS verification failures arrive wrapped in ResponseFailed: say so plainly."""
    reasons = [str(reason.value) for reason in error.reasons]  # Failures, by contract
    joined = " ".join(reasons).lower()
    if "certificate" in joined or "ssl" in joined or "tls" in joined or "verif" in joined:
        return "Zadarma's TLS certificate could not be verified for its host name"
    first = next((summary(reason) for reason in reasons if reason.strip()), "no answer")
    return "the connection to Zadarma broke: " + first
