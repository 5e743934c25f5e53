"""``echo``: a provider kind written outside dpvoip, the way a third party writes one.

One package, found through its entry point (``dpvoip.providers: echo``, declared in the
``dpvoip_echo_provider-1.0.dist-info`` beside it), using only dpvoip's provider interface
and the ingest's public records:

- ``POST /voip/<name>/`` (``Authorization: Bearer <token>``) with a JSON body
  ``{"event": "start", "call": "7", "number": "6912345678"}`` or
  ``{"event": "end", "call": "7", "outcome": "missed", "duration": 0}``: the call's
  ``Started`` or ``Ended`` through the durable recorder, answered once it is recorded;
  ``GET /voip/<name>/`` says how many requests it took.
- click-to-call: every dial is kept in ``EchoDialler.dialled`` (nothing rings); a
  number ending in 0 is refused as a real provider refuses.
- ``[[provider]] kind = "echo"``: ``token`` (a secret, required), ``direction``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from dpvoip.calls.ingest import Origin
from dpvoip.config import ConfigError, Secret, read_section, setting
from dpvoip.core.happenings import Ended, Started
from dpvoip.core.outcomes import Outcome
from dpvoip.providers import (
    DialRequest,
    Provider,
    ProviderError,
    ProviderHealth,
    ProviderTools,
    Recorder,
    WebPart,
)


@dataclass(frozen=True)
class EchoSettings:
    token: Secret = setting(Secret(""), "Bearer token the echo resource wants.")
    direction: str = setting(
        "incoming", "Direction of the calls it reports.",
        lambda value: None if value in ("incoming", "outgoing")
        else "must be 'incoming' or 'outgoing'")


class EchoRefused(ProviderError):
    status = 409


class EchoDialler:
    def __init__(self) -> None:
        self.dialled: list[DialRequest] = []

    def refusal(self, call: DialRequest) -> str | None:
        return None if call.ring_first.isdigit() else "echo rings digits only"

    async def dial(self, call: DialRequest) -> None:
        if call.number.endswith("0"):
            raise EchoRefused("echo refuses numbers ending in 0")
        self.dialled.append(call)


@implementer(IResource)
class EchoResource:
    isLeaf = True

    def __init__(self, name: str, settings: EchoSettings, recorder: Recorder, origin: Origin,
                 clock: Any) -> None:
        self._path = f"/voip/{name}/".encode()
        self._settings = settings
        self._recorder = recorder
        self._origin = origin
        self._clock = clock
        self.requests = 0
        self.unauthorised = 0

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError

    def render(self, request: IRequest) -> int | bytes:
        self.requests += 1
        request.setHeader(b"Content-Type", b"application/json")
        if request.path.rstrip(b"/") + b"/" != self._path:
            request.setResponseCode(404)
            return b'{"error": "no such resource"}'
        if request.method == b"GET":
            return json.dumps({"provider": self._origin.name,
                               "requests": self.requests}).encode()
        wanted = b"Bearer " + self._settings.token.reveal().encode()
        if request.getHeader(b"Authorization") != wanted:
            self.unauthorised += 1
            request.setResponseCode(401)
            return b'{"error": "wrong token"}'
        try:
            body = json.loads(request.content.read())
            call_id = f"echo-{self._origin.name}-{body['call']}"
            happening = self._happening(call_id, body)
        except (ValueError, KeyError, TypeError):
            request.setResponseCode(400)
            return b'{"error": "not an echo event"}'

        def answer(_: None) -> None:
            request.write(json.dumps({"call_id": call_id}).encode())
            request.finish()

        def failed(failure: Failure) -> None:
            request.setResponseCode(503)
            request.write(json.dumps({"error": failure.getErrorMessage()}).encode())
            request.finish()

        self._recorder.submit(happening, self._origin).addCallbacks(answer, failed)
        return NOT_DONE_YET

    def _happening(self, call_id: str, body: Mapping[str, Any]) -> Started | Ended:
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        if body["event"] == "start":
            return Started(call_id, self._origin.name, 0, self._settings.direction,
                           str(body["number"]), "", "", None, now)
        if body["event"] == "end":
            return Ended(call_id, Outcome(body["outcome"]), int(body.get("duration", 0)),
                         now, None)
        raise ValueError(body["event"])


class EchoKind:
    kind = "echo"

    def read_settings(self, table: Mapping[str, Any], where: str) -> EchoSettings:
        settings = read_section(EchoSettings, table, where)
        if not settings.token:
            raise ConfigError(f"{where} token: must be set (the bearer token it wants)")
        return settings

    def check_lines(self, name: str, settings: EchoSettings) -> list[str]:
        return [f"provider {name} (echo): events at /voip/{name}/, {settings.direction}"]

    def build(self, name: str, settings: EchoSettings, tools: ProviderTools) -> Provider:
        origin = Origin(name, tools.region, source="echo")
        resource = EchoResource(name, settings, tools.recorder, origin, tools.reactor)

        def health() -> ProviderHealth:
            wrong = resource.unauthorised
            return ProviderHealth({"requests": resource.requests},
                                  (f"{wrong} requests with a wrong token",) if wrong else ())

        def metrics() -> Iterator[Metric]:
            family = CounterMetricFamily("dpvoip_echo_requests", "Echo requests.",
                                         labels=["provider"])
            family.add_metric([name], resource.requests)
            yield family

        return Provider(name=name, kind=self.kind, web=(WebPart(name, resource),),
                        dialler=EchoDialler(), origins=(origin,), health=health,
                        metrics=metrics)


KIND = EchoKind()

__all__ = ["KIND", "EchoDialler", "EchoKind", "EchoSettings"]
