"""The composition root: ``makeService(config)`` builds and wires every service.

Nothing else in dpvoip reaches for the reactor or a global: it is handed in from here.
Services start in order (database, Fritz!Boxes, web) and stop in the reverse order, each
waiting for the one before: stop accepting HTTP and let requests in flight finish their
writes, drop the Fritz!Box connections, drain and close the pool, stop the embedded
PostgreSQL.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from dataclasses import asdict, replace
from datetime import tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from treq.client import HTTPClient
from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dpvoip import __version__, metrics
from dpvoip.calls.ingest import Ingest, Origin, ZadarmaContext
from dpvoip.click_to_call.callbacks import ClickToCall
from dpvoip.click_to_call.logins import Logins
from dpvoip.config import Config
from dpvoip.core.dialling_policy import DiallingPolicy
from dpvoip.core.numbers import Dialling, normalise
from dpvoip.core.rate_limit import RateLimiter
from dpvoip.core.texts import Texts
from dpvoip.deferreds import OneShotObserver
from dpvoip.fritzbox.box import BoxStatusReporter, FritzBox, FritzBoxService, retry_policy
from dpvoip.services import DirectoryService
from dpvoip.spool.durable import DurableIngest, DurableService
from dpvoip.spool.journal import AsyncSpool, Spool
from dpvoip.store.database import Store
from dpvoip.store.directory import DirectoryIndex
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.embedded import EmbeddedPostgres
from dpvoip.store.migrations import SchemaMismatch, SchemaReport, prepare
from dpvoip.store.pool import HealingPool
from dpvoip.web.app import Readiness, WebApp
from dpvoip.web.callback import CallbackPages
from dpvoip.web.server import DpvoipSite, WebService
from dpvoip.web.sources import networks
from dpvoip.web.zadarma import ZadarmaWebhook
from dpvoip.zadarma.account import ZadarmaAccountService, http_pool_and_agent
from dpvoip.zadarma.api import ZadarmaApi, base_url

log = Logger(namespace="dpvoip")


class ExitStatus:
    """How the process ends: 0 after SIGTERM or a clean stop, 1 after a fatal error.

    twistd re-raises SIGTERM on itself after a clean shutdown (exit status 143); an
    administrator's `systemctl stop` or `kill` is a normal stop, so it exits 0 here.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.code = 0
        self.message = ""
        reactor.addSystemEventTrigger("after", "shutdown", self._settle)

    def fatal(self, message: str) -> None:
        if self.code == 0:
            self.code, self.message = 1, message
            log.critical("dpvoip cannot run: {message}", message=message)
        if self._reactor.running:
            self._reactor.stop()

    def _settle(self) -> None:
        # Private twistd/reactor contract: a signal stored here is re-raised after the run.
        self._reactor._exitSignal = None
        if self.code:
            code = self.code
            sys.stderr.write(f"dpvoip: {self.message}\n")

            def leave() -> None:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

            atexit.register(leave)


class OrderedServices(MultiService):
    """Children start one after the other, in order, and stop in the reverse order."""

    def __init__(self, exit_status: ExitStatus) -> None:
        super().__init__()
        self._exit = exit_status
        self.started: Deferred[None] = Deferred()

    def startService(self) -> None:
        Service.startService(self)
        Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        for child in list(self):
            try:
                await defer.maybeDeferred(child.startService)
            except Exception as error:
                self._exit.fatal(f"{getattr(child, 'name', child)} failed to start: {error}")
                return
        # What start-up loaded (libraries, number metadata) lives as long as the process:
        # keep it out of the collector's full passes, which would stall calls for tens of ms.
        gc.collect()
        gc.freeze()
        self.started.callback(None)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {name} failed", name=getattr(child, "name", child))


class EmbeddedPostgresService(Service):
    """Starts the private PostgreSQL (in a thread: initdb and pg_ctl block) and stops it."""

    name = "embedded PostgreSQL"

    def __init__(self, reactor: Any, cluster: EmbeddedPostgres) -> None:
        self._reactor = reactor
        self.cluster = cluster

    def startService(self) -> Deferred[None]:
        super().startService()
        log.info("starting embedded PostgreSQL in {folder}", folder=str(self.cluster.folder))
        return threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self.cluster.start
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self.cluster.stop
        )


class DatabaseService(Service):
    """Owns the pool: starts it (PostgreSQL may be down), prepares the schema once reachable."""

    name = "database"

    def __init__(self, store: Store, config: Config, exit_status: ExitStatus,
                 schema: OneShotObserver[SchemaReport]) -> None:
        self.store = store
        self._config = config
        self._exit = exit_status
        self._schema = schema
        self._preparing = False

    def when_prepared(self) -> Deferred[None]:
        """Fires once the schema is checked and migrated (at once if it already is)."""
        return self._schema.when_fired().addCallback(lambda _: None)

    def startService(self) -> Deferred[None]:
        super().startService()
        started = self.store.pool.start()
        return started.addCallback(lambda _: self.try_prepare())

    def try_prepare(self) -> None:
        """Check and migrate the schema, once, as soon as PostgreSQL answers."""
        if self._schema.fired or self._preparing or not self.running:
            return
        if self.store.pool.live == 0:
            log.warn("PostgreSQL is not reachable yet; dpvoip is up but not ready")
            return
        self._preparing = True
        standalone = self._config.standalone
        schema = self._config.database.crm_schema
        prepared = self.store.write(lambda c: prepare(c, standalone=standalone, crm_schema=schema))
        prepared.addCallbacks(self._prepared, self._not_prepared)

    def _prepared(self, report: Any) -> None:
        self._preparing = False
        self._schema.fire(report)
        if report.created_crm_tables:
            log.info("created the CRM tables of standalone mode (D.P. Economy 2025-12)")
        log.info(
            "database ready: {mode} mode, dpvoip schema version {version}"
            "{applied}, CRM {crm}",
            mode=report.mode, version=report.schema_version, crm=report.crm.version,
            applied=f" (applied now: {list(report.applied_now)})" if report.applied_now else "",
        )

    def _not_prepared(self, failure: Any) -> None:
        self._preparing = False
        if failure.check(SchemaMismatch):
            self._exit.fatal(str(failure.value))
            return
        log.warn("schema preparation failed, will retry when the database is back: {error}",
                 error=str(failure.value).strip().splitlines()[0] if str(failure.value) else "")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        drained = self.store.drain(self._config.web.drain_timeout)
        return drained.addCallback(lambda _: self.store.pool.close())


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
        zadarma: ZadarmaWebhook,
        account: ZadarmaAccountService,
        durable: DurableIngest,
        spooler: DurableService,
        schema: OneShotObserver[SchemaReport],
    ) -> None:
        self.service = service
        self.store = store
        self.web = web
        self.exit_status = exit_status
        self.embedded = embedded
        self.directory = directory
        self.ingest = ingest
        self.boxes = boxes
        self.zadarma = zadarma
        self.account = account
        self.durable = durable
        self.spooler = spooler
        self.schema = schema


def _own_numbers(config: Config) -> list[str]:
    """Every number the office owns: never matched to a CRM record."""
    numbers = list(config.directory.own_numbers)
    for box in config.fritzbox:
        where = Dialling(box.country, box.area_code)
        numbers.extend(n for n in (normalise(raw, where) for raw in box.own_numbers) if n)
    return numbers


def build(config: Config, reactor: Any = None, base: Path | None = None) -> Daemon:
    """Wire every service from ``config``."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    base = base or Path.cwd()
    exit_status = ExitStatus(reactor)
    top = OrderedServices(exit_status)
    top.setName("dpvoip")

    embedded: EmbeddedPostgres | None = None
    if config.embedded:
        embedded = EmbeddedPostgres(config.state_path(base) / "pg")
        EmbeddedPostgresService(reactor, embedded).setServiceParent(top)
        dsn = connection_dsn(embedded.dsn(), config.database)
    else:
        dsn = connection_dsn(config.database.url.reveal(), config.database)

    database: DatabaseService
    pool = HealingPool(
        reactor, dsn, config.database.pool_size, config.database.connect_timeout,
        on_reconnect=lambda: reactor.callLater(0, database.try_prepare),
    )
    store = Store(pool, reactor)
    schema: OneShotObserver[SchemaReport] = OneShotObserver()
    database = DatabaseService(store, config, exit_status, schema)
    database.setServiceParent(top)

    index = DirectoryIndex(
        store, config.database.crm_schema, Dialling(config.directory.region),
        own_numbers=_own_numbers(config), page_size=config.directory.page_size,
        margin_seconds=config.directory.margin_seconds,
    )
    directory = DirectoryService(index, config.directory, reactor, database.when_prepared)
    directory.setServiceParent(top)

    ingest = Ingest(store, index, Texts(config.crm.language), config.tickets,
                    ZoneInfo(config.crm.timezone), schema, reactor, config.database.crm_schema)
    spool = AsyncSpool(Spool(config.state_path(base) / "spool",
                             max_bytes=config.spool.max_mb * 1024 * 1024,
                             alarm_ratio=config.spool.alarm_percent / 100), reactor)
    origins: dict[str, Origin] = {}
    durable = DurableIngest(ingest, spool, store, schema, reactor, origins,
                            lambda: zadarma.context, config.directory.region,
                            deadline=config.spool.deadline_seconds)
    spooler = DurableService(durable, spool, reactor, database.when_prepared)
    spooler.setServiceParent(top)
    own = frozenset(index.own_numbers)
    boxes: list[FritzBox] = []
    for settings in config.fritzbox:
        box = FritzBox(settings, durable, reactor, own)
        origins[settings.name] = box.origin
        boxes.append(box)
        FritzBoxService(
            box, reactor, spooler.when_replayed,
            retry=retry_policy(settings.reconnect_initial_seconds,
                               settings.reconnect_max_seconds),
        ).setServiceParent(top)
    if boxes:
        BoxStatusReporter(boxes, store, reactor).setServiceParent(top)

    async def readiness() -> Readiness:
        state = await store.state()
        prepared = schema.peek()
        db = {
            "reachable": state.reachable,
            "live_connections": state.live_connections,
            "mode": prepared.mode if prepared else (
                "standalone" if config.standalone else "attached"),
            "schema_version": prepared.schema_version if prepared else None,
            "embedded": config.embedded,
        }
        listing = index.state
        directory_state = {
            "built": listing.built,
            "entries": listing.entries,
            "last_refresh": listing.last_refresh.isoformat() if listing.last_refresh else None,
            "errors": listing.errors,
        }
        spooled = spool.state()
        spool_state = {"pending": spooled.pending, "bytes": spooled.bytes,
                       "limit": spooled.limit, "alarm": spooled.alarm,
                       "spooling": durable.spooling, **asdict(durable.counters)}
        return Readiness(
            state.reachable and prepared is not None and not spooled.alarm,
            {"database": db, "directory": directory_state, "spool": spool_state,
             "fritzbox": [b.status.as_json(b.tracker.open_calls) for b in boxes]},
        )

    office_zone = ZoneInfo(config.crm.timezone)
    http_pool, agent = http_pool_and_agent(reactor, config.zadarma.api_ca_file,
                                           config.zadarma.api_timeout)
    api = ZadarmaApi(HTTPClient(agent), reactor, config.zadarma.key.reveal(),
                     config.zadarma.secret.reveal(),
                     base_url(config.zadarma.api_url, config.zadarma.sandbox),
                     config.zadarma.api_timeout, config.zadarma.api_requests_per_minute)

    zadarma = ZadarmaWebhook(
        recorder=durable,
        context=ZadarmaContext(
            Dialling(config.directory.region),
            ZoneInfo(config.zadarma.timezone) if config.zadarma.timezone else office_zone,
            tickets=config.zadarma.create_tickets,
            redirect_to_owner=config.zadarma.redirect_to_owner,
        ),
        secret=config.zadarma.secret,
        allowlist=networks(config.zadarma.allowed_networks),
        proxies=networks(config.web.trusted_proxies),
        caller_name=config.zadarma.caller_name,
    )

    def learned(zone: tzinfo) -> None:
        zadarma.context = replace(zadarma.context, zone=zone)

    account = ZadarmaAccountService(api, http_pool, reactor, office_zone,
                                    learn_zone=not config.zadarma.timezone, on_zone=learned)
    account.setServiceParent(top)
    clicks = config.click_to_call
    region = config.directory.region
    callback = CallbackPages(
        Logins(store, config.database.crm_schema, config.crm.secret_key,
               config.crm.jwt_signing_key, clicks.session_cookie, reactor),
        ClickToCall(
            store, config.database.crm_schema, api,
            DiallingPolicy(frozenset(clicks.allowed_countries or (region,)),
                           clicks.blocked_prefixes, clicks.block_premium),
            Dialling(region), RateLimiter(clicks.per_user_per_minute, 60.0), reactor),
        config.crm.allowed_origins, clicks.login_url, reactor,
        proxies=networks(config.web.trusted_proxies),
    )
    own_metrics = metrics.registry(metrics.Sources(
        spool=spool.state, spooling=lambda: durable.spooling,
        durable=lambda: durable.counters, ingest=lambda: ingest.counters,
        webhook=lambda: zadarma.counters, boxes=lambda: [b.status for b in boxes],
        directory_entries=lambda: index.state.entries,
    ))
    app = WebApp(lambda: Deferred.fromCoroutine(readiness()), __version__, zadarma, callback,
                 lambda: metrics.exposition(own_metrics))
    site = DpvoipSite(app.resource(), config.web, reactor)
    web = WebService(reactor, site, config.web.listen)
    web.setServiceParent(top)
    return Daemon(top, store, web, exit_status, embedded, index, ingest, boxes, zadarma, account,
                  durable, spooler, schema)


def makeService(config: Config, reactor: Any = None) -> OrderedServices:
    """The single composition root used by the twistd plugin and etc/dpvoip.tac."""
    return build(config, reactor).service
