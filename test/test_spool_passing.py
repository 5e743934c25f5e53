"""A replay drains while new calls keep arriving: events of calls and numbers that have
nothing left in the spool go straight to the database beside the replay, the others wait
behind it; what ends up in the CRM is what the same events write one by one, in the order
they arrived (real PostgreSQL, both CRM versions, the real ingest and spool)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from txpostgres.reconnection import ConnectionDead

from dpvoip.calls.ingest import Ingest, Submission, ZadarmaSubmission
from dpvoip.spool.durable import DurableIngest
from dpvoip.spool.journal import AsyncSpool, Spool
from test.support.crm import Crm
from test.support.daemon import scratch
from test.test_ingest import zadarma_call
from test.test_ingest_together import ARRIVED, TogetherTests, submissions


class Outage:
    """The real ingest, away while ``down``; ``hold_group``: the replay's transaction of
    that number (counted from 1) waits until ``go`` fires, so that new events arrive while
    the replay is under way and has committed before."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self.down = False
        self.groups = 0
        self.hold_group = 2
        self.go: Deferred[None] = Deferred()

    def submit(self, *args: Any) -> Deferred[None]:
        if self.down:
            return defer.fail(ConnectionDead())
        return self.ingest.submit(*args)

    def submit_zadarma(self, *args: Any) -> Deferred[Any]:
        if self.down:
            return defer.fail(ConnectionDead())
        return self.ingest.submit_zadarma(*args)

    def apply_together(self, items: Sequence[Any], then: Any = None) -> Deferred[None]:
        self.groups += 1
        if self.groups == self.hold_group:
            return self.go.addCallback(lambda _: self.ingest.apply_together(items, then))
        return self.ingest.apply_together(items, then)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ingest, name)


def comparable(rows: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """The rows without the order in which independent calls' tickets were numbered
    (a call that went past the replay may take an earlier ticket number than in the
    order of arrival); which call a ticket belongs to stays compared."""
    def plain(value: Any) -> Any:
        return re.sub(r"#\d+", "#N", value) if isinstance(value, str) else value

    calls = [(*row[:9], row[9] is not None, *row[10:]) for row in rows["calls"]]
    return {name: sorted((tuple(plain(v) for v in row) for row in table), key=repr)
            for name, table in dict(rows, calls=calls).items()}


class ArrivedClock:
    """The reactor's timers, and every event stamped as arrived at ``ARRIVED`` (the one-by-one
    twin is given the same time)."""

    def seconds(self) -> float:
        return ARRIVED.timestamp()

    def callLater(self, *args: Any, **kwargs: Any) -> Any:
        return reactor.callLater(*args, **kwargs)


class PassingTheReplayTests(TogetherTests):
    crm_version = "2025-12"

    def clients(self, crm: Crm) -> None:
        super().clients(crm)
        crm.client("Georgiou IKE", kinito_tilefono="691 234 5670")

    def day_of_calls(self) -> list[Submission | ZadarmaSubmission]:
        """The day of ``TogetherTests``, and a Zadarma call of a third client whose number
        has nothing in the spool: it rings as the replay begins (the seventh event; a
        DISCONNECT looked for in the database, later in the day, holds back what follows
        it)."""
        items = super().day_of_calls()
        third: list[Submission | ZadarmaSubmission] = []
        third += submissions(zadarma_call("+306912345670", "in_" + "5" * 40, answered=True,
                                          start="2026-01-15 09:09:00"), self.context)
        return items[:6] + third + items[6:]

    def submit(self, durable: DurableIngest, item: Submission | ZadarmaSubmission
               ) -> Deferred[Any]:
        if isinstance(item, ZadarmaSubmission):
            return durable.submit_zadarma(item.event, item.form, item.context)
        return durable.submit(item.happening, item.origin)

    @defer.inlineCallbacks
    def test_new_calls_pass_the_replay_and_the_crm_gets_what_one_by_one_writes(self) -> Any:
        self.clients(self.crm)
        yield self.build_directory()
        items = self.day_of_calls()
        outage = Outage(self.ingest)
        spool = AsyncSpool(Spool(Path(scratch(self)) / "spool"), reactor)
        yield spool.start()
        self.addCleanup(spool.stop)
        durable = DurableIngest(cast(Ingest, outage), spool, self.store, self.schema,
                                ArrivedClock(), {self.origin.name: self.origin},
                                lambda _provider: replace(self.context, tickets=True),
                                "GR", deadline=30.0, lanes=1, group=2)
        self.assertTrue((yield durable.replay()), "an empty spool to begin with")

        # The database is away for the first calls' events (both missed calls of one
        # client among them), then back: the replay begins, commits its first group ...
        outage.down = True
        first, then = items[:6], items[6:]
        for item in first:
            yield self.submit(durable, item)
        self.assertEqual(durable.counters.spooled, 6)
        outage.down = False
        replay = durable.replay()
        for _ in range(500):  # bounded: the first group's commit, on a loaded machine too
            if outage.groups >= 2:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(outage.groups, 2, "the replay's second transaction is waiting")

        # ... and the rest of the day arrives while it is under way.
        arriving = [self.submit(durable, item) for item in then]
        rings = arriving[0]  # the third client's NOTIFY_START
        yield task.deferLater(reactor, 0.2, lambda: None)
        outage.go.callback(None)
        self.assertTrue((yield replay))
        yield defer.gatherResults(arriving)
        answer = yield rings
        self.assertEqual(answer.match.display_name if answer.match else None,
                         "Georgiou IKE", "answered with the caller's name, not spooled")
        self.assertGreater(durable.counters.ahead, 0, "some went past the replay")
        self.assertGreater(durable.counters.spooled_behind, 0, "some waited behind it")
        self.assertFalse(durable.spooling)

        twin_crm, _twin_dsn = yield defer.Deferred.fromCoroutine(self._one_by_one(items))
        passed, one_by_one = comparable(self.rows(self.crm)), comparable(self.rows(twin_crm))
        self.maxDiff = None
        self.assertEqual(passed, one_by_one)
        self.assertEqual(len(passed["tickets"]), 4, passed["tickets"])
        self.assertEqual(len(passed["calls"]), 9)

    # The other tests of TogetherTests run in test_ingest_together.
    test_one_transaction_writes_what_one_by_one_writes = None  # type: ignore[assignment]
    test_a_failing_step_writes_nothing_and_a_second_try_writes_once = None  # type: ignore[assignment]
    test_the_last_step_shares_the_events_transaction = None  # type: ignore[assignment]
    test_a_refused_zadarma_event_is_undone_alone = None  # type: ignore[assignment]
    test_a_spools_interleaved_calls_share_their_runs = None  # type: ignore[assignment]
    test_a_groups_plain_events_go_in_one_message = None  # type: ignore[assignment]
    test_missed_calls_ends_wait_for_the_plain_events_after_them = None  # type: ignore[assignment]
    test_a_missed_end_held_back_goes_before_a_later_zadarma_call = None  # type: ignore[assignment]
    test_missed_calls_of_different_numbers_share_their_round_trips = None  # type: ignore[assignment]
    test_a_runs_missed_zadarma_calls_share_their_round_trips = None  # type: ignore[assignment]
    test_a_repeated_missed_end_does_not_commit_the_group_early = None  # type: ignore[assignment]


class NewestCrmPassingTests(PassingTheReplayTests):
    crm_version = "2026-08"

