"""bench/directory: index build time, lookup latency and the daemon's memory at scale.

    .venv/bin/python -m bench.directory                  # 100,000 then 1,000,000 entries
    .venv/bin/python -m bench.directory --entries 200000 # one scale

Synthetic rows go into the CRM's real tables (the 2025-12 DDL) of a private PostgreSQL,
with numbers in the messy formats people type. Each scale runs in a fresh process so that
its memory figures are its own. Printed: build seconds, lookup p50/p99/max over
``--lookups`` sequential lookups (one database round trip each), the round trip of a bare
``SELECT 1`` through the same pool as the reference, and RSS before and after the build.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

from bench.verdicts import StallWatch, cpu_hog, report

#: Share of the directory entries per source, and phone columns filled per row.
PLAN = (  # companies first: contacts point at them
    ("crm_company", 0.10, ("phone",)),
    ("accounting_clientprofile", 0.40, ("kinito_tilefono", "tilefono_oikias_1")),
    ("crm_contact", 0.30, ("mobile", "phone")),
    ("crm_lead", 0.20, ("mobile", "company_phone")),
)

#: Messy Greek formats, chosen by row: (SQL expression over a 10-digit national number n).
FORMATS = (
    "'+30 ' || substr({n},1,3) || ' ' || substr({n},4,3) || ' ' || substr({n},7)",
    "'0030' || {n}",
    "substr({n},1,3) || '-' || substr({n},4,3) || '-' || substr({n},7)",
    "'(' || substr({n},1,3) || ') ' || substr({n},4,3) || ' ' || substr({n},7)",
    "substr({n},1,3) || '.' || substr({n},4,3) || '.' || substr({n},7)",
    "{n}",
    "'+30' || {n}",
)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _required_columns(cursor: Any, table: str) -> list[tuple[str, str]]:
    cursor.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema ="
        " 'public' AND table_name = %s AND is_nullable = 'NO' AND column_name <> 'id'",
        (table,),
    )
    return list(cursor.fetchall())


def _fill(kind: str) -> str:
    if kind.startswith("timestamp"):
        return "now() - (g % 1000) * interval '1 minute'"
    return {"boolean": "false", "date": "current_date", "integer": "0", "bigint": "0",
            "smallint": "0", "numeric": "0", "jsonb": "'{}'"}.get(kind, "''")


def populate(dsn: str, entries: int) -> dict[str, int]:
    """Insert rows giving about ``entries`` directory entries; returns rows per table."""
    import psycopg2

    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    rows: dict[str, int] = {}
    offset = 0
    with connection.cursor() as cursor:
        for table, share, phones in PLAN:
            count = max(1, int(entries * share / len(phones)))
            rows[table] = count
            values: dict[str, str] = {c: _fill(k) for c, k in _required_columns(cursor, table)}
            values.update({
                "accounting_clientprofile": {"afm": "lpad(g::text, 9, '0')",
                                             "eponimia": "'Client ' || g",
                                             "is_active": "g % 5 <> 0"},
                "crm_contact": {"first_name": "'Contact'", "last_name": "g::text",
                                "company_id": "1 + g % greatest(1, %(companies)s)",
                                "token": "'c' || g"},
                "crm_lead": {"first_name": "'Lead'", "last_name": "g::text", "token": "'l' || g"},
                "crm_company": {"full_name": "'Company ' || g", "token": "'o' || g"},
            }[table])
            for index, column in enumerate(phones):
                # Unique 10-digit numbers: mobiles 69xxxxxxxx, landlines 2xxxxxxxxx.
                base = f"(({offset} + {index} * {count} + g)::bigint)"
                prefix = "'69'" if column in ("kinito_tilefono", "mobile") else "'21'"
                number = f"({prefix} || lpad(({base} % 100000000)::text, 8, '0'))"
                choice = " ".join(
                    f"WHEN {i} THEN {fmt.format(n=number)}" for i, fmt in enumerate(FORMATS)
                )
                values[column] = f"CASE (g + {index}) % {len(FORMATS)} {choice} END"
            offset += count * len(phones)
            columns = ", ".join(f'"{c}"' for c in values)
            expressions = ", ".join(values.values())
            statement = (f"INSERT INTO public.{table} ({columns}) SELECT {expressions}"
                         f" FROM generate_series(1, {count}) g")
            cursor.execute(statement.replace("%(companies)s", str(rows["crm_company"])))
        cursor.execute("VACUUM ANALYZE")  # settled tables, as a CRM's are, not autovacuum mid-run
    connection.close()
    return rows


@contextlib.contextmanager
def crm_database(entries: int) -> Iterator[tuple[str, float]]:
    """A private PostgreSQL holding the 2025-12 CRM tables filled with ``entries``
    directory entries; (its DSN, seconds it took to fill). Removed afterwards."""
    import psycopg2

    from dpvoip.store.embedded import EmbeddedPostgres
    from dpvoip.store.migrations import ddl_text

    folder = Path(tempfile.mkdtemp(prefix="dpvoip-bench-"))
    folder.chmod(0o755)
    cluster = EmbeddedPostgres(folder / "pg")
    try:
        cluster.start()
        dsn = cluster.dsn()
        connection = psycopg2.connect(dsn)
        connection.autocommit = True
        connection.cursor().execute(ddl_text("dpeconomy-2025-12.sql"))
        connection.close()
        started = time.perf_counter()
        populate(dsn, entries)
        yield dsn, time.perf_counter() - started
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(folder, ignore_errors=True)


def call_history(dsn: str, calls: int) -> None:
    """``calls`` past calls with three log lines each: the CRM of an office that has been
    phoning for years, not an empty one (see ``settle``)."""
    import psycopg2

    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO accounting_voipcall (call_id, direction, phone_number, status,"
            " started_at, ended_at, duration_seconds, notes, ticket_created, created_at,"
            " updated_at, resolution) SELECT 'past-' || g, CASE WHEN g %% 3 = 0 THEN"
            " 'outgoing' ELSE 'incoming' END, '+30210' || lpad(g::text, 7, '0'),"
            " 'completed', now() - g * interval '7 minutes', now() - g * interval '7 minutes'"
            " + interval '65 seconds', 65, 'answered', false, now(), now(), 'pending'"
            " FROM generate_series(1, %s) g", (calls,))
        cursor.execute(
            "INSERT INTO accounting_voipcalllog (action, description, created_at, call_id)"
            " SELECT a, 'history', c.started_at, c.id FROM accounting_voipcall c,"
            " unnest(ARRAY['started', 'client_matched', 'ended']) a")
    connection.close()


def settle(dsn: str) -> None:
    """VACUUM and ANALYZE everything, as autovacuum long has in an office's database: the
    benchmarks measure the steady state, not the first minutes after a bulk load.

    An empty call table is no steady state: PostgreSQL plans a connection's foreign-key
    checks once, and a plan made while ``accounting_voipcall`` was empty scans the whole
    table for every log line until autovacuum's next ANALYZE replans it; and a bulk load
    leaves autovacuum a million rows to visit in the middle of the measurement.

    Then a CHECKPOINT: the load and the VACUUM leave hundreds of megabytes of dirty pages,
    which the next checkpoint writes and syncs; one falling within a measurement stalled
    every statement for up to a quarter of a second (a p99 of 60 ms at 50 calls/s). An
    office's checkpoints write the few megabytes its calls changed.
    """
    import psycopg2

    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE)")
        cursor.execute("CHECKPOINT")
    connection.close()


def sample_numbers(dsn: str, count: int) -> list[str]:
    import psycopg2

    connection = psycopg2.connect(dsn)
    with connection.cursor() as cursor:
        cursor.execute("SELECT number FROM dpvoip.directory_entry TABLESAMPLE SYSTEM (5)"
                       " LIMIT %s", (count,))
        numbers = [r[0] for r in cursor.fetchall()]
        if len(numbers) < count:  # a small table: 5 % of its pages may be none at all
            cursor.execute("SELECT number FROM dpvoip.directory_entry ORDER BY random()"
                           " LIMIT %s", (count,))
            numbers = [r[0] for r in cursor.fetchall()]
    connection.close()
    random.shuffle(numbers)
    return numbers


def child(entries: int, lookups: int) -> dict[str, Any]:
    """One scale, in this process: populate, build with the daemon's code, look up."""
    from twisted.internet import defer, task

    from dpvoip.config import DatabaseSettings
    from dpvoip.core.numbers import Dialling
    from dpvoip.store.database import Store
    from dpvoip.store.directory import DirectoryIndex
    from dpvoip.store.dsn import connection_dsn
    from dpvoip.store.migrations import prepare
    from dpvoip.store.pool import HealingPool

    result: dict[str, Any] = {"entries_target": entries}
    with crm_database(entries) as (dsn, filled):
        result["populate_s"] = round(filled, 1)

        async def run(reactor: Any) -> None:
            pool = HealingPool(reactor, connection_dsn(dsn, DatabaseSettings()), 4)
            await pool.start()
            store = Store(pool, reactor)
            await store.write(lambda c: prepare(c, standalone=False, crm_schema="public"))
            index = DirectoryIndex(store, "public", Dialling("GR"))
            result["rss_before_build_kib"] = rss_kib()
            watch = StallWatch(reactor)
            watch.start()
            began = time.perf_counter()
            await index.build()
            result["build_s"] = round(time.perf_counter() - began, 2)
            watch.stop()
            result["longest_stall_ms"] = round(watch.longest * 1000, 1)
            result["stalls_over_50ms"] = watch.over_50ms
            result["entries"] = index.state.entries
            result["rss_after_build_kib"] = rss_kib()
            numbers = sample_numbers(dsn, lookups)
            latencies, reference = [], []
            for number in numbers:
                t0 = time.perf_counter()
                match = await index.lookup(number)
                latencies.append(time.perf_counter() - t0)
                if match is None:
                    raise AssertionError(f"{number} not found")
                t0 = time.perf_counter()
                await store.read("SELECT 1")
                reference.append(time.perf_counter() - t0)
            result["lookups"] = len(latencies)
            result["lookup_ms"] = _percentiles(latencies)
            result["select1_ms"] = _percentiles(reference)
            result["rss_after_lookups_kib"] = rss_kib()
            pool.close()

        with_code: list[int] = []
        try:
            task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
        except SystemExit as exit_:
            with_code.append(int(exit_.code or 0))
        if with_code and with_code[0]:
            raise RuntimeError("benchmark run failed")
    return result


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered) * 1000, 3),
        "p99": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 3),
        "max": round(ordered[-1] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, action="append",
                        help="directory entries (repeatable); default 100,000 and 1,000,000")
    parser.add_argument("--lookups", type=int, default=5000)
    parser.add_argument("--hog", action="store_true",
                        help="keep one core busy with another process meanwhile")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.entries[0], args.lookups)))
        return
    missed: list[str] = []
    for entries in args.entries or [100_000, 1_000_000]:
        with cpu_hog(args.hog):
            done = subprocess.run(
                [sys.executable, "-m", "bench.directory", "--child", "--entries", str(entries),
                 "--lookups", str(args.lookups)],
                capture_output=True, text=True, check=False, timeout=1800,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            )
        if done.returncode != 0:
            print(done.stdout, done.stderr, file=sys.stderr)
            raise SystemExit(f"bench at {entries} entries failed")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        lookup, select1 = figures["lookup_ms"], figures["select1_ms"]
        print(
            f"directory {figures['entries']:>9,} entries: build {figures['build_s']:.1f}s"
            f" (populate {figures['populate_s']}s); lookup p50 {lookup['p50']:.3f} ms,"
            f" p99 {lookup['p99']:.3f} ms, max {lookup['max']:.2f} ms over"
            f" {figures['lookups']} lookups; SELECT 1 p50 {select1['p50']:.3f} ms"
            f" p99 {select1['p99']:.3f} ms (lookup/SELECT1 p99 ratio"
            f" {lookup['p99'] / select1['p99']:.1f}); RSS before build"
            f" {figures['rss_before_build_kib'] // 1024} MiB, after build"
            f" {figures['rss_after_build_kib'] // 1024} MiB, after lookups"
            f" {figures['rss_after_lookups_kib'] // 1024} MiB; the reactor held at most"
            f" {figures['longest_stall_ms']:.1f} ms during the build"
            f" ({figures['stalls_over_50ms']} times over 50 ms)"
        )
        if entries >= 1_000_000:
            missed.extend(report([
                ("directory of 1,000,000 built in <= 30 s", figures["build_s"] <= 30),
                ("reactor held <= 50 ms at a time during the build",
                 figures["longest_stall_ms"] <= 50),
            ]))
    if missed:
        raise SystemExit(f"{len(missed)} quality target(s) missed")


if __name__ == "__main__":
    main()


class BenchDaemon(NamedTuple):
    """A daemon a bench started in its own process (``started_daemon``)."""

    daemon: Any  # dpvoip.service.Daemon
    port: int  # its web port on 127.0.0.1
    state: Path  # its state folder (and its log)
    log: IO[str]

    async def stop(self) -> None:
        await self.daemon.service.stopService()
        self.log.close()
        shutil.rmtree(self.state, ignore_errors=True)


async def started_daemon(config: Any, reactor: Any, dsn: str) -> BenchDaemon:
    """The whole daemon of ``config`` built in this process and started, its directory
    built and the database settled. Logged as `dpvoip run` logs (the access log
    included), to a file in its state folder: formatting and writing a line per request
    is part of the daemon's cost, and events not written would pile up in Twisted's
    start-up buffer instead."""
    from twisted.internet import task, threads
    from twisted.logger import globalLogBeginner

    from dpvoip.logs import observer
    from dpvoip.service import build

    state = Path(tempfile.mkdtemp(prefix="dpvoip-bench-"))
    log_file = (state / "dpvoip.log").open("w", encoding="utf-8")
    globalLogBeginner.beginLoggingTo(
        [observer(config.log.format, config.log.level, log_file)], redirectStandardIO=False)
    daemon = build(config, reactor, state)
    daemon.service.startService()
    await daemon.service.started
    while not daemon.directory.state.built:
        await task.deferLater(reactor, 0.5, lambda: None)
    await threads.deferToThread(settle, dsn)
    port = daemon.web.port.getHost().port  # type: ignore[union-attr]
    return BenchDaemon(daemon, port, state, log_file)
