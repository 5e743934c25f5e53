"""Fault test (issue 14, point 4): the spool's filesystem full while PostgreSQL is down.

The daemon as wired on its own PostgreSQL cluster (``FaultCase``); the full disk is the
spool's own file layer (``Spool.files``) failing every write with ENOSPC, as a full
filesystem does: no root, no loop device, so this test always runs. Webhooks over HTTP
and CallMonitor lines over TCP. Must hold: a refused event gets 503 (never 500), no
empty segment files, /readyz and /metrics raise the alarm, a flood of refusals writes a
bounded log without tracebacks; once space is freed the daemon takes events again by
itself; when PostgreSQL is back with the disk full again, the replay goes on without its
mark and applies nothing twice; every acknowledged event is stored exactly once.
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any, cast

import treq
from twisted.internet import defer, reactor, threads
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

from dpvoip.testing.fritzbox import box_time
from test.support.postgres import query
from test.test_database import eventually
from test.test_fault_db import PATIENCE, FaultCase, _local, _zone
from test.test_spool_hardening import FullDisk, segment_files


class FullDiskTest(FaultCase):
    def event(self, pbx: str) -> dict[str, str]:
        # A caller of its own per call: one signed string belongs to one call (issue 14).
        caller = f"69{zlib.crc32(pbx.encode()) % 10**8:08d}"
        return {"event": "NOTIFY_START", "pbx_call_id": pbx, "call_start": _local(time.time()),
                "caller_id": caller, "called_did": "302107654321"}

    async def get(self, path: str) -> tuple[int, bytes]:
        port = self.daemon.web.port.getHost().port  # type: ignore[union-attr]
        response = await treq.get(f"http://127.0.0.1:{port}{path}", pool=self.http)
        return int(response.code), await response.content()

    def stored(self) -> list[str]:
        return [row[0] for row in query(
            self.dsn, "SELECT pbx_call_id FROM dpvoip.zadarma_event ORDER BY id")]

    async def _full_disk(self) -> None:
        logged: list[dict[str, Any]] = []
        observer = cast(ILogObserver, logged.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        disk = FullDisk()
        spool = self.daemon.durable.spool.spool
        spool.files = disk
        sent: list[str] = []
        acknowledged: list[str] = []
        codes: dict[int, int] = {}

        async def send(pbx: str) -> int:
            sent.append(pbx)
            code = await self.webhook(self.event(pbx))
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                acknowledged.append(pbx)
            return code

        await threads.deferToThread(self.cluster.stop, "fast")
        self.assertEqual(await send("in_before_full"), 200)  # spooled
        disk.full = True
        refused = [await send(f"in_full_{n}") for n in range(200)]
        self.assertEqual(set(refused), {503}, "refused with 503, never 500")
        self.assertTrue(self.box.send(
            f"{box_time(time.time(), _zone())};RING;0;0697111222;2107654321;SIP0;"))
        await eventually(lambda: self.daemon.boxes[0].status.not_recorded >= 1, PATIENCE)
        self.assertLessEqual(len(segment_files(spool.folder)), 1, "no pile of empty files")
        code, body = await self.get("/readyz")
        state = json.loads(body)["spool"]
        self.assertEqual(code, 503)
        self.assertTrue(state["alarm"])
        self.assertIn("ENOSPC", state["disk_error"])
        _, metrics = await self.get("/metrics")
        self.assertIn(b"dpvoip_spool_disk_failing 1.0", metrics)
        self.assertIn(b"dpvoip_spool_alarm 1.0", metrics)
        self.assertIn(b'dpvoip_events_total{path="disk_refused"} 201.0', metrics)
        noisy = [e for e in logged if e["log_level"] >= LogLevel.warn]
        self.assertLessEqual(len(noisy), 40, "a bounded log, not a line per refusal")
        self.assertFalse([e for e in logged if "log_failure" in e], "no traceback")

        disk.full = False  # space freed: taken again, by itself
        for n in range(20):
            self.assertEqual(await send(f"in_after_{n}"), 200)
        code, body = await self.get("/readyz")
        self.assertEqual(json.loads(body)["spool"]["disk_error"], None)

        disk.full = True  # full again as PostgreSQL comes back: the mark cannot be written
        await threads.deferToThread(self.cluster.start)
        await eventually(lambda: not self.daemon.durable.spooling, PATIENCE)
        replayed = self.daemon.durable.counters.replayed
        self.assertEqual(replayed, 21)
        await eventually(lambda: self.daemon.durable.counters.mark_failures > 0, PATIENCE)
        # A few more ticks: nothing is applied again while the mark stays unwritten.
        await defer.Deferred.fromCoroutine(self._ticks(3))
        self.assertEqual(self.daemon.durable.counters.replayed, replayed, "no loop")
        disk.full = False
        await eventually(lambda: not spool.state().mark_behind, PATIENCE)
        self.assertEqual(await send("in_direct"), 200)

        stored = self.stored()
        lost = sorted(set(acknowledged) - set(stored))
        duplicated = len(stored) - len(set(stored))
        print(f"\nfull disk: sent {len(sent)}, acknowledged {len(acknowledged)}, "
              f"refused {codes.get(503, 0)}, other {len(sent) - sum(codes.values())}, "
              f"stored {len(stored)}, lost {len(lost)}, duplicated {duplicated}; "
              f"disk errors {spool.state().disk_errors}, log lines >= warn {len(noisy)}")
        self.assertEqual((lost, duplicated), ([], 0))
        self.assertEqual(set(stored), set(acknowledged))

    async def _ticks(self, seconds: float) -> None:
        from twisted.internet.task import deferLater
        await deferLater(reactor, seconds, lambda: None)

    def test_a_full_disk_is_an_alarm_not_an_outage(self) -> Any:
        return defer.Deferred.fromCoroutine(self._full_disk())
