"""bench/replay: how fast the spool drains into PostgreSQL, beside the direct path.

    .venv/bin/python -m bench.replay                  # 6,000 events, 10,000-entry directory
    .venv/bin/python -m bench.replay --events 20000 --arrival 0.8
    .venv/bin/python -m bench.replay --source zadarma  # signed webhook forms instead

Against a private PostgreSQL with the 2025-12 CRM's tables, through the daemon's own
ingest and spool (a real spool folder, fsynced), with Fritz!Box happenings (each call a
Started and an Ended, a missed call of a directory number, so a ticket too), or with
Zadarma's NOTIFY_START and NOTIFY_END of missed calls (journal, call, ticket). Every call
is missed unless ``--answered`` says what share is picked up (an Answered or
NOTIFY_ANSWER more, no ticket: ``--answered 0.8`` is an office's usual day):

- direct: the events submitted straight to the ingest, 32 at a time (what the direct
  path sustains: the arrival rate the replay must beat), events/s;
- drain: the same number of events spooled first, then replayed: one event per
  transaction with 32 in flight (the replay before issue 14's groups), and in groups
  (``--group`` events per transaction, ``--lanes`` transactions at once: the daemon's),
  events/s;
- drain under arrival: a spool of ``--events`` replayed while new events arrive through
  the durable entry point at ``--arrival`` times the direct rate (or ``--rate`` events/s:
  ``--events 1600 --rate 400`` is a 4 s outage at 400 webhooks/s); how long until the
  spool is empty, the drain's net rate, and the share of the arriving events that went
  straight to the database beside the replay (new calls need not wait behind it).

Each figure is the median of ``--runs`` runs, with the ratio to the direct rate.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.directory import crm_database, rss_kib, sample_numbers, settle
from bench.verdicts import cpu_hog


def happenings(count: int, numbers: list[str], offset: int,
               answered: float = 0.0) -> list[Any]:
    """``count`` events of incoming calls from directory numbers, interleaved by two (a
    call's answer and end come after the next call's start): a missed call is a Started
    and an Ended (and a ticket); ``answered``, the share of calls picked up (a Started, an
    Answered and an Ended, no ticket: an office's usual day)."""
    from dpvoip.core.happenings import Answered, Ended, Started
    from dpvoip.core.outcomes import Outcome

    base = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
    events: list[Any] = []
    pending: list[Any] = []
    n = offset
    while len(events) + len(pending) < count:
        at = base + timedelta(seconds=n)
        call = f"fb-bench-{n}"
        events.append(Started(call, "bench", n % 40, "incoming", random.choice(numbers),
                              "2107654321", "SIP0", None, at))
        events.extend(pending)
        if _picked_up(n, answered):
            pending = [Answered(call, 11, at + timedelta(seconds=5)),
                       Ended(call, Outcome.ANSWERED, 60, at + timedelta(seconds=65), 11)]
        else:
            pending = [Ended(call, Outcome.MISSED, 0, at + timedelta(seconds=20), None)]
        n += 1
    events.extend(pending)
    return events


def _picked_up(n: int, answered: float) -> bool:
    """Whether call ``n`` is answered: spread evenly, ``answered`` of the calls."""
    return int((n + 1) * answered) > int(n * answered)


def zadarma_forms(count: int, numbers: list[str], offset: int,
                  answered: float = 0.0) -> list[dict[str, str]]:
    """``count`` Zadarma webhook forms, interleaved by two like ``happenings``: a missed
    call's NOTIFY_START and NOTIFY_END (a ticket), an answered one's NOTIFY_START,
    NOTIFY_ANSWER and NOTIFY_END; each call its own signed string (its caller and second
    of start), all started within the guard's freshness window."""
    from zoneinfo import ZoneInfo

    base = datetime.now(ZoneInfo("Europe/Athens")).replace(tzinfo=None) - timedelta(hours=3)
    forms: list[dict[str, str]] = []
    pending: list[dict[str, str]] = []
    n = offset
    while len(forms) + len(pending) < count:
        common = {"pbx_call_id": f"in_bench{n:032d}",
                  "call_start": f"{base + timedelta(seconds=n % 10000):%Y-%m-%d %H:%M:%S}",
                  "caller_id": "+30" + random.choice(numbers).lstrip("0")}
        forms.append({"event": "NOTIFY_START", **common, "called_did": "302107654321"})
        forms.extend(pending)
        end = {"event": "NOTIFY_END", **common, "called_did": "302107654321",
               "is_recorded": "0", "calltype": "normal"}
        if _picked_up(n, answered):
            pending = [{"event": "NOTIFY_ANSWER", **common, "destination": "100",
                        "internal": "100", "calltype": "normal"},
                       {**end, "duration": "60", "disposition": "answered",
                        "status_code": "16", "internal": "100"}]
        else:
            pending = [{**end, "duration": "0", "disposition": "no answer",
                        "status_code": "19"}]
        n += 1
    forms.extend(pending)
    return forms


class Away:
    """The ingest, as if the database were gone while ``down`` (a connection lost)."""

    def __init__(self, ingest: Any) -> None:
        self.ingest = ingest
        self.down = False

    def _gone(self) -> Any:
        from twisted.internet import defer
        from txpostgres.reconnection import ConnectionDead

        return defer.fail(ConnectionDead())

    def submit(self, *args: Any) -> Any:
        return self._gone() if self.down else self.ingest.submit(*args)

    def submit_zadarma(self, *args: Any) -> Any:
        return self._gone() if self.down else self.ingest.submit_zadarma(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ingest, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--arrival", type=float, default=1.0,
                        help="arrival rate during the drain, as a share of the direct rate")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="arrival rate during the drain in events/s (instead of --arrival)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lanes", type=int, default=0,
                        help="transactions at once (default: the daemon's, for its pool of 4)")
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--source", choices=["fritzbox", "zadarma"], default="fritzbox",
                        help="Fritz!Box happenings, or signed Zadarma webhook forms")
    parser.add_argument("--answered", type=float, default=0.0,
                        help="the share of calls answered (default none: every call missed,"
                        " with a ticket, the dearest kind)")
    parser.add_argument("--hog", action="store_true",
                        help="keep one core busy with another process meanwhile")
    options = parser.parse_args()
    from dpvoip.spool.durable import replay_lanes

    options.lanes = options.lanes or replay_lanes(4)

    from twisted.internet import defer, task, threads

    from dpvoip.calls.ingest import Ingest, Origin
    from dpvoip.config import DatabaseSettings, TicketSettings
    from dpvoip.core.numbers import Dialling
    from dpvoip.core.texts import Texts
    from dpvoip.deferreds import OneShotObserver
    from dpvoip.spool.durable import DurableIngest
    from dpvoip.spool.journal import AsyncSpool, Spool
    from dpvoip.spool.records import fritz_record
    from dpvoip.store.database import Store
    from dpvoip.store.directory import DirectoryIndex
    from dpvoip.store.dsn import connection_dsn
    from dpvoip.store.migrations import SchemaReport, prepare
    from dpvoip.store.pool import HealingPool

    figures: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    with crm_database(options.entries) as (dsn, _):
        async def run(reactor: Any) -> None:
            from zoneinfo import ZoneInfo

            pool = HealingPool(reactor, connection_dsn(dsn, DatabaseSettings()), 4)
            await pool.start()
            store = Store(pool, reactor)
            schema: OneShotObserver[SchemaReport] = OneShotObserver()
            schema.fire(await store.write(
                lambda c: prepare(c, standalone=False, crm_schema="public")))
            index = DirectoryIndex(store, "public", Dialling("GR"))
            await index.build()
            # As the daemon does (``StatisticsService``): plans follow the tables' growth.
            from dpvoip.store.statistics import PlannerStatistics

            planner = PlannerStatistics(store)
            refreshing = task.LoopingCall(lambda: defer.Deferred.fromCoroutine(
                planner.refresh()))
            refreshed = refreshing.start(10.0, now=False)
            await threads.deferToThread(settle, dsn)
            numbers = [n[3:] if n.startswith("+30") else n
                       for n in sample_numbers(dsn, 9000)]
            ingest = Ingest(store, index, Texts("en"), TicketSettings(),
                            ZoneInfo("Europe/Athens"), schema, reactor)
            origin = Origin("bench", Dialling("GR"))
            offset = 0

            from dpvoip.calls.ingest import ZadarmaContext
            from dpvoip.spool.records import zadarma_record
            from dpvoip.zadarma.events import parse_event

            context = ZadarmaContext(Dialling("GR"), ZoneInfo("Europe/Athens"),
                                     tickets=True)
            zadarma = options.source == "zadarma"

            phases = 0

            def fresh(count: int, callers: list[str] | None = None) -> list[Any]:
                """The events of one phase, from numbers of its own: every phase finds
                the same history of calls and tickets per number (sharing the numbers,
                each phase would find more than the one before, and look slower).
                ``callers``: these numbers instead."""
                nonlocal offset, phases
                share = len(numbers) // 16
                mine = callers or numbers[(phases % 16) * share:(phases % 16 + 1) * share]
                phases += 1
                events: list[Any] = (
                    [(parse_event(f), f)
                     for f in zadarma_forms(count, mine, offset, options.answered)]
                    if zadarma else happenings(count, mine, offset, options.answered))
                offset += count
                return events

            def submit(to: Any, event: Any) -> Any:
                """One event to the ingest or to the durable entry point."""
                if zadarma:
                    return to.submit_zadarma(event[0], event[1], context)
                return to.submit(event, origin)

            def record(event: Any) -> bytes:
                if zadarma:
                    return zadarma_record(event[1], datetime.now(UTC))
                return fritz_record(event, "bench", event.at)

            async def direct(events: list[Any], window: int = 32) -> float:
                began = time.perf_counter()
                flying: set[defer.Deferred[None]] = set()

                def landed(_: object, done: defer.Deferred[None]) -> None:
                    flying.discard(done)

                for event in events:
                    while len(flying) >= window:
                        await defer.DeferredList(list(flying), fireOnOneCallback=True)
                    done = submit(ingest, event)
                    flying.add(done)
                    done.addBoth(landed, done)
                await defer.DeferredList(list(flying))
                return len(events) / (time.perf_counter() - began)

            async def spooled(events: list[Any], lanes: int, group: int,
                              outage: bool = False) -> tuple[Any, Any, Path]:
                """A spool holding ``events``: written straight to it (the last run's), or
                spooled by the durable entry point during an outage (``outage``: so that it
                knows what each record holds back)."""
                folder = Path(tempfile.mkdtemp(prefix="dpvoip-bench-spool-"))
                spool = AsyncSpool(Spool(folder, max_bytes=256 * 1024 * 1024), reactor)
                await spool.start()
                away = Away(ingest)
                durable = DurableIngest(away, spool, store, schema, reactor,  # type: ignore[arg-type]
                                        {"bench": origin}, lambda _provider: context, "GR",
                                        deadline=5.0, lanes=lanes, group=group)
                if outage:
                    assert await durable.replay()  # empty: from now on it counts
                away.down = True
                for start in range(0, len(events), 500):
                    await defer.gatherResults([
                        submit(durable, e) if outage else spool.append(record(e))
                        for e in events[start:start + 500]])
                away.down = False
                return durable, spool, folder

            await direct(fresh(400))  # warm up: each connection plans its statements
            for _ in range(options.runs):
                rate = await direct(fresh(options.events))
                note("direct events/s", rate)
                for name, lanes, group in (
                        ("drain, one event per transaction, 32 at once", 32, 1),
                        (f"drain, {options.group} per transaction, {options.lanes} at once",
                         options.lanes, options.group)):
                    durable, spool, folder = await spooled(fresh(options.events), lanes, group)
                    began = time.perf_counter()
                    assert await durable.replay()
                    note(f"{name}: events/s", options.events / (time.perf_counter() - began))
                    await spool.stop()
                    shutil.rmtree(folder, ignore_errors=True)

                # Draining while events keep arriving at a share of the direct rate.
                durable, spool, folder = await spooled(fresh(options.events), options.lanes,
                                                       options.group, outage=True)
                arrival = options.rate or rate * options.arrival
                # The office's callers during the drain: its whole directory but the
                # backlog's (a phase's 1/16 would have each number call every few seconds,
                # which no office sees, and hold most of them behind the spool).
                share = len(numbers) // 16
                backlog = set(numbers[((phases - 1) % 16) * share:((phases - 1) % 16 + 1) * share])
                arriving = fresh(int(arrival * 120), [n for n in numbers if n not in backlog])
                sent = 0
                counted = durable.counters
                before = (counted.backed_up, counted.timed_out, counted.spooled_behind)
                began = time.perf_counter()
                rss = rss_kib()
                replay = durable.replay()
                landing: list[defer.Deferred[Any]] = []
                while not replay.called and sent < len(arriving):
                    due = int((time.perf_counter() - began) * arrival)
                    while sent < min(due, len(arriving)):
                        landing.append(submit(durable, arriving[sent]))
                        sent += 1
                    await task.deferLater(reactor, 0.01, lambda: None)
                assert await replay
                took = time.perf_counter() - began
                note("drain under arrival: seconds until the spool is empty", took)
                note("drain under arrival: net events/s", (options.events + sent) / took)
                note("drain under arrival: arrivals straight to the database, %",
                     100.0 * counted.ahead / max(1, sent))
                note("drain under arrival: RSS growth KiB", rss_kib() - rss)
                # Why the others were spooled: the admission judged the database too far
                # behind, the attempt outlived its deadline, or its call was in the spool.
                for name, now, then in zip(
                        ("judged behind", "timed out", "behind their call"),
                        (counted.backed_up, counted.timed_out, counted.spooled_behind),
                        before, strict=True):
                    note(f"drain under arrival: arrivals spooled, {name}, %",
                         100.0 * (now - then) / max(1, sent))
                await defer.DeferredList(landing)
                await durable.idle()
                await spool.stop()
                shutil.rmtree(folder, ignore_errors=True)
            direct_rate = statistics.median(figures["direct events/s"])
            print(f"bench.replay: {options.source}, {options.events} events a run"
                  f" ({options.answered:.0%} of the calls answered), "
                  f"{options.runs} runs, "
                  f"{options.group} events per transaction, {options.lanes} at once, "
                  f"directory {index.state.entries} entries "
                  f"(medians; ratio to the direct rate)")
            for name, values in figures.items():
                value = statistics.median(values)
                ratio = (f"  ({value / direct_rate:.2f} x direct)"
                         if name.endswith("events/s") else "")
                print(f"  {name:<50} {value:>10.1f}{ratio}")
            refreshing.stop()
            await refreshed  # a refresh under way ends before its connection is closed
            pool.close()

        with cpu_hog(options.hog):
            task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    raise SystemExit(main())
