"""The spool's bound as an administrator meets it: the alarm in /readyz and /metrics, and
a webhook refused with 503 (so that Zadarma sends it again) once the spool is full.

The daemon as wired, its database unreachable (nothing is replayed), its spool filled
beforehand by the spool's own code with records a replay would accept.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from dpvoip.config import (
    DaemonSettings,
    Secret,
    SpoolSettings,
    ZadarmaSettings,
)
from dpvoip.service import build
from dpvoip.spool.journal import Spool
from dpvoip.spool.records import zadarma_record
from dpvoip.zadarma.signing import webhook_signature
from test.support.daemon import PATIENCE, scratch
from test.support.wiring import in_process

SECRET = "bound-secret"
MIB = 1024 * 1024


class SpoolBoundTest(TestCase):
    timeout = 2 * PATIENCE  # a hang detector

    def fill(self, folder: Any, upto: int) -> None:
        """Spool records until about ``upto`` bytes are used (the last few bytes with
        records smaller than any real event)."""
        spool = Spool(folder, max_bytes=MIB)
        spool.open()
        for size in (60_000, 1_000, 0):
            record = zadarma_record({"event": "NOTIFY_START", "pbx_call_id": "in_filler",
                                     "x": "x" * size})
            while spool.state().bytes + len(record) + 18 <= upto:
                spool.append_many([record])
        spool.close()

    async def start(self, filled: int) -> None:
        base = scratch(self)
        self.fill(base / "state" / "spool", filled)
        config = in_process(
            "postgresql://nobody@127.0.0.1:1/crm", connect_timeout=1.0,
            daemon=DaemonSettings(state_dir="state"),
            zadarma=replace(ZadarmaSettings(), secret=Secret(SECRET),
                            timezone="Europe/Athens", allowed_networks=("127.0.0.1/32",)),
            spool=SpoolSettings(max_mb=1, alarm_percent=80, deadline_seconds=0.5))
        self.daemon = build(config, reactor, base)
        self.daemon.service.startService()
        self.addCleanup(self.daemon.service.stopService)
        await self.daemon.service.started
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)
        port = self.daemon.web.port.getHost().port  # type: ignore[union-attr]
        self.base = f"http://127.0.0.1:{port}"

    async def get(self, path: str) -> tuple[int, bytes]:
        response = await treq.get(self.base + path, pool=self.http)
        return response.code, await response.content()

    async def event(self, pbx: str) -> int:
        form = {"event": "NOTIFY_START", "pbx_call_id": pbx,
                "call_start": "2026-01-15 10:00:00", "caller_id": "6912345678",
                "called_did": "302107654321"}
        response = await treq.post(
            self.base + "/voip/zd/", data=urlencode(form).encode(), pool=self.http,
            headers=Headers({"Content-Type": ["application/x-www-form-urlencoded"],
                             "Signature": [webhook_signature(SECRET, form) or ""]}))
        await response.content()
        return int(response.code)

    async def _below_the_alarm(self) -> None:
        await self.start(MIB // 2)
        self.assertEqual(await self.event("in_ok_1"), 200)
        _, body = await self.get("/readyz")
        spool = json.loads(body)["spool"]
        self.assertEqual((spool["alarm"], spool["spooling"]), (False, True))
        self.assertGreater(spool["pending"], 1)

    def test_below_the_alarm_events_are_spooled_and_acknowledged(self) -> Any:
        return defer.Deferred.fromCoroutine(self._below_the_alarm())

    async def _full(self) -> None:
        await self.start(MIB)
        code, body = await self.get("/readyz")
        self.assertEqual(code, 503)
        self.assertTrue(json.loads(body)["spool"]["alarm"])
        _, metrics = await self.get("/metrics")
        self.assertIn(b"dpvoip_spool_alarm 1.0", metrics)
        self.assertEqual(await self.event("in_full_1"), 503, "not acknowledged: sent again")
        _, metrics = await self.get("/metrics")
        self.assertIn(b'dpvoip_events_total{path="refused"} 1.0', metrics)
        self.assertEqual(self.daemon.durable.counters.refused, 1)

    def test_a_full_spool_raises_the_alarm_and_refuses_with_503(self) -> Any:
        return defer.Deferred.fromCoroutine(self._full())


class UnreplayableRecordTest(TestCase):
    """A record the ingest refuses every time is logged and skipped, never a jam."""

    timeout = 2 * PATIENCE  # a hang detector

    async def _replay_past_a_bad_record(self) -> None:
        from test.support.postgres import postgres, query
        from test.test_database import eventually

        dsn = postgres().new_database(crm="2025-12")
        base = scratch(self)
        spool = Spool(base / "state" / "spool", max_bytes=MIB)
        spool.open()
        good = {"event": "NOTIFY_START", "pbx_call_id": "in_good", "caller_id": "6912345678",
                "call_start": "2026-01-15 10:00:00", "called_did": "302107654321"}
        spool.append_many([zadarma_record({**good, "pbx_call_id": "in_bad",
                                           "event": "NOTIFY_END", "duration": "9" * 30}),
                           b"not json at all", zadarma_record(good)])
        spool.close()
        config = in_process(
            dsn, daemon=DaemonSettings(state_dir="state"),
            zadarma=replace(ZadarmaSettings(), secret=Secret(SECRET), timezone="Europe/Athens",
                            max_event_age_hours=24 * 365 * 100))  # the record's fixed date
        daemon = build(config, reactor, base)
        daemon.service.startService()
        self.addCleanup(daemon.service.stopService)
        await daemon.service.started
        # The counters move as each record is through; the mark, once the chunk is.
        await eventually(lambda: daemon.durable.counters.unreplayable == 2
                         and daemon.durable.counters.replayed == 1
                         and daemon.durable.spool.state().pending == 0, PATIENCE)
        self.assertEqual(query(dsn, "SELECT pbx_call_id FROM dpvoip.zadarma_event"),
                         [("in_good",)])
        port = daemon.web.port.getHost().port  # type: ignore[union-attr]
        http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(http.closeCachedConnections)
        response = await treq.get(f"http://127.0.0.1:{port}/readyz", pool=http)
        spool_state = json.loads(await response.content())["spool"]
        self.assertEqual((spool_state["pending"], spool_state["unreplayable"]), (0, 2))

    def test_a_bad_record_is_skipped_and_the_rest_replayed(self) -> Any:
        return defer.Deferred.fromCoroutine(self._replay_past_a_bad_record())
