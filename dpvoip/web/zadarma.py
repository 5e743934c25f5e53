"""``/voip/zd/``: Zadarma's webhooks, checked, recorded, answered.

The order of checks is Zadarma's: the URL echo first (before anything else), then where
the request comes from (403), its form (415, 400, 413 by the server), its signature
(401), then the event. A request is answered 200 only once its event is committed.

The ``[zadarma]`` section's provider (named ``zadarma``) is served at ``/voip/zd/`` by
``web.app`` (its echo a Klein route, its events in front of Klein); another Zadarma
provider, named N, at ``/voip/zd/N/`` by a ``ZadarmaEndpoint``: the same checks and
answers, its own secret, allow-list and account.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import tzinfo
from typing import Any, Protocol, runtime_checkable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from dpvoip.calls.ingest import ZadarmaContext, ZadarmaOutcome
from dpvoip.config import Secret
from dpvoip.core.log_budget import LogBudget, more_like_this
from dpvoip.spool.durable import NotRecorded
from dpvoip.web.errors import HttpError, error_answer, failure_answer, require_media_type
from dpvoip.web.sources import Network, allowed, client_address, peer_host
from dpvoip.zadarma.events import BadEvent, UnknownEvent, ZadarmaEvent, parse_event
from dpvoip.zadarma.signing import verify_webhook

log = Logger(namespace="dpvoip.zadarma")
FORM = "application/x-www-form-urlencoded"


@runtime_checkable
class Recorder(Protocol):
    """The durable ingest's way in for Zadarma's events (``DurableIngest``)."""

    def submit_zadarma(self, event: ZadarmaEvent, form: dict[str, str],
                       context: ZadarmaContext) -> Deferred[ZadarmaOutcome]: ...


@dataclass
class WebhookCounters:
    received: int = 0
    recorded: int = 0
    duplicates: int = 0
    unknown: int = 0
    refused: dict[int, int] = field(default_factory=dict)


class CurrentZadarmaContext:
    """How the account's events are read now: the configured context, its zone replaced
    when Zadarma states the account's zone (``ZadarmaAccountService``).

    Built by the composition root before its readers (the webhook, and the spool's replay
    of webhook events) and its writer (the account service): each is handed this object,
    so none refers to another.
    """

    def __init__(self, configured: ZadarmaContext) -> None:
        self._context = configured

    def current(self) -> ZadarmaContext:
        return self._context

    def learn_zone(self, zone: tzinfo) -> None:
        """The account's clock runs in ``zone``: read the next events' times in it."""
        self._context = replace(self._context, zone=zone)


#: The answer on ``/voip/zd/`` when no webhook is wired (an app built without one).
NOT_CONFIGURED = "Zadarma webhooks are not configured"


class ZadarmaWebhook:
    """Zadarma's events, checked in Zadarma's order, recorded, answered."""

    def __init__(self, recorder: Recorder, context: ZadarmaContext | CurrentZadarmaContext,
                 secret: Secret, allowlist: Sequence[Network], proxies: Sequence[Network],
                 caller_name: bool = True, clock: IReactorTime | None = None) -> None:
        self.recorder = recorder
        self._context = (context if isinstance(context, CurrentZadarmaContext)
                         else CurrentZadarmaContext(context))
        self.secret = secret
        self.allowlist = allowlist
        self.proxies = proxies
        self.caller_name = caller_name
        self.counters = WebhookCounters()
        # A flood of refused senders is a few lines a minute, each saying how many more.
        self._clock = clock
        self._budget = LogBudget()

    @property
    def context(self) -> ZadarmaContext:
        """How the next event will be read (the account's zone once it is known)."""
        return self._context.current()

    def refuse(self, status: int, message: str) -> HttpError:
        self.counters.refused[status] = self.counters.refused.get(status, 0) + 1
        return HttpError(status, message)

    def echo(self, request: IRequest) -> bytes:
        token = request.args.get(b"zd_echo")
        if not token:
            raise self.refuse(400, "zd_echo missing")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        value: bytes = token[0]
        return value

    async def event(self, request: IRequest) -> bytes:
        self.counters.received += 1
        peer = request.getClientAddress()
        forwarded = request.requestHeaders.getRawHeaders(b"X-Forwarded-For", [])
        sender = client_address(peer_host(peer),
                                [h.decode("latin-1") for h in forwarded], self.proxies)
        if not allowed(sender, self.allowlist):
            write, held = (self._budget.allow("sender", self._clock.seconds())
                           if self._clock is not None else (True, 0))
            if write:
                log.warn("webhook from {sender} refused: not a Zadarma address (not in "
                         "[zadarma] allowed_networks, DPVOIP_ZADARMA_ALLOWED_NETWORKS; add "
                         "127.0.0.1/32 there for a local demo, or name a forwarding proxy in "
                         "[web] trusted_proxies){more}", sender=sender or "an unreadable "
                         "address", more=more_like_this(held, self._budget.window))
            raise self.refuse(403, "not an address Zadarma sends from")
        try:
            require_media_type(request.getHeader(b"Content-Type"), FORM)
        except HttpError as error:
            raise self.refuse(error.status, error.message) from None
        form = _form(request)
        if form is None:
            raise self.refuse(400, "malformed form body (a field given twice, or not UTF-8)")
        signature = request.getHeader(b"Signature")
        if not self.secret:
            log.error("webhook refused: [zadarma] secret (ZADARMA_SECRET) is not configured")
            raise self.refuse(401, "signature cannot be checked")
        header = signature.decode("latin-1") if signature else None
        if not verify_webhook(self.secret.reveal(), form, header):
            raise self.refuse(401, "missing or wrong Signature")
        try:
            parsed = parse_event(form)
        except BadEvent as error:
            raise self.refuse(400, str(error)) from None
        if isinstance(parsed, UnknownEvent):
            self.counters.unknown += 1
            log.info("Zadarma event {kind!r} is not one dpvoip records; answered 200",
                     kind=parsed.kind)
            return b""
        try:
            outcome = await self.recorder.submit_zadarma(parsed, form, self._context.current())
        except NotRecorded as error:
            raise self.refuse(503, str(error)) from None
        if outcome.duplicate:
            self.counters.duplicates += 1
        else:
            self.counters.recorded += 1
        if parsed.kind in ("NOTIFY_START", "NOTIFY_IVR"):
            return self.answer(request, outcome)
        return b""

    def answer(self, request: IRequest, outcome: ZadarmaOutcome) -> bytes:
        """What changes the live call: the caller's name on the phones."""
        reply: dict[str, Any] = {}
        if self.caller_name and outcome.match is not None and outcome.match.display_name:
            reply["caller_name"] = outcome.match.display_name[:64]
        if outcome.owner_extension:
            reply["redirect"] = outcome.owner_extension
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(reply, ensure_ascii=False).encode("utf-8")


def _form(request: IRequest) -> dict[str, str] | None:
    """The form as text, one value per field; None when it cannot be read as one."""
    form: dict[str, str] = {}
    for key, values in request.args.items():
        if len(values) != 1:
            return None
        try:
            form[key.decode("utf-8")] = values[0].decode("utf-8")
        except UnicodeDecodeError:
            return None
    return form


class WebhookResource:
    """``POST /voip/zd/``, its one route: the event handled, then the answer (or the error,
    in the JSON shape of every other route) written with its length. Served in front of
    Klein (see ``dpvoip.web.app``). A client that hung up gets nothing; its event is still
    recorded (the ingest does not stop for it). Without a webhook wired, a 404."""

    def __init__(self, webhook: ZadarmaWebhook | None) -> None:
        self._webhook = webhook

    def render(self, request: IRequest) -> int | bytes:
        if self._webhook is None:
            return error_answer(request, HttpError(404, NOT_CONFIGURED))
        gone: list[bool] = []
        finished: Deferred[None] = request.notifyFinish()  # type: ignore[attr-defined]
        finished.addErrback(lambda _: gone.append(True))

        def answered(body: bytes) -> None:
            if not gone:
                _send(request, body)

        def failed(failure: Failure) -> None:
            body = failure_answer(request, failure)  # logged even if nobody is listening
            if not gone:
                _send(request, body)

        Deferred.fromCoroutine(self._webhook.event(request)).addCallbacks(answered, failed)
        return NOT_DONE_YET


def _send(request: IRequest, body: bytes) -> None:
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


#: The methods a Zadarma webhook URL answers (any other: 405 naming them).
ENDPOINT_METHODS = (b"GET", b"HEAD", b"POST")


@implementer(IResource)
class ZadarmaEndpoint:
    """A Zadarma provider's webhook URL (``/voip/zd/<name>/``) as one leaf resource: the
    echo (GET, HEAD), the events (POST, as ``WebhookResource``), 405 for other methods
    and 404 below it; errors in the one JSON shape."""

    isLeaf = True

    def __init__(self, webhook: ZadarmaWebhook, path: bytes) -> None:
        self.webhook = webhook
        self._paths = (path.rstrip(b"/") + b"/", path.rstrip(b"/"))
        self._events = WebhookResource(webhook)

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self  # a leaf: never asked

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("a webhook URL has no children")

    def render(self, request: IRequest) -> int | bytes:
        if request.path not in self._paths:
            return error_answer(request, HttpError(404, "no such resource"))
        if request.method == b"POST":
            return self._events.render(request)
        if request.method in (b"GET", b"HEAD"):
            try:
                return self.webhook.echo(request)
            except HttpError as error:
                return error_answer(request, error)
        method = request.method.decode("ascii", "replace")
        return error_answer(request, HttpError(
            405, f"method {method} not allowed here",
            {"Allow": ", ".join(m.decode() for m in ENDPOINT_METHODS)}))
