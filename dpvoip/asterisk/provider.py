"""Asterisk as a provider kind: a ``[[provider]]`` table with ``kind = "asterisk"`` made
into its manager connection, its dialler and what it tells ``/readyz``, ``/metrics`` and
``dpvoip check``.

The parts were built before there were providers (``asterisk.service``: the PBX, its
service, ``Originate``; ``asterisk.calls``: the follower); this module composes them for
the composition root, as ``zadarma.provider`` does Zadarma's:

- ``services``: the manager connection (connected at once, whether the database is there
  or not: its happenings go to the durable recorder, which spools them), then, once the
  last run's spool is replayed and the PBX's channels listed (``LeftOpenCalls``), the
  calls the last run left open for this PBX closed as interrupted (restarted), only those
  begun before this process started and that the PBX no longer has, as a Fritz!Box's
  are;
- ``origins``: the PBX's one origin (its name, its country, the CRM's sales side on), so
  that the spool's replay applies a spooled Asterisk happening as the PBX would have;
- ``dialler``: ``Originate`` (``asterisk.dialling``);
- ``recordings``: none. Asterisk keeps its recordings on the PBX (``MixMonitor`` files)
  and dpvoip does not fetch them: a call of the PBX has no recording id, so the CRM's
  recording link answers "this call has no recording"; ``/readyz`` and ``dpvoip check``
  say so;
- ``health``: connected, logged in, the last error (a refused login names the user,
  never the secret), the counters; a warning while it is not logged in;
- ``metrics``: ``dpvoip_asterisk_*`` families, one series per PBX (label ``provider``).

The name of the table is the PBX's name (``AsteriskSettings.name``): its calls' ids are
``ast-<name>-<Linkedid>``. Heavy imports (the AMI client, Twisted's services) wait for
``build``: a configuration is read and checked without them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger

from dpvoip.asterisk.dialling import AsteriskDialler
from dpvoip.asterisk.settings import AsteriskSettings, read_settings
from dpvoip.core.errors import summary
from dpvoip.core.outcomes import Reason
from dpvoip.providers.interface import Provider, ProviderHealth, ProviderTools

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from dpvoip.asterisk.service import AsteriskPbx, AsteriskService

log = Logger(namespace="dpvoip.asterisk")

#: What a PBX's calls have in place of a recording, as ``/readyz`` and check say it.
NO_RECORDINGS = "none: Asterisk keeps its recordings on the PBX; dpvoip does not serve them"


@runtime_checkable
class ClosesLeftOpen(Protocol):
    """The durable recorder's way to close the calls a source's last run left open
    (``spool.durable.DurableIngest.close_open_calls``)."""

    async def close_open_calls(self, box: str, reason: Reason, at: datetime,
                               started_before: datetime | None = None,
                               keep: Collection[str] = ()) -> int: ...


@dataclass(frozen=True, kw_only=True)
class AsteriskProvider(Provider):
    """A built Asterisk provider, and what tests look into."""

    pbx: AsteriskPbx
    client: AsteriskService
    left_open: LeftOpenCalls | None


class AsteriskKind:
    """The ``asterisk`` kind (entry point ``dpvoip.providers: asterisk``)."""

    kind = "asterisk"

    def read_settings(self, table: Mapping[str, Any], where: str) -> AsteriskSettings:
        # The table's name is the provider's (the configuration took it out): it is put
        # in the settings at build, and the errors start with ``where``, which names it.
        return read_settings(table, where)

    def check_lines(self, name: str, settings: AsteriskSettings) -> list[str]:
        """Its configuration, then one login as it says (``asterisk.probe``)."""
        from dpvoip.asterisk.probe import look

        settings = replace(settings, name=name)
        link = "TLS" if settings.tls else "plain TCP"
        looked = look(settings, settings.action_timeout_seconds)
        state = looked.text if looked.ok else f"NOT LOGGED IN: {looked.text}"
        return [
            f"provider {name} (Asterisk): AMI at {_address(settings)} ({link}, "
            f"{settings.auth} login): {state}",
            f"provider {name} (Asterisk): calls recorded as ast-{name}-<Linkedid>; "
            f"click-to-call rings {settings.originate_technology}/<extension>, then the "
            f"number in {settings.originate_context}; recordings: {NO_RECORDINGS}",
        ]

    def build(self, name: str, settings: AsteriskSettings,
              tools: ProviderTools) -> AsteriskProvider:
        from dpvoip.asterisk.service import AsteriskPbx, AsteriskService, Dialler

        settings = replace(settings, name=name)
        reactor = tools.reactor
        pbx = AsteriskPbx(settings, tools.recorder, reactor)
        client = AsteriskService(pbx, reactor)
        recorder = tools.recorder
        left_open = (LeftOpenCalls(name, recorder, tools.spool_replayed, reactor,
                                   pbx.listed_once, pbx.follower.followed_calls)
                     if isinstance(recorder, ClosesLeftOpen) else None)
        dialler = AsteriskDialler(name, Dialler(pbx), settings.country,
                                  settings.originate_number)
        return AsteriskProvider(
            name=name, kind=self.kind,
            services=(client,) if left_open is None else (client, left_open),
            dialler=dialler, origins=(pbx.origin,),
            health=lambda: health(pbx), metrics=lambda: metrics(pbx),
            pbx=pbx, client=client, left_open=left_open)


KIND = AsteriskKind()


def _address(settings: AsteriskSettings) -> str:
    host = settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{settings.port}"


def health(pbx: AsteriskPbx) -> ProviderHealth:
    """The PBX's ``/readyz`` entry; a warning while it is not logged in (after its
    first attempt: a PBX still connecting at start is not yet a problem)."""
    status = pbx.status
    follower = pbx.follower.counters
    details = status.as_json(pbx.follower.open_calls,
                             (follower.cdr_confirmed, follower.cdr_disagreed))
    details.pop("name", None)  # /readyz puts the provider's name first
    details["recordings"] = NO_RECORDINGS
    warnings: tuple[str, ...] = ()
    if not status.logged_in and status.last_error:
        warnings = (f"not logged in to the PBX at {pbx.address}: {status.last_error} "
                    "(dpvoip keeps trying)",)
    return ProviderHealth(details, warnings)


def metrics(pbx: AsteriskPbx) -> Iterator[Metric]:
    """The PBX's figures, labelled with its name (families merged across PBXs)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    status = pbx.status
    label = [pbx.settings.name]

    def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, text, labels=["provider"])
        family.add_metric(label, value)
        return family

    def counter(name: str, text: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, text, labels=["provider"])
        family.add_metric(label, value)
        return family

    yield gauge("dpvoip_asterisk_connected",
                "1 while dpvoip is connected to the PBX's AMI and logged in.",
                int(status.connected and status.logged_in))
    yield counter("dpvoip_asterisk_logins_failed",
                  "Logins the PBX refused (wrong user or secret, a host it does not permit).",
                  status.login_failures)
    yield counter("dpvoip_asterisk_events", "AMI events received.", status.events)
    yield gauge("dpvoip_asterisk_open_calls", "Calls followed and not ended yet.",
                pbx.follower.open_calls)
    yield counter("dpvoip_asterisk_calls_evicted",
                  "Calls closed as interrupted because more than max_open_calls calls (or "
                  "max_channels channels) were followed at once.", status.calls_evicted)
    yield counter("dpvoip_asterisk_reconnects", "Connections lost and made again.",
                  status.reconnects)
    across = CounterMetricFamily(
        "dpvoip_asterisk_reconnect_calls",
        "Calls across a reconnect: followed when the connection went and followed on after "
        "it (the PBX still had them) or closed as interrupted; begun while it was down and "
        "adopted from the PBX's list of channels.", labels=["provider", "what"])
    across.add_metric([*label, "resumed"], status.calls_resumed)
    across.add_metric([*label, "closed"], status.orphans_closed)
    across.add_metric([*label, "adopted"], status.calls_adopted)
    yield across
    troubles = CounterMetricFamily(
        "dpvoip_asterisk_troubles", "What went wrong with the PBX and was handled.",
        labels=["provider", "what"])
    for what, count in (("refused_messages", status.refused_messages),
                        ("peer_failures", status.peer_failures),
                        ("not_recorded", status.not_recorded)):
        troubles.add_metric([*label, what], count)
    yield troubles
    originate = CounterMetricFamily(
        "dpvoip_asterisk_originate", "Click-to-call requests sent to the PBX, by outcome.",
        labels=["provider", "outcome"])
    for outcome, count in (("queued", status.originated),
                           ("refused", status.originate_refused),
                           ("phone_unanswered", status.originate_unanswered)):
        originate.add_metric([*label, outcome], count)
    yield originate


#: How long the calls left open wait for the PBX's first list of channels (it says which
#: of them are still going on) before they are closed all the same.
LISTING_WAIT_SECONDS = 30.0


class LeftOpenCalls(Service):
    """Once the last run's spool is replayed, close the calls it left open for this PBX
    (begun before this process: ``born``, taken when the provider is built at start).
    A new connection's calls are this run's; a call the spool still held has just been
    replayed, so its end, if it came, is in.

    A call the PBX still has is not closed: the first login lists the PBX's channels and
    the follower adopts its calls (``CallFollower.adopt``), so such a call is followed to
    its real end. The close waits for that list (``listed``) at most
    ``LISTING_WAIT_SECONDS``: a PBX out of reach then has its calls closed as before."""

    def __init__(self, name: str, recorder: ClosesLeftOpen,
                 replayed: Callable[[], Deferred[None]], clock: Any,
                 listed: Callable[[], Deferred[None]],
                 followed: Callable[[], Collection[str]]) -> None:
        self.name = f"asterisk {name}: calls left open"
        self._pbx = name
        self._recorder = recorder
        self._replayed = replayed
        self._clock = clock
        self._listed = listed
        self._followed = followed
        self._waiting: Deferred[None] | None = None  # for the first list, until it is in
        self.born = self._now()
        self.closed: Deferred[int] | None = None  # how many were closed, once started

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def startService(self) -> None:
        super().startService()
        if self.closed is not None:
            return
        self.closed = self._replayed().addCallback(
            lambda _: Deferred.fromCoroutine(self._close()))

    def stopService(self) -> None:
        super().stopService()
        if self._waiting is not None:
            self._waiting.cancel()

    async def _close(self) -> int:
        listed = self._waiting = self._listed()
        listed.addTimeout(LISTING_WAIT_SECONDS, self._clock)
        try:
            await listed
        except TimeoutError:
            log.info("pbx {pbx}: its channels were not listed within {seconds:.0f} s; "
                     "the calls the last run left open are closed as interrupted",
                     pbx=self._pbx, seconds=LISTING_WAIT_SECONDS)
        except CancelledError:
            return 0  # stopped meanwhile: they stay for the next run
        finally:
            self._waiting = None
        if not self.running:
            return 0
        try:
            closed = await self._recorder.close_open_calls(
                self._pbx, Reason.RESTARTED, self._now(), self.born, self._followed())
        except Exception as error:  # the database went away: they stay for next time
            log.warn("pbx {pbx}: could not close the calls left open: {error}",
                     pbx=self._pbx, error=summary(error))
            return 0
        if closed:
            log.info("pbx {pbx}: closed {n} calls left open by the last run",
                     pbx=self._pbx, n=closed)
        return closed


__all__ = ["KIND", "NO_RECORDINGS", "AsteriskKind", "AsteriskProvider", "LeftOpenCalls"]
