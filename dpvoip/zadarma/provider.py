"""Zadarma as a provider kind: the ``[zadarma]`` section, or a ``[[provider]]`` table
with ``kind = "zadarma"``, made into its webhook, its account service and its dialling.

This module composes Zadarma's parts for the composition root, as ``service.py`` did
before providers were plugins, and changes nothing in how they behave. The webhook of
the provider named ``zadarma`` (the ``[zadarma]`` section's) is ``/voip/zd/``; another
Zadarma provider's, named N, is ``/voip/zd/N/``. Each has its own secret, allow-list,
API client (its own connection pool, closed when its account service stops) and account
zone. The heavy imports wait for ``build``: a configuration is read (and this kind's
settings checked) without importing the web, the ingest or treq.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from dpvoip.config import ZadarmaSettings, read_section
from dpvoip.providers.interface import Provider, ProviderHealth, ProviderTools, WebPart

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from dpvoip.calls.ingest import ZadarmaContext
    from dpvoip.web.zadarma import CurrentZadarmaContext, ZadarmaWebhook
    from dpvoip.zadarma.account import ZadarmaAccountService

#: The name of the ``[zadarma]`` section's provider: its webhook keeps ``/voip/zd/``.
MAIN = "zadarma"


def webhook_path(name: str) -> str:
    """Where the provider ``name``'s webhook is served, under ``/voip/``."""
    return "zd" if name == MAIN else f"zd/{name}"


@dataclass(frozen=True, kw_only=True)
class ZadarmaProvider(Provider):
    """A built Zadarma provider, and what tests and the spool's replay look into."""

    webhook: ZadarmaWebhook
    account: ZadarmaAccountService
    context: CurrentZadarmaContext


class ZadarmaKind:
    """The ``zadarma`` kind (entry point ``dpvoip.providers: zadarma``)."""

    kind = "zadarma"

    def read_settings(self, table: Mapping[str, Any], where: str) -> ZadarmaSettings:
        return read_section(ZadarmaSettings, table, where)

    def check_lines(self, name: str, settings: ZadarmaSettings) -> list[str]:
        url = f"/voip/{webhook_path(name)}/"
        webhook = (f"webhooks at {url} from {', '.join(settings.allowed_networks)}"
                   if settings.secret else
                   f"webhooks at {url} REFUSED (401): no secret (ZADARMA_SECRET)")
        api = ("API keys set (click-to-call, recordings" +
               (", the account's zone asked at start)" if not settings.timezone else ")")
               if settings.key and settings.secret
               else "no API keys: click-to-call through it answers 503")
        zone = settings.timezone or "the account's (asked), else [crm] timezone"
        return [f"provider {name} (Zadarma): {webhook}; {api}; call times in {zone}"]

    def build(self, name: str, settings: ZadarmaSettings,
              tools: ProviderTools) -> ZadarmaProvider:
        from treq.client import HTTPClient

        from dpvoip.calls.ingest import ZadarmaContext, guard_rules
        from dpvoip.web.sources import networks
        from dpvoip.web.zadarma import (
            CurrentZadarmaContext,
            Recorder,
            ZadarmaEndpoint,
            ZadarmaWebhook,
        )
        from dpvoip.zadarma.account import ZadarmaAccountService, http_pool_and_agent
        from dpvoip.zadarma.api import ZadarmaApi, base_url
        from dpvoip.zadarma.dialling import ZadarmaDialler, ZadarmaRecordings

        recorder = tools.recorder
        if not isinstance(recorder, Recorder):
            raise TypeError("a Zadarma provider records through the durable ingest's "
                            "submit_zadarma")
        reactor = tools.reactor
        # How the account's events are read: made before the webhook that reads it and
        # the account service that learns the account's zone into it.
        context = CurrentZadarmaContext(ZadarmaContext(
            tools.region,
            ZoneInfo(settings.timezone) if settings.timezone else tools.office_zone,
            tickets=settings.create_tickets,
            redirect_to_owner=settings.redirect_to_owner,
            guard=guard_rules(settings),
            provider=name,
        ))
        http_pool, agent = http_pool_and_agent(reactor, settings.api_ca_file,
                                               settings.api_timeout)
        api = ZadarmaApi(HTTPClient(agent), reactor, settings.key.reveal(),
                         settings.secret.reveal(),
                         base_url(settings.api_url, settings.sandbox),
                         settings.api_timeout, settings.api_requests_per_minute)
        account = ZadarmaAccountService(api, http_pool, reactor, tools.office_zone,
                                        learn_zone=not settings.timezone,
                                        on_zone=context.learn_zone)
        webhook = ZadarmaWebhook(
            recorder=recorder,
            context=context,
            secret=settings.secret,
            allowlist=networks(settings.allowed_networks),
            proxies=tools.trusted_proxies,
            caller_name=settings.caller_name,
            clock=reactor,
        )
        path = webhook_path(name)

        def health() -> ProviderHealth:
            return ProviderHealth({
                "webhook": f"/voip/{path}/", "webhook_secret": bool(settings.secret),
                "api_keys": api.configured,
                "account_zone": account.zone_stated or settings.timezone or None,
            })

        def metrics() -> Iterator[Metric]:
            from dpvoip.metrics import webhook_families

            # The [zadarma] section's series as they always were; another's labelled.
            yield from webhook_families(webhook.counters, "" if name == MAIN else name)

        return ZadarmaProvider(
            name=name, kind=self.kind, services=(account,),
            web=(WebPart(path, ZadarmaEndpoint(webhook, f"/voip/{path}/".encode()),
                         tuple(settings.allowed_networks)),),
            dialler=ZadarmaDialler(api), recordings=ZadarmaRecordings(api),
            health=health, metrics=metrics,
            webhook=webhook, account=account, context=context)


KIND = ZadarmaKind()


class SpoolContext:
    """How the spool's replay reads Zadarma's spooled events: as the Zadarma provider
    whose webhook each came to reads them now (its account's zone, guard and tickets).

    A record from before dpvoip kept the provider, or of a provider no longer configured,
    is read as the provider named ``zadarma`` reads them (else the first Zadarma provider;
    else ``default``). Made before the spool (which the providers are built after) and
    pointed at the providers once they are built."""

    def __init__(self, default: ZadarmaContext) -> None:
        self._default = default
        self._followed: dict[str, CurrentZadarmaContext] = {}
        self._main: CurrentZadarmaContext | None = None

    def follow(self, built: Sequence[Provider]) -> None:
        zadarma = [p for p in built if isinstance(p, ZadarmaProvider)]
        self._followed = {p.name: p.context for p in zadarma}
        main = [p for p in zadarma if p.name == MAIN] or zadarma
        self._main = main[0].context if main else None

    def current(self, provider: str | None = None) -> ZadarmaContext:
        followed = self._followed.get(provider) if provider is not None else None
        followed = followed or self._main
        return followed.current() if followed is not None else self._default


def main_provider(built: Sequence[Provider]) -> ZadarmaProvider | None:
    """The ``[zadarma]`` section's provider (named ``zadarma``), when there is one."""
    return next((p for p in built if isinstance(p, ZadarmaProvider) and p.name == MAIN),
                None)
