"""The composition root: ``makeService(config)`` builds and wires every service.

``build`` reads top to bottom: each object is made after everything it needs, and handed
what it needs; no object refers to one made after it. Where two need to hear each other
(the pool and the service that prepares the schema; the spool's replay and the Zadarma
provider whose context reads the spooled events), a small object made before both carries
the news (``Reconnections``, ``SpoolContext``). The prepared schema is one explicit
signal (a ``OneShotObserver``) given to everything that waits for it.

The telephony providers (Zadarma, plugins: ``dpvoip.providers``) are built from the
configuration's list by their kinds; their services start after the boxes, before the
web, their web parts, diallers and figures are wired like the rest.

The code of a part the configuration does not use is not imported (it would stay in the
daemon's memory for nothing): the Fritz!Boxes' wiring (``fritzbox/assembly.py``) only when
a box is configured, a box's call list only with its TR-064 user, Asterisk's modules (a
provider kind found by entry point) only when such a provider is, the CRM's Redis client
only with its URL. Zadarma's stay: the spool's replay reads its events whatever is
configured now.

Nothing else in dpvoip reaches for the reactor or a global: it is handed in from here.
Services start in order (database, Fritz!Boxes and their call lists, the providers', the
CRM's Redis when its sessions are there, web) and stop in the reverse order, each waiting
for the one before: stop accepting HTTP and let requests in flight finish their writes,
close the Redis connection, the providers' connections, drop the Fritz!Box connections,
drain and close the pool, stop the embedded PostgreSQL. The services themselves live in
``dpvoip.services``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from twisted.internet import threads

from dpvoip import __version__, metrics
from dpvoip.calls.ingest import Ingest, Origin, ZadarmaContext
from dpvoip.click_to_call.callbacks import ClickToCall
from dpvoip.click_to_call.logins import Logins
from dpvoip.config import Config, ZadarmaSettings, instance_name
from dpvoip.core.dialling_policy import DiallingPolicy
from dpvoip.core.numbers import Dialling, normalise
from dpvoip.core.texts import Texts
from dpvoip.crm.redis_sessions import parse_redis_url
from dpvoip.crm.schema import CrmCapabilities
from dpvoip.deferreds import OneShotObserver
from dpvoip.embedded_watch import EmbeddedWatch
from dpvoip.hangup import stop_on_hangup
from dpvoip.legacy_monitor.service import (
    LEGACY_STATE,
    LegacyMonitor,
    LegacyMonitorCollector,
    LegacyMonitorService,
    monitor_origin,
)
from dpvoip.live.hub import Hub
from dpvoip.live.listener import LiveFeed
from dpvoip.live.service import LiveService
from dpvoip.live.service import exposition as live_exposition
from dpvoip.providers.assembly import ProvidersCollector, build_all, choice, senders
from dpvoip.providers.interface import Provider, ProviderTools
from dpvoip.readiness import ReadinessReport
from dpvoip.services import (
    DatabaseService,
    DirectoryService,
    EmbeddedPostgresService,
    ExitStatus,
    JournalRetentionService,
    OrderedServices,
    Reconnections,
    StatisticsService,
)
from dpvoip.spool.durable import DurableIngest, DurableService, replay_lanes
from dpvoip.spool.journal import AsyncSpool, Spool
from dpvoip.state_folder import InstanceLock, InstanceLockService, lock_or_exit
from dpvoip.store.accounts import Accounts
from dpvoip.store.callbacks import CallbackRecords
from dpvoip.store.database import Store
from dpvoip.store.directory import DirectoryIndex
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.embedded import EmbeddedPostgres
from dpvoip.store.legacy_monitor import SOURCE as LEGACY_SOURCE
from dpvoip.store.legacy_monitor import LegacyMonitorRows
from dpvoip.store.live import ListenConnection, LiveEvents
from dpvoip.store.live_page import LivePageReads
from dpvoip.store.migrations import SchemaReport
from dpvoip.store.pool import HealingPool
from dpvoip.store.privileges import PrivilegeCheck
from dpvoip.store.session_cache import RedisSessionCache, RedisSessionService
from dpvoip.store.statistics import PlannerStatistics
from dpvoip.store.zadarma_journal import ZadarmaJournal
from dpvoip.web.app import WebApp
from dpvoip.web.callback import CallbackPages
from dpvoip.web.events import EventStreams
from dpvoip.web.legacy_monitor import LegacyMonitorResource
from dpvoip.web.live_page import LivePages
from dpvoip.web.server import DpvoipSite, WebService
from dpvoip.web.sources import networks
from dpvoip.web.zadarma import ZadarmaWebhook
from dpvoip.zadarma.account import ZadarmaAccountService
from dpvoip.zadarma.provider import SpoolContext, ZadarmaProvider, main_provider
from dpvoip.zadarma.retention import journal_kept, kept_days

if TYPE_CHECKING:  # imported by the build only when a box is configured
    from dpvoip.fritzbox.box import FritzBox
    from dpvoip.fritzbox.service import BoxLeadership


class Daemon:
    """The wired daemon: what tests and the command line may look into."""

    def __init__(
        self,
        service: OrderedServices,
        store: Store,
        web: WebService,
        exit_status: ExitStatus,
        embedded: EmbeddedPostgres | None,
        directory: DirectoryIndex,
        ingest: Ingest,
        boxes: list[FritzBox],
        providers: list[Provider],
        durable: DurableIngest,
        spooler: DurableService,
        schema: OneShotObserver[SchemaReport],
        sessions: RedisSessionCache | None = None,
        live: LiveService | None = None,
    ) -> None:
        self.service = service
        self.store = store
        self.web = web
        self.exit_status = exit_status
        self.embedded = embedded
        self.directory = directory
        self.ingest = ingest
        self.boxes = boxes
        self.providers = {provider.name: provider for provider in providers}
        self.durable = durable
        self.spooler = spooler
        self.schema = schema
        self.sessions = sessions  # the CRM's sessions in Redis, when configured
        self.live = live  # the live events: LISTEN, feed, hub

    @property
    def zadarma(self) -> ZadarmaWebhook:
        """The ``[zadarma]`` section's webhook (``/voip/zd/``)."""
        return self._zadarma().webhook

    @property
    def account(self) -> ZadarmaAccountService:
        """The ``[zadarma]`` section's account service (its API client, its zone)."""
        return self._zadarma().account

    def _zadarma(self) -> ZadarmaProvider:
        main = main_provider(list(self.providers.values()))
        if main is None:
            raise LookupError("no Zadarma provider named 'zadarma' is configured")
        return main


def own_numbers(config: Config) -> list[str]:
    """Every number the office owns: never matched to a CRM record."""
    numbers = list(config.directory.own_numbers)
    for box in config.fritzbox:
        where = Dialling(box.country, box.area_code)
        numbers.extend(n for n in (normalise(raw, where) for raw in box.own_numbers) if n)
    return numbers


def build(config: Config, reactor: Any = None, base: Path | None = None,
          lock: InstanceLock | None = None) -> Daemon:
    """Wire every service from ``config``, each object after what it needs.

    The order children are added to ``top`` is the order they start in (and the reverse
    of the order they stop in): the state folder's ``lock`` (when given: the process
    holds it) first and released last, then the database, the web last.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    base = base or Path.cwd()
    exit_status = ExitStatus(reactor)
    top = OrderedServices(exit_status)
    top.setName("dpvoip")
    if lock is not None:
        InstanceLockService(lock).setServiceParent(top)

    # -- the database ----------------------------------------------------------------------
    embedded: EmbeddedPostgres | None = None
    if config.embedded:
        embedded = EmbeddedPostgres(config.state_path(base) / "pg")
        EmbeddedPostgresService(reactor, embedded).setServiceParent(top)
        EmbeddedWatch(reactor, embedded, lambda work: threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), work)).setServiceParent(top)
        dsn = connection_dsn(embedded.dsn(), config.database)
    else:
        dsn = connection_dsn(config.database.url.reveal(), config.database)
    reconnections = Reconnections()
    pool = HealingPool(reactor, dsn, config.database.pool_size,
                       config.database.connect_timeout, on_reconnect=reconnections.notify)
    store = Store(pool, reactor)
    if not config.standalone:  # the CRM's grants, named before the schema is prepared
        PrivilegeCheck(reactor, dsn, config.database.crm_schema,
                       config.database.connect_timeout, store, reconnections.subscribe,
                       exit_status.fatal).setServiceParent(top)
    schema: OneShotObserver[SchemaReport] = OneShotObserver()
    database = DatabaseService(store, config, exit_status, schema, reconnections, reactor)
    database.setServiceParent(top)

    # -- the phone directory, then recording calls (the ingest, made durable by the spool) --
    region = Dialling(config.directory.region)
    index = DirectoryIndex(
        store, config.database.crm_schema, region,
        own_numbers=own_numbers(config), page_size=config.directory.page_size,
        margin_seconds=config.directory.margin_seconds,
    )
    directory = DirectoryService(index, config.directory, reactor, database.when_prepared)
    directory.setServiceParent(top)
    StatisticsService(PlannerStatistics(store, config.database.crm_schema), reactor,
                      database.when_prepared).setServiceParent(top)

    texts = Texts(config.crm.language, config.crm.withheld_label)
    ingest = Ingest(store, index, texts, config.tickets,
                    ZoneInfo(config.crm.timezone), schema, reactor, config.database.crm_schema)
    spool = AsyncSpool(Spool(config.state_path(base) / "spool",
                             max_bytes=config.spool.max_mb * 1024 * 1024,
                             alarm_ratio=config.spool.alarm_percent / 100), reactor)
    # How the spool's replay reads Zadarma's spooled events: as the Zadarma provider
    # (built below) reads them; made before both.
    office_zone = ZoneInfo(config.crm.timezone)
    zadarma_replay = SpoolContext(ZadarmaContext(region, office_zone))
    own = frozenset(index.own_numbers)
    # Where spooled happenings come from, by name: the boxes, the old monitor and, once
    # they are built (before anything starts), the providers' origins.
    origins: dict[str, Origin] = {}
    if config.fritzbox:  # the boxes' code is imported only when the configuration has one
        from dpvoip.fritzbox.assembly import box_origins

        origins.update(box_origins(config.fritzbox, own))
    origins[LEGACY_SOURCE] = monitor_origin(region)  # the old monitor's calls (issue 15)
    durable = DurableIngest(ingest, spool, store, schema, reactor, origins,
                            zadarma_replay.current, config.directory.region,
                            deadline=config.spool.deadline_seconds,
                            lanes=replay_lanes(config.database.pool_size),
                            connections=config.database.pool_size)
    spooler = DurableService(durable, spool, reactor, database.when_prepared)
    spooler.setServiceParent(top)
    legacy = LegacyMonitor(config.legacy_monitor.token.reveal(), office_zone, region, own,
                           durable, LegacyMonitorRows(store, config.database.crm_schema),
                           reactor, lambda: schema.fired, deadline=config.spool.deadline_seconds)
    LegacyMonitorService(legacy, spool, database.when_prepared, reactor,
                         config.state_path(base) / LEGACY_STATE).setServiceParent(top)

    # -- the Fritz!Boxes (fritzbox/assembly.py) ------------------------------------------
    boxes: list[FritzBox] = []
    leadership: BoxLeadership | None = None
    if config.fritzbox:
        from dpvoip.fritzbox.assembly import BoxNeeds, wire_boxes

        wired = wire_boxes(config.fritzbox, BoxNeeds(
            reactor=reactor, recorder=durable, store=store, ingest=ingest, texts=texts,
            own=own, crm_schema=config.database.crm_schema,
            capabilities=lambda: crm_capabilities(schema), replayed=spooler.when_replayed,
            prepared=database.when_prepared, dsn=dsn, instance=instance_name(config, base),
            connect_timeout=config.database.connect_timeout), top)
        boxes, leadership = wired.boxes, wired.leadership

    # -- the telephony providers (Zadarma, plugins), from the configuration's list ---------
    providers = build_all(config.all_providers, ProviderTools(
        reactor=reactor, recorder=durable, store=store, crm_schema=config.database.crm_schema,
        region=region, own_numbers=own, office_zone=office_zone,
        trusted_proxies=networks(config.web.trusted_proxies),
        state_folder=config.state_path(base), schema_prepared=database.when_prepared,
        spool_replayed=spooler.when_replayed))
    for provider in providers:
        origins.update((origin.name, origin) for origin in provider.origins)
        for part in provider.services:
            part.setServiceParent(top)
    zadarma_replay.follow(providers)
    # Their webhooks' journal, one for all Zadarma providers: kept as the longest asks,
    # pruned once the spool's first replay is through (never competing with it).
    kept = journal_kept(
        kept_days(item.settings.journal_days, item.settings.max_event_age_hours,
                  item.settings.max_event_ahead_minutes)
        for item in config.all_providers if isinstance(item.settings, ZadarmaSettings))
    if kept is not None:
        JournalRetentionService(ZadarmaJournal(store), kept, reactor,
                                spooler.when_replayed).setServiceParent(top)

    # -- click-to-call: the CRM's sessions in its Redis (when it keeps them there) ----------
    sessions: RedisSessionCache | None = None
    if config.crm.redis_url:
        sessions = RedisSessionCache(
            parse_redis_url(config.crm.redis_url.reveal()), config.crm.redis_key_prefix,
            config.crm.redis_key_version, config.crm.redis_timeout, reactor)
        RedisSessionService(sessions).setServiceParent(top)
    clicks = config.click_to_call
    logins = Logins(Accounts(store, config.database.crm_schema), config.crm.secret_key,
                    config.crm.jwt_signing_key, clicks.session_cookie, reactor, sessions)
    callback = CallbackPages(
        logins,
        ClickToCall(
            CallbackRecords(store, config.database.crm_schema), choice(providers),
            DiallingPolicy(frozenset(clicks.allowed_countries or (config.directory.region,)),
                           clicks.blocked_prefixes, clicks.block_premium),
            region, clicks.per_user_per_minute, reactor,
            recordings=clicks.recordings),
        config.crm.allowed_origins, clicks.login_url, reactor,
        proxies=networks(config.web.trusted_proxies),
    )

    # -- live events: the LISTEN connection, its feed and the hub of the streams -----------
    live = config.live
    hub = Hub(reactor, live.max_streams, live.queue_events, live.heartbeat_seconds,
              live.watchers)
    listen = ListenConnection(reactor, dsn, config.database.connect_timeout)
    live_events = LiveEvents(store, config.database.crm_schema)
    feed = LiveFeed(listen, hub, reactor)
    live_service = LiveService(hub, feed, listen, live_events, live.keep_minutes, reactor,
                               database.when_prepared)
    live_metrics = live_exposition(live_service)

    # -- what the daemon tells about itself, and the web -----------------------------------
    readiness = ReadinessReport(store, schema, config.standalone, config.embedded, index,
                                spool, durable, boxes, providers, leadership)
    own_metrics = metrics.DaemonMetrics(metrics.Sources(
        spool=spool, durable=durable, ingest=ingest, boxes=boxes, directory=index,
        leases=leadership,
    ), LegacyMonitorCollector(legacy), ProvidersCollector(providers))
    limits: list[DpvoipSite] = []  # the site, once built: its connection figures

    def exposition() -> bytes:
        return (own_metrics.exposition() + b"".join(s.limits.metrics() for s in limits)
                + live_metrics())

    live_pages = LivePages(logins, LivePageReads(store, config.database.crm_schema),
                           config.page, config.crm.language, office_zone, reactor,
                           clicks.login_url, feed.settled)
    app = WebApp(readiness, __version__, None, callback, exposition,
                 legacy_monitor=LegacyMonitorResource(legacy), live_page=live_pages,
                 events=EventStreams(logins, live_events, hub),
                 parts=[part for provider in providers for part in provider.web])
    site = DpvoipSite(app.resource(), config.web, reactor,
                      proxies=networks(config.web.trusted_proxies),
                      reserved=networks(senders(providers)))
    limits.append(site)
    web = WebService(reactor, site, config.web.listen)
    web.setServiceParent(top)
    live_service.setServiceParent(top)  # after the web: stops first, its streams ended
    return Daemon(top, store, web, exit_status, embedded, index, ingest, boxes, providers,
                  durable, spooler, schema, sessions, live_service)


def crm_capabilities(schema: OneShotObserver[SchemaReport]) -> CrmCapabilities:
    """The CRM's optional columns, as the prepared schema found them (none before)."""
    prepared = schema.peek()
    return prepared.crm if prepared is not None else CrmCapabilities()


def makeService(config: Config, reactor: Any = None) -> OrderedServices:
    """The single composition root used by the twistd plugin and etc/dpvoip.tac: the
    process's own concerns first (one dpvoip per state folder, refused before anything is
    touched; SIGHUP stops in order), then the daemon."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    lock = lock_or_exit(config.state_path(Path.cwd()))
    daemon = build(config, reactor, lock=lock)
    stop_on_hangup(reactor)
    return daemon.service
