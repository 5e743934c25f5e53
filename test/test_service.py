"""The composition root: ordered start and stop, fatal errors, and a daemon built in-process
that starts before PostgreSQL does and becomes ready when it comes."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import treq
from twisted.application.service import Service
from twisted.internet import defer, reactor, threads
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from dpvoip.config import Config, DatabaseSettings, Secret, WebSettings
from dpvoip.service import build
from dpvoip.services import ExitStatus, OrderedServices
from dpvoip.store.embedded import EmbeddedPostgres
from dpvoip.store.migrations import MIGRATIONS
from dpvoip.web.errors import HttpError, media_type, require_media_type
from test.support.postgres import query
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

    timeout = 120

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
        config = Config(
            database=replace(DatabaseSettings(), url=Secret(self.cluster.dsn("crm")), pool_size=2),
            web=replace(WebSettings(), listen="tcp:0:interface=127.0.0.1"),
            fritzbox=(),
        )
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
            eventually(lambda: defer.Deferred.fromCoroutine(ready()), seconds=30)
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
        from dpvoip.service import _own_numbers

        config = Config(
            directory=replace(DirectorySettings(), own_numbers=("210 555 0000",)),
            fritzbox=(replace(FritzBoxSettings(), country="DE", area_code="30",
                              own_numbers=("2281234",)),),
        )
        self.assertEqual(_own_numbers(config), ["210 555 0000", "+49302281234"])
