"""bench/fritz: the CallMonitor path at load.

    .venv/bin/python -m bench.fritz                   # 1,000,000-entry directory, 50 calls/s
    .venv/bin/python -m bench.fritz --entries 100000 --rate 50 --seconds 20

Measures, printed as medians of the run:
- the parser alone, lines per second, beside a bare ``str.split(';')`` of the same lines
  (the reference);
- RING received -> call row (with its log lines, match and NOTIFY) committed: p50/p99;
- DISCONNECT received -> call finalised and its missed-call ticket committed: p50/p99;
at ``--rate`` calls per second, each a missed call from a number of the directory, sent
by a fake box over real TCP on loopback into the daemon's own protocol, tracker and ingest,
against a private PostgreSQL holding ``--entries`` directory entries and ``--history``
past calls in the CRM's tables, vacuumed and analysed once the directory is built (the
steady state: see ``bench.directory.settle``), after two seconds of load not counted (the
pool's connections plan their statements on first use). The RSS of this process is printed before
and after the load. A verdict per quality target; the exit status is 1 when one is missed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from bench.directory import call_history, crm_database, rss_kib, sample_numbers, settle
from bench.verdicts import cpu_hog, p99, report

#: Calls run before the measurement starts, in seconds of load.
WARM_UP_SECONDS = 2.0

LINES = [
    "17.06.20 10:28:29;RING;0;07191952123;69123;SIP0;",
    "17.06.20 10:28:43;CONNECT;0;11;07191952123;",
    "17.06.20 10:30:31;DISCONNECT;0;109;",
    "17.06.20 10:30:57;CALL;1;11;69123;952123;SIP0;",
]


def parser_rate(seconds: float = 2.0) -> tuple[float, float]:
    from dpvoip.fritzbox.parser import parse

    def rate(work: Any) -> float:
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(1000):
                for line in LINES:
                    work(line)
            count += 1000 * len(LINES)
        return count / (time.perf_counter() - started)

    return rate(parse), rate(lambda line: line.split(";"))


def raw_reference(dsn: str, rate: float, count: int) -> tuple[list[float], list[float]]:
    """The reference of quality.md: plain psycopg2 INSERTs on the same database, paced like
    the load. One autocommitted INSERT (a RING's floor), and a two-statement transaction
    with a row lock in between (a missed call's floor)."""
    import psycopg2

    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    cursor = connection.cursor()
    cursor.execute("CREATE TABLE bench_reference (id serial PRIMARY KEY, v text)")
    single, double = [], []
    for n in range(count):
        began = time.perf_counter()
        cursor.execute("INSERT INTO bench_reference (v) VALUES (%s)", (str(n),))
        single.append(time.perf_counter() - began)
        began = time.perf_counter()
        cursor.execute("BEGIN; INSERT INTO bench_reference (v) VALUES (%s) RETURNING id",
                       (str(n),))
        row: Any = cursor.fetchone()
        cursor.execute("SELECT pg_advisory_xact_lock(%s); UPDATE bench_reference SET v = 'x'"
                       " WHERE id = %s; COMMIT", (n, row[0]))
        double.append(time.perf_counter() - began)
        time.sleep(1 / rate)
    connection.close()
    return single, double


def crm_reference(dsn: str, rate: float, count: int) -> list[float]:
    """What the CRM's own rows cost a missed call's end, written with plain psycopg2 (not a
    target's reference; it says how much of the gap to ``raw_reference`` is the CRM's
    schema): the call row locked, then finalised with its two log lines and a new ticket,
    in two round trips, as dpvoip does. Django made the CRM's foreign keys ``DEFERRABLE
    INITIALLY DEFERRED``: each is checked at the COMMIT (a row lock on the row it names),
    whoever writes the rows. Each call row is inserted before, untimed (its RING)."""
    import psycopg2

    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    cursor = connection.cursor()
    cursor.execute("SELECT id FROM accounting_clientprofile ORDER BY id LIMIT 1")
    client = cursor.fetchone()
    samples = []
    for n in range(count):
        cursor.execute(
            "INSERT INTO accounting_voipcall (call_id, direction, phone_number, status,"
            " started_at, duration_seconds, notes, ticket_created, created_at, updated_at,"
            " client_id, resolution) VALUES (%s, 'incoming', '+306900000000', 'active',"
            " now(), 0, '', false, now(), now(), %s, 'pending') RETURNING id",
            (f"bench-crm-reference-{n}", client[0] if client else None))
        row: Any = cursor.fetchone()
        began = time.perf_counter()
        cursor.execute("BEGIN; SELECT pg_advisory_xact_lock(%s); SELECT id, client_id FROM"
                       " accounting_voipcall WHERE id = %s FOR UPDATE", (n, row[0]))
        call, owner = cursor.fetchone()  # type: ignore[misc]
        cursor.execute(
            "WITH ticket AS (INSERT INTO accounting_ticket (title, description, status,"
            " priority, notes, created_at, email_sent, follow_up_scheduled, call_id,"
            " client_id) VALUES ('Missed call', '', 'open', 'medium', '', now(), false,"
            " false, %(call)s, %(client)s) RETURNING id),"
            " done AS (UPDATE accounting_voipcall SET status = 'missed', ended_at = now(),"
            " ticket_created = true, ticket_id = (SELECT id::text FROM ticket),"
            " updated_at = now() WHERE id = %(call)s)"
            " INSERT INTO accounting_voipcalllog (action, description, created_at, call_id)"
            " VALUES ('ended', 'missed', now(), %(call)s), ('ticket', 'created', now(),"
            " %(call)s); COMMIT", {"call": call, "client": owner})
        samples.append(time.perf_counter() - began)
        time.sleep(1 / rate)
    connection.close()
    return samples


def percentiles(samples: list[float]) -> str:
    return (f"p50 {statistics.median(samples) * 1000:.2f} ms,"
            f" p99 {p99(samples) * 1000:.2f} ms, max {max(samples) * 1000:.2f} ms"
            f" (n={len(samples)})")


def load(entries: int, rate: float, seconds: float, history: int) -> dict[str, Any]:
    from twisted.internet import defer, protocol, task, threads
    from twisted.internet.defer import Deferred

    from dpvoip.calls.ingest import Ingest
    from dpvoip.config import DatabaseSettings, FritzBoxSettings, TicketSettings
    from dpvoip.core.happenings import Ended, Started
    from dpvoip.core.numbers import Dialling
    from dpvoip.core.texts import Texts
    from dpvoip.deferreds import OneShotObserver
    from dpvoip.fritzbox.box import FritzBox
    from dpvoip.protocols.callmonitor import CallMonitorProtocol
    from dpvoip.store.database import Store
    from dpvoip.store.directory import DirectoryIndex
    from dpvoip.store.dsn import connection_dsn
    from dpvoip.store.migrations import SchemaReport, prepare
    from dpvoip.store.pool import HealingPool

    figures: dict[str, Any] = {}
    with crm_database(entries) as (dsn, _):
        call_history(dsn, history)
        figures["raw_single"], figures["raw_double"] = raw_reference(dsn, rate, 300)
        figures["raw_crm"] = crm_reference(dsn, rate, 300)

        async def run(reactor: Any) -> None:
            pool = HealingPool(reactor, connection_dsn(dsn, DatabaseSettings()), 8)
            await pool.start()
            store = Store(pool, reactor)
            schema: OneShotObserver[SchemaReport] = OneShotObserver()
            schema.fire(await store.write(
                lambda c: prepare(c, standalone=False, crm_schema="public")))
            index = DirectoryIndex(store, "public", Dialling("GR"))
            await index.build()
            await threads.deferToThread(settle, dsn)
            figures["entries"] = index.state.entries
            # As a Greek line shows callers: the national number, without +30.
            numbers = [n[3:] if n.startswith("+30") else n
                       for n in sample_numbers(dsn, 2000)]
            zone = ZoneInfo("Europe/Athens")
            ingest = Ingest(store, index, Texts("en"), TicketSettings(), zone, schema,
                            reactor)
            box = FritzBox(replace(FritzBoxSettings(), name="bench"), ingest, reactor,
                           frozenset())
            ring_latency: list[float] = []
            end_latency: list[float] = []
            line_at: dict[str, float] = {}
            original_submit = ingest.submit

            def timed_submit(happening: Any, origin: Any,
                             received: datetime | None = None) -> Deferred[None]:
                began = line_at.pop("now")
                done = original_submit(happening, origin, received)

                def took(result: Any) -> Any:
                    elapsed = time.perf_counter() - began
                    if isinstance(happening, Started):
                        ring_latency.append(elapsed)
                    elif isinstance(happening, Ended):
                        end_latency.append(elapsed)
                    return result

                return done.addBoth(took)

            ingest.submit = timed_submit  # type: ignore[method-assign]
            original_line = box.line_received

            def timed_line(text: str) -> None:
                line_at["now"] = time.perf_counter()
                original_line(text)
                line_at.pop("now", None)

            box.line_received = timed_line  # type: ignore[method-assign]

            listener = protocol.ServerFactory()
            listener.protocol = lambda: CallMonitorProtocol(box, reactor)
            port = reactor.listenTCP(0, listener, interface="127.0.0.1")

            client_ready: Deferred[Any] = Deferred()

            class FakeBox(protocol.Protocol):
                def connectionMade(self) -> None:
                    client_ready.callback(self)

            sender = protocol.ClientFactory()
            sender.protocol = FakeBox
            reactor.connectTCP("127.0.0.1", port.getHost().port, sender)
            wire = await client_ready
            figures["rss_before_kib"] = rss_kib()
            import gc

            gc.collect()
            gc.freeze()  # as the daemon does once started: no full collections of startup data
            start = datetime.now(zone).replace(tzinfo=None)
            # The first seconds warm up (each pooled connection plans its statements on
            # first use, as in the first minute of a daemon that then runs for months): run,
            # not counted.
            warm = int(rate * WARM_UP_SECONDS)
            calls = warm + int(rate * seconds)
            for n in range(calls):
                if n == warm:
                    await task.deferLater(reactor, 0.5, lambda: None)
                    del ring_latency[:], end_latency[:]
                    warmed_tickets = ingest.counters.ticket_writes
                    warmed_calls = ingest.counters.calls_ended
                conn = n % 40
                ring_at = start + timedelta(seconds=n / rate)
                stamp = f"{ring_at:%d.%m.%y %H:%M:%S}"
                end_stamp = f"{ring_at + timedelta(seconds=15):%d.%m.%y %H:%M:%S}"
                caller = random.choice(numbers)
                wire.transport.write(f"{stamp};RING;{conn};{caller};7654321;SIP0;\r\n".encode())
                reactor.callLater(0.2, wire.transport.write,
                                  f"{end_stamp};DISCONNECT;{conn};0;\r\n".encode())
                await task.deferLater(reactor, 1 / rate, lambda: None)
            await task.deferLater(reactor, 2, lambda: None)
            while box.pending:
                await defer.DeferredList(list(box.pending))
            figures["rss_after_kib"] = rss_kib()
            figures["ring"] = ring_latency
            figures["end"] = end_latency
            figures["tickets"] = ingest.counters.ticket_writes - warmed_tickets
            figures["calls"] = ingest.counters.calls_ended - warmed_calls
            wire.transport.loseConnection()
            await port.stopListening()
            pool.close()

        try:
            task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
        except SystemExit as exit_:
            if exit_.code:
                raise RuntimeError("bench failed") from None
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--history", type=int, default=200_000,
                        help="past calls in the CRM (with three log lines each)")
    parser.add_argument("--hog", action="store_true",
                        help="keep one core busy with another process meanwhile")
    args = parser.parse_args()
    with cpu_hog(args.hog):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    runs = [parser_rate() for _ in range(3)]
    parsed = statistics.median(r[0] for r in runs)
    split = statistics.median(r[1] for r in runs)
    print(f"parser: {parsed:,.0f} lines/s (str.split reference {split:,.0f} lines/s,"
          f" ratio {parsed / split:.2f})")
    figures = load(args.entries, args.rate, args.seconds, args.history)
    print(f"load: {figures['calls']} missed calls at {args.rate:g}/s, directory"
          f" {figures['entries']:,} entries, {figures['tickets']} ticket writes")
    print(f"RING -> call row committed: {percentiles(figures['ring'])}")
    print(f"DISCONNECT -> call finalised + ticket committed: {percentiles(figures['end'])}")
    print(f"reference, raw psycopg2 at the same pace: one INSERT"
          f" {percentiles(figures['raw_single'])}; a two-round-trip transaction"
          f" {percentiles(figures['raw_double'])}")
    print(f"for scale, not a reference of a target: raw psycopg2 writing the CRM's rows of a"
          f" missed call's end (call finalised, two log lines, a ticket; two round trips;"
          f" the CRM's deferred foreign keys checked at the COMMIT)"
          f" {percentiles(figures['raw_crm'])}")
    print(f"RSS: {figures['rss_before_kib'] // 1024} MiB before the load,"
          f" {figures['rss_after_kib'] // 1024} MiB after")
    missed = report([
        ("CallMonitor parser >= 200,000 lines/s", parsed >= 200_000),
        ("RING -> call row committed p99 <= 5 ms", p99(figures["ring"]) <= 0.005),
        ("DISCONNECT -> call finalised + ticket committed p99 <= 5 ms",
         p99(figures["end"]) <= 0.005),
        ("RING p99 within 2 ms of raw psycopg2's one INSERT",
         p99(figures["ring"]) <= p99(figures["raw_single"]) + 0.002),
        ("DISCONNECT p99 within 2 ms of raw psycopg2's two round trips",
         p99(figures["end"]) <= p99(figures["raw_double"]) + 0.002),
        ("RSS <= 72 MB under load", figures["rss_after_kib"] * 1024 <= 72_000_000),
    ])
    if missed:
        raise SystemExit(f"{len(missed)} quality target(s) missed")


if __name__ == "__main__":
    main()
