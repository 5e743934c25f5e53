"""The composition root: ordered start and stop, fatal errors, and a daemon built in-process
that starts before PostgreSQL does and becomes ready when it comes."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import treq
from twisted.application.service import Service
from twisted.internet import defer, reactor, threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from dpvoip.config import Config, DirectorySettings
from dpvoip.deferreds import OneShotObserver
from dpvoip.fritzbox.reconciler import ReconcileStatus
from dpvoip.metrics import DaemonMetrics, Sources
from dpvoip.readiness import ReadinessReport
from dpvoip.service import build
from dpvoip.services import (
    DatabaseService,
    DirectoryService,
    ExitStatus,
    OrderedServices,
    Reconnections,
)
from dpvoip.store.embedded import EmbeddedPostgres
from dpvoip.store.migrations import MIGRATIONS, SchemaReport
from dpvoip.web.errors import HttpError, media_type, require_media_type
from test.support.daemon import PATIENCE
from test.support.postgres import query
from test.support.wiring import in_process
from test.test_database import eventually


class FakeReactor:
    """Just what ExitStatus uses of a reactor."""

    def __init__(self) -> None:
        self.running = True
        self.stopped = 0
        self.triggers: list[tuple[str, str, Any]] = []
        self._exitSignal: int | None = 15

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
        self.triggers.append((phase, event, f))

    def stop(self) -> None:
        self.stopped += 1
        self.running = False


class Step(Service):
    """A child service whose start and stop finish when the test says so."""

    def __init__(self, name: str, journal: list[str]) -> None:
        self.name = name
        self.journal = journal
        self.start_done: Deferred[None] = Deferred()
        self.stop_done: Deferred[None] = Deferred()

    def startService(self) -> Deferred[None]:
        super().startService()
        self.journal.append(f"start {self.name}")
        return self.start_done

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.journal.append(f"stop {self.name}")
        return self.stop_done


class OrderTests(SynchronousTestCase):
    def test_children_start_in_order_and_stop_in_reverse_each_waiting(self) -> None:
        journal: list[str] = []
        top = OrderedServices(ExitStatus(FakeReactor()))
        steps = [Step(n, journal) for n in ("database", "fritzbox", "web")]
        for step in steps:
            step.setServiceParent(top)
        top.startService()
        self.assertEqual(journal, ["start database"])
        steps[0].start_done.callback(None)
        self.assertEqual(journal, ["start database", "start fritzbox"])
        steps[1].start_done.callback(None)
        steps[2].start_done.callback(None)
        self.assertTrue(top.started.called)

        journal.clear()
        stopped = top.stopService()
        self.assertEqual(journal, ["stop web"])  # web first: stop accepting requests
        steps[2].stop_done.callback(None)
        self.assertEqual(journal, ["stop web", "stop fritzbox"])
        steps[1].stop_done.callback(None)
        self.assertEqual(journal, ["stop web", "stop fritzbox", "stop database"])
        self.assertFalse(stopped.called)
        steps[0].stop_done.callback(None)
        self.assertIsNone(self.successResultOf(stopped))

    def test_a_child_that_cannot_start_is_fatal(self) -> None:
        fake = FakeReactor()
        status = ExitStatus(fake)
        top = OrderedServices(status)
        journal: list[str] = []
        first, second = Step("database", journal), Step("web", journal)
        first.setServiceParent(top)
        second.setServiceParent(top)
        top.startService()
        first.start_done.errback(OSError("port 8080 taken"))
        self.assertEqual(journal, ["start database"])  # nothing after it starts
        self.assertEqual(status.code, 1)
        self.assertIn("database failed to start: port 8080 taken", status.message)
        self.assertEqual(fake.stopped, 1)
        self.assertFalse(top.started.called)

    def test_sigterm_ends_with_status_zero(self) -> None:
        fake = FakeReactor()
        ExitStatus(fake)
        [(phase, event, settle)] = fake.triggers
        self.assertEqual((phase, event), ("after", "shutdown"))
        settle()
        self.assertIsNone(fake._exitSignal)


class MediaTypeTests(SynchronousTestCase):
    def test_parameters_and_case_are_ignored(self) -> None:
        self.assertEqual(media_type(b"Application/JSON; charset=utf-8"), "application/json")
        self.assertEqual(media_type(None), "")

    def test_an_unsupported_type_is_a_415_naming_what_to_send(self) -> None:
        form = "application/x-www-form-urlencoded"
        self.assertEqual(require_media_type(form.encode(), form), form)
        with self.assertRaises(HttpError) as caught:
            require_media_type(b"text/plain", form, "application/json")
        self.assertEqual(caught.exception.status, 415)
        self.assertIn("text/plain not supported", caught.exception.message)
        with self.assertRaises(HttpError):
            require_media_type(None, form)


class InProcessDaemonTests(TestCase):
    """``build(config)`` wired for real: attached to a PostgreSQL that starts late."""

    timeout = 2 * PATIENCE  # a hang detector: an initdb and a start on a loaded machine

    def setUp(self) -> Any:
        self.folder = Path(tempfile.mkdtemp(prefix="dpvoip-svc-"))
        self.folder.chmod(0o755)
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.cluster = EmbeddedPostgres(self.folder / "pg")
        self.addCleanup(self.cluster.stop, "immediate")
        self.http_pool = HTTPConnectionPool(reactor, persistent=False)
        return threads.deferToThread(self.cluster.initialise)

    async def _get(self, url: str) -> tuple[int, dict[str, Any]]:
        response = await treq.get(url, pool=self.http_pool)
        body = await response.content()
        return response.code, json.loads(body)

    @defer.inlineCallbacks
    def test_up_before_postgres_ready_after_it_and_stops_cleanly(self) -> Any:
        config = in_process(self.cluster.dsn("crm"), pool_size=2)
        daemon = build(config, reactor, self.folder)
        self.assertIsNone(daemon.embedded)
        daemon.service.startService()
        yield daemon.service.started
        assert daemon.web.port is not None
        url = f"http://127.0.0.1:{daemon.web.port.getHost().port}"  # type: ignore[attr-defined]

        code, body = yield defer.Deferred.fromCoroutine(self._get(url + "/healthz"))
        self.assertEqual(code, 200)
        code, body = yield defer.Deferred.fromCoroutine(self._get(url + "/readyz"))
        self.assertEqual(code, 503)
        self.assertFalse(body["database"]["reachable"])

        # PostgreSQL comes, and the CRM's database appears whole (made under another name,
        # then renamed, so that dpvoip never sees it half-made and refuses to run).
        yield threads.deferToThread(self.cluster.start)
        self.cluster.create_database("crm_loading")
        query(self.cluster.dsn("crm_loading"), _ddl("2025-12"))
        query(self.cluster.dsn("postgres"), "ALTER DATABASE crm_loading RENAME TO crm")

        async def ready() -> bool:
            code, _ = await self._get(url + "/readyz")
            return code == 200

        yield defer.Deferred.fromCoroutine(
            eventually(lambda: defer.Deferred.fromCoroutine(ready()), seconds=PATIENCE)
        )
        code, body = yield defer.Deferred.fromCoroutine(self._get(url + "/readyz"))
        self.assertEqual(body["database"]["mode"], "attached")
        self.assertEqual(body["database"]["schema_version"], MIGRATIONS[-1].version)

        yield daemon.service.stopService()
        self.assertIsNone(daemon.web.port)
        self.assertEqual(daemon.store.pool.live, 0)
        self.assertEqual(daemon.exit_status.code, 0)
        yield self.http_pool.closeCachedConnections()


def _ddl(version: str) -> str:
    from dpvoip.store.migrations import ddl_text

    return ddl_text(f"dpeconomy-{version}.sql")


class OwnNumberTests(SynchronousTestCase):
    def test_a_box_own_number_is_read_with_its_area_code(self) -> None:
        from dpvoip.config import DirectorySettings, FritzBoxSettings
        from dpvoip.service import own_numbers

        config = Config(
            directory=replace(DirectorySettings(), own_numbers=("210 555 0000",)),
            fritzbox=(replace(FritzBoxSettings(), country="DE", area_code="30",
                              own_numbers=("2281234",)),),
        )
        self.assertEqual(own_numbers(config), ["210 555 0000", "+49302281234"])


# -- the readiness report, from fakes of what it reads ---------------------------------------


@dataclass
class FakeDatabaseState:
    reachable: bool = True
    live_connections: int = 2


class FakeDatabase:
    def __init__(self) -> None:
        self.now = FakeDatabaseState()

    def state(self) -> Deferred[FakeDatabaseState]:
        return succeed(self.now)


@dataclass
class FakeIndexState:
    built: bool = False
    entries: int = 0
    last_refresh: datetime | None = None
    errors: int = 0


@dataclass
class FakeDirectory:
    state: FakeIndexState = field(default_factory=FakeIndexState)


@dataclass
class FakeSpoolState:
    pending: int = 0
    bytes: int = 0
    limit: int = 1000
    alarm: bool = False
    disk_error: str = ""
    disk_errors: int = 0
    mark_behind: bool = False


@dataclass
class FakeSpool:
    now: FakeSpoolState = field(default_factory=FakeSpoolState)

    def state(self) -> FakeSpoolState:
        return self.now


@dataclass
class FakeDurableCounters:
    direct: int = 0
    spooled: int = 0


@dataclass
class FakeDurable:
    spooling: bool = False
    counters: FakeDurableCounters = field(default_factory=FakeDurableCounters)


@dataclass
class FakeBoxStatus:
    name: str
    lines: int = 0
    bad_lines: int = 0
    connected: bool = True
    reconnects: int = 0
    calls_evicted: int = 0
    dates_replaced: int = 0
    not_recorded: int = 0
    call_list: Any = None  # a ReconcileStatus when the box's list is read

    def as_json(self, open_calls: int) -> dict[str, Any]:
        shown = {"name": self.name, "open_calls": open_calls}
        return shown if self.call_list is None else {**shown,
                                                     "call_list": self.call_list.as_json()}


@dataclass
class FakeTracker:
    open_calls: int = 0


@dataclass
class FakeBox:
    status: FakeBoxStatus
    tracker: FakeTracker = field(default_factory=FakeTracker)


def prepared_schema(mode: str = "attached", version: int = 7) -> SchemaReport:
    return SchemaReport(mode=mode, schema_version=version, applied_now=(),
                        crm_tables=(), created_crm_tables=False)


class ReadinessReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.database = FakeDatabase()
        self.schema: OneShotObserver[SchemaReport] = OneShotObserver()
        self.directory = FakeDirectory()
        self.spool = FakeSpool()
        self.durable = FakeDurable()
        self.boxes = [FakeBox(FakeBoxStatus("office"))]

    def report(self, standalone: bool = False, embedded: bool = False) -> Any:
        probe = ReadinessReport(self.database, self.schema, standalone, embedded,
                                self.directory, self.spool, self.durable, self.boxes)
        return self.successResultOf(probe())

    def test_not_ready_until_the_schema_is_prepared_and_says_which_mode_it_will_be(self) -> None:
        answer = self.report(standalone=True, embedded=True)
        self.assertFalse(answer.ready)
        self.assertEqual(answer.checks["database"], {
            "reachable": True, "live_connections": 2, "mode": "standalone",
            "schema_version": None, "embedded": True})
        self.schema.fire(prepared_schema("standalone", 9))
        answer = self.report(standalone=True, embedded=True)
        self.assertTrue(answer.ready)
        self.assertEqual((answer.checks["database"]["mode"],
                          answer.checks["database"]["schema_version"]), ("standalone", 9))

    def test_an_unreachable_database_or_a_nearly_full_spool_is_not_ready(self) -> None:
        self.schema.fire(prepared_schema())
        self.assertTrue(self.report().ready)
        self.database.now = FakeDatabaseState(reachable=False, live_connections=0)
        self.assertFalse(self.report().ready)
        self.database.now = FakeDatabaseState()
        self.spool.now = FakeSpoolState(pending=40, bytes=950, alarm=True)
        answer = self.report()
        self.assertFalse(answer.ready)
        self.assertEqual(answer.checks["spool"]["alarm"], True)

    def test_each_report_reads_the_figures_of_that_moment(self) -> None:
        self.schema.fire(prepared_schema())
        first = self.report()
        self.assertEqual(first.checks["directory"], {
            "built": False, "entries": 0, "last_refresh": None, "errors": 0})
        self.directory.state.built = True
        self.directory.state.entries = 1234
        self.directory.state.last_refresh = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
        self.durable.spooling = True
        self.durable.counters.spooled = 3
        self.boxes[0].tracker.open_calls = 2
        second = self.report()
        self.assertEqual(second.checks["directory"], {
            "built": True, "entries": 1234, "last_refresh": "2026-01-15T08:00:00+00:00",
            "errors": 0})
        self.assertEqual(second.checks["spool"], {
            "pending": 0, "bytes": 0, "limit": 1000, "alarm": False, "disk_error": None,
            "disk_errors": 0, "mark_behind": False, "spooling": True,
            "direct": 0, "spooled": 3})
        self.assertEqual(second.checks["fritzbox"], [{"name": "office", "open_calls": 2}])

    def test_a_call_list_that_cannot_be_read_is_a_warning_not_a_failure(self) -> None:
        self.schema.fire(prepared_schema())
        listing = ReconcileStatus("office")
        self.boxes[0].status.call_list = listing
        self.assertEqual(self.report().checks["warnings"], [])
        listing.state, listing.kind = "failing", "rights"
        listing.advice = "give the TR-064 user the right to the call list"
        answer = self.report()
        self.assertTrue(answer.ready, "the box's CallMonitor and the rest go on")
        self.assertEqual(answer.checks["warnings"], [
            "box office: its call list cannot be read (rights): give the TR-064 user the"
            " right to the call list"])
        self.assertEqual(answer.checks["fritzbox"][0]["call_list"]["state"], "failing")


@dataclass
class KeepsCounters:
    """The ingest or the webhook as the metrics read them: a dataclass of counters."""

    counters: Any


class MetricsSourcesTests(SynchronousTestCase):
    def test_each_scrape_reads_the_objects_as_they_are_then(self) -> None:
        @dataclass
        class IngestCounters:
            calls: int = 0

        @dataclass
        class WebhookCounters:
            received: int = 0
            refused: dict[int, int] = field(default_factory=dict)

        spool, durable, directory = FakeSpool(), FakeDurable(), FakeDirectory()
        ingest, webhook = KeepsCounters(IngestCounters()), KeepsCounters(WebhookCounters())
        boxes = [FakeBox(FakeBoxStatus("office"))]
        page = DaemonMetrics(Sources(spool=spool, durable=durable, ingest=ingest,
                                     webhook=webhook, boxes=boxes, directory=directory))
        before = page.exposition().decode()
        self.assertIn('dpvoip_ingest_total{what="calls"} 0.0', before)
        ingest.counters.calls = 5
        webhook.counters.refused[403] = 2
        directory.state.entries = 77
        boxes[0].status.lines = 9
        after = page.exposition().decode()
        self.assertIn('dpvoip_ingest_total{what="calls"} 5.0', after)
        self.assertIn('dpvoip_zadarma_webhooks_refused_total{status="403"} 2.0', after)
        self.assertIn("dpvoip_directory_entries 77.0", after)
        self.assertIn('dpvoip_fritzbox_lines_total{box="office",kind="good"} 9.0', after)
        self.assertNotIn("dpvoip_call_list_failing{", after, "no TR-064: no series")

    def test_a_boxs_call_list_in_the_metrics(self) -> None:
        listing = ReconcileStatus("office", state="failing", kind="auth", advice="password",
                                  runs=3, failures=2, failures_by_kind={"auth": 2},
                                  inserted=4, corrected=1)
        boxes = [FakeBox(FakeBoxStatus("office", call_list=listing))]
        page = DaemonMetrics(Sources(spool=FakeSpool(), durable=FakeDurable(),
                                     ingest=KeepsCounters(FakeDurable().counters),
                                     webhook=KeepsCounters(_NoRefusals()), boxes=boxes,
                                     directory=FakeDirectory())).exposition().decode()
        for line in ('dpvoip_call_list_failing{box="office",kind="auth"} 1.0',
                     'dpvoip_call_list_passes_total{box="office",result="ok"} 3.0',
                     'dpvoip_call_list_passes_total{box="office",result="failed"} 2.0',
                     'dpvoip_call_list_failures_total{box="office",kind="auth"} 2.0',
                     'dpvoip_call_list_calls_total{box="office",what="inserted"} 4.0',
                     'dpvoip_call_list_calls_total{box="office",what="corrected"} 1.0'):
            self.assertIn(line, page)


@dataclass
class _NoRefusals:
    refused: dict[int, int] = field(default_factory=dict)


# -- the database service hears the pool through Reconnections -------------------------------


class FakePool:
    live = 1

    def start(self) -> Deferred[None]:
        return succeed(None)


class FakeStore:
    def __init__(self) -> None:
        self.pool = FakePool()
        self.writes: list[Deferred[SchemaReport]] = []

    def write(self, work: Any) -> Deferred[SchemaReport]:
        done: Deferred[SchemaReport] = Deferred()
        self.writes.append(done)
        return done


class DatabaseServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FakeStore()
        self.store.pool.live = 0  # PostgreSQL is down at start
        self.reconnections = Reconnections()
        self.schema: OneShotObserver[SchemaReport] = OneShotObserver()
        self.service = DatabaseService(
            self.store, Config(), ExitStatus(FakeReactor()),  # type: ignore[arg-type]
            self.schema, self.reconnections, self.clock)

    def test_a_connection_back_prepares_the_schema_on_the_next_turn(self) -> None:
        self.service.startService()
        self.assertEqual(self.store.writes, [], "nothing to prepare on without PostgreSQL")
        self.store.pool.live = 1
        self.reconnections.notify()
        self.assertEqual(self.store.writes, [], "not from inside the pool's bookkeeping")
        self.clock.advance(0)
        [write] = self.store.writes
        self.reconnections.notify()  # another connection back while preparing: once only
        self.clock.advance(0)
        self.assertEqual(len(self.store.writes), 1)
        prepared = self.service.when_prepared()
        write.callback(prepared_schema())
        self.successResultOf(prepared)
        self.assertEqual(self.schema.peek(), prepared_schema())

    def test_a_failed_preparation_is_tried_again_when_the_pool_says_so(self) -> None:
        self.store.pool.live = 1
        self.service.startService()
        self.store.writes.pop().errback(OSError("server closed the connection\nmore text"))
        self.assertFalse(self.schema.fired)
        self.reconnections.notify()
        self.clock.advance(0)
        self.assertEqual(len(self.store.writes), 1)

    def test_nothing_is_prepared_once_stopped(self) -> None:
        self.service.startService()
        self.service.running = False  # stopped (without draining the fake store)
        self.store.pool.live = 1
        self.reconnections.notify()
        self.clock.advance(0)
        self.assertEqual(self.store.writes, [])


# -- the directory's beat: Twisted's TimerService on an injected clock ------------------------


class SlowIndex:
    """A directory index whose passes finish when the test says."""

    def __init__(self) -> None:
        self.state = FakeIndexState(built=True)
        self.passes: list[Deferred[int]] = []

    async def needs_build(self) -> bool:
        return False

    async def refresh(self, sweep: bool, force: bool) -> int:
        running: Deferred[int] = Deferred()
        self.passes.append(running)
        return await running


class DirectoryBeatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.index = SlowIndex()
        self.prepared: Deferred[None] = Deferred()
        self.service = DirectoryService(
            self.index,  # type: ignore[arg-type]
            DirectorySettings(refresh_seconds=10, sweep_seconds=60), self.clock,
            lambda: self.prepared)
        self.service.startService()

    def test_nothing_runs_until_the_schema_is_prepared(self) -> None:
        self.clock.advance(100)
        self.assertEqual(self.index.passes, [])
        self.prepared.callback(None)
        self.assertEqual(len(self.index.passes), 1, "the first pass at once")

    def test_beats_that_fall_within_a_running_pass_are_skipped(self) -> None:
        self.prepared.callback(None)
        self.clock.pump([10] * 5)  # a pass that takes 50 s: five beats pass by
        self.assertEqual(len(self.index.passes), 1)
        self.index.passes[0].callback(0)
        self.assertEqual(len(self.index.passes), 1, "the next pass waits for its beat")
        self.clock.advance(10)
        self.assertEqual(len(self.index.passes), 2)

    def test_stop_waits_for_the_running_pass_and_then_nothing_runs(self) -> None:
        self.prepared.callback(None)
        stopped = self.service.stopService()
        assert stopped is not None
        self.assertNoResult(stopped)
        self.index.passes[0].callback(0)
        self.successResultOf(stopped)
        self.clock.pump([10] * 6)
        self.assertEqual(len(self.index.passes), 1)

    def test_a_failed_pass_is_logged_counted_and_the_beat_goes_on(self) -> None:
        self.prepared.callback(None)
        self.index.passes[0].errback(OSError("connection lost"))
        self.assertEqual(self.index.state.errors, 1)
        self.clock.advance(10)
        self.index.passes[1].errback(OSError("connection lost"))
        self.clock.advance(10)
        self.assertEqual((len(self.index.passes), self.index.state.errors), (3, 2))
        self.assertEqual(self.flushLoggedErrors(), [], "a warning, not an unhandled error")

    def test_stopped_before_the_schema_is_prepared_it_never_runs(self) -> None:
        self.assertIsNone(self.service.stopService())
        self.prepared.callback(None)
        self.clock.advance(100)
        self.assertEqual(self.index.passes, [])
