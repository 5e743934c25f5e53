"""Fault test (issue 19): two installed daemons, one PostgreSQL, one fake Fritz!Box.

Two instances (``athens-1``, ``rhodes-2``), each with its own state folder, attached to
one PostgreSQL cluster of the test's own; one ``FritzSimulator`` on 127.0.0.1 that both
are configured to read. Exactly one reads it: the holder of the box's advisory lock.
Calls are placed on the box, and in the middle of a call the leader is, in turn:

1. killed (SIGKILL), then started again (it comes back as the standby);
2. stopped cleanly (SIGTERM), then started again;
3. frozen (SIGSTOP) for longer than the bound (until the other has taken the box and
   recorded a whole call), then woken (SIGCONT): it must record nothing of what it finds
   waiting in its socket, and become the standby;
4. cut from the database: its lease session ended by ``pg_terminate_backend``.

While each fault happens, Zadarma calls the office: signed webhooks (START to END, every
other call missed) delivered as a reverse proxy with health checks delivers them, to either
instance in turn, and when the chosen one does not answer (killed, stopping, frozen) the
same request again to the other (``test.support.instances.HealthCheckingProxy``). A frozen
instance keeps the requests it did not answer in its socket and handles them when woken:
late duplicates, out of order, which must change nothing.

Each time: the call open at the hand-over is finished (by whoever leads after it, from
the box's DISCONNECT) and every call is in ``accounting_voipcall`` exactly once with its
real outcome; every webhook event was acknowledged, each webhook call is one row with its
status (``completed`` or ``missed``) and each missed one has its own ticket, none twice;
a sampler (every 0.2 s: the lock's holders in ``pg_locks`` and both ``/readyz``) never
sees two leaders; the take-over time is printed (``pytest -s``), with when the old
leader's database session was gone, and for the box's calls and the webhooks what was
sent, acknowledged, stored, lost and duplicated. At the end both instances stop cleanly
and everything is counted once more. The steps follow events, not the clock: every wait
is a hang detector, no time is asserted. About a minute and a half when idle.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from test.support.daemon import PATIENCE
from test.support.instances import (
    HealthCheckingProxy,
    Instance,
    Sampler,
    SharedBox,
    WebhookCall,
    ZadarmaTraffic,
    lock_holders,
)
from test.support.postgres import private_cluster, query

OWN = "2107654321"


def wait_for(what: str, check: Callable[[], Any], timeout: float = PATIENCE) -> float:
    """Poll ``check`` until true; the seconds it took (a hang detector, not a bound)."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"hung waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - began


class TwoInstancesOneBoxTest(SynchronousTestCase):
    def setUp(self) -> None:
        self.home, self.cluster, self.dsn = private_cluster(self, "dpvoip-leaders-")
        self.box = SharedBox()
        self.addCleanup(self.box.close)
        self.instances = {name: Instance(self.home, name, self.dsn, self.box.port)
                          for name in ("athens-1", "rhodes-2")}
        for instance in self.instances.values():
            self.addCleanup(self._kill, instance)
        self.numbers = itertools.count(1)
        self.conns = itertools.count(1)
        self.calls: list[str] = []  # every number called: one row each, completed
        self.proxy = HealthCheckingProxy(list(self.instances.values()))
        self.webhook_numbers = itertools.count(1)
        self.webhooks: list[WebhookCall] = []  # every call Zadarma placed

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _kill(instance: Instance) -> None:
        if instance.daemon is not None:
            instance.daemon.kill()

    def rows(self, number: str) -> list[tuple[Any, ...]]:
        return query(self.dsn, "SELECT status FROM accounting_voipcall WHERE phone_number"
                               " = %s", (f"+30{number}",))

    def begin_call(self) -> tuple[str, int]:
        """A call rung and answered, recorded by the leader: open at the fault."""
        number, conn = f"69{next(self.numbers):08d}", next(self.conns) % 30
        self.box.play(f"0 {{now}};RING;{conn};{number};{OWN};SIP0;\n"
                      f"0.2 {{now}};CONNECT;{conn};11;{number};\n")
        wait_for(f"call {number} recorded", lambda: self.rows(number))
        self.calls.append(number)
        return number, conn

    def end_call(self, conn: int) -> None:
        self.box.play(f"0 {{now}};DISCONNECT;{conn};30;\n")

    def whole_call(self) -> str:
        number, conn = f"69{next(self.numbers):08d}", next(self.conns) % 30
        self.box.play(f"0 {{now}};RING;{conn};{number};{OWN};SIP0;\n"
                      f"0.2 {{now}};CONNECT;{conn};11;{number};\n"
                      f"1 {{now}};DISCONNECT;{conn};1;\n")
        self.calls.append(number)
        return number

    def webhook_rows(self) -> dict[str, list[tuple[str, Any]]]:
        """Each webhook call's rows by call id: (status, ticket id)."""
        found: dict[str, list[tuple[str, Any]]] = {c.call_id: [] for c in self.webhooks}
        for call_id, status, ticket in query(
                self.dsn, "SELECT call_id, status, ticket_id FROM accounting_voipcall"
                          " WHERE call_id = ANY(%s)", ([c.call_id for c in self.webhooks],)):
            found[call_id].append((status, ticket))
        return found

    def tickets(self) -> list[str]:
        return [title for (title,) in query(self.dsn, "SELECT title FROM accounting_ticket")]

    def webhooks_wrong(self) -> dict[str, Any]:
        """What is not as it must be: a webhook event no instance acknowledged, a call
        not one row with its status, a missed call without its own ticket, a ticket
        that is not one missed call's (none twice)."""
        wrong: dict[str, Any] = {}
        rows = self.webhook_rows()
        titles = self.tickets()
        for call in self.webhooks:
            if call.acknowledged != len(call.events):
                wrong[f"{call.call_id} events"] = [[(a.instance, a.outcome) for a in tries]
                                                   for tries in call.events]
            statuses = [status for status, _ in rows[call.call_id]]
            if statuses != [call.status]:
                wrong[call.call_id] = statuses
            tickets = [t for t in titles if t.endswith(f"+30{call.caller}")]
            if len(tickets) != (0 if call.answered else 1):
                wrong[f"{call.call_id} tickets"] = tickets
            has_ticket = bool(rows[call.call_id]) and rows[call.call_id][0][1] is not None
            if rows[call.call_id] and has_ticket == call.answered:
                wrong[f"{call.call_id} ticket_id"] = rows[call.call_id]
        missed = sum(1 for c in self.webhooks if not c.answered)
        if len(titles) != missed:  # the box's calls are all answered: no ticket of theirs
            wrong["tickets"] = f"{len(titles)} tickets for {missed} missed calls: {titles}"
        return wrong

    def all_recorded_once(self, round_name: str) -> None:
        """Every box call and every webhook call recorded once, as it ended; what was
        sent, acknowledged, stored, lost and duplicated printed."""
        def done() -> bool:
            return (all([row[0] for row in self.rows(n)] == ["completed"] for n in self.calls)
                    and not self.webhooks_wrong())

        with contextlib.suppress(AssertionError):  # said below, with what each call is
            wait_for("every call completed", done)
        seen = {n: [row[0] for row in self.rows(n)] for n in self.calls}
        print(f"  {round_name}: box calls placed {len(self.calls)}, stored"
              f" {sum(1 for v in seen.values() if v)}, lost"
              f" {sum(1 for v in seen.values() if not v)}, duplicated"
              f" {sum(1 for v in seen.values() if len(v) > 1)}")
        hooks = self.webhook_rows()
        events = sum(len(c.events) for c in self.webhooks)
        print(f"  {round_name}: webhook calls sent {len(self.webhooks)} ({events} events),"
              f" acknowledged {sum(c.acknowledged for c in self.webhooks)} events"
              f" ({sum(c.rerouted for c in self.webhooks)} by the other instance), stored"
              f" {sum(1 for v in hooks.values() if v)}, lost"
              f" {sum(1 for v in hooks.values() if not v)}, duplicated"
              f" {sum(1 for v in hooks.values() if len(v) > 1)}; tickets"
              f" {len(self.tickets())} for {sum(1 for c in self.webhooks if not c.answered)}"
              " missed")
        wrong: dict[str, Any] = {n: v for n, v in seen.items() if v != ["completed"]}
        wrong.update(self.webhooks_wrong())
        if wrong:
            logs = "\n".join(f"--- {i.name}\n{i.daemon.output()[-6000:]}"
                             for i in self.instances.values() if i.daemon)
            self.fail(f"{round_name}: not recorded once as it ended: {wrong}\n{logs}")

    def roles(self) -> tuple[Instance, Instance]:
        """(the leader, the standby), once both say so."""
        found: list[tuple[Instance, Instance]] = []

        def settled() -> bool:
            views = {name: i.peek() for name, i in self.instances.items()}
            leading = [self.instances[n] for n, v in views.items() if v and v["leader"]]
            standby = [self.instances[n] for n, v in views.items()
                       if v and v["role"] == "standby"]
            if len(leading) == 1 and len(standby) == 1:
                found.append((leading[0], standby[0]))
                return True
            return False

        wait_for("one leader and one standby", settled)
        return found[-1]

    def read_again(self, before: int) -> Callable[[], bool]:
        return lambda: self.box.connections > before

    def session_gone(self, name: str) -> Callable[[], bool]:
        return lambda: name not in lock_holders(self.dsn, "office")

    def traffic(self) -> ZadarmaTraffic:
        """Zadarma's calls through the proxy, from now until ``stop``."""
        return ZadarmaTraffic(self.proxy, self.webhook_numbers)

    def stop_traffic(self, traffic: ZadarmaTraffic, faulty: Instance | None
                     ) -> list[WebhookCall]:
        """Zadarma's calls stopped (the one under way finished) and kept for the checks;
        when ``faulty`` was away, only once a request has found it so and gone to the
        other instance (else the round would prove nothing about the webhooks)."""
        if faulty is not None:
            wait_for(f"a webhook finding {faulty.name} away",
                     lambda: traffic.away(faulty.name))
        calls = traffic.stop()
        self.webhooks += calls
        attempts = [a for c in calls for tries in c.events for a in tries]
        away = Counter(a.outcome for a in attempts if faulty is not None
                       and a.instance == faulty.name and a.outcome != "200")
        print(f"    webhooks meanwhile: {len(calls)} calls,"
              f" {sum(len(c.events) for c in calls)} events, {len(attempts)} requests"
              f" ({sum(c.rerouted for c in calls)} sent again to the other instance;"
              f" {faulty.name if faulty else 'the faulty one'}: {dict(away) or 'none'})")
        return calls

    def take_over(self, what: str, leader: Instance, fault: Callable[[], None]
                  ) -> list[WebhookCall]:
        """Cause ``fault`` to the leader mid-call, with Zadarma's calls arriving from
        just before it until the box is read again; the call is finished after the
        hand-over and one whole call placed; the times printed. The webhook calls of the
        round."""
        number, conn = self.begin_call()
        before = self.box.connections
        traffic = self.traffic()
        wait_for("a webhook call under way", lambda: traffic.calls and traffic.calls[0].events)
        fault()
        gone = wait_for("the leader's session gone", self.session_gone(leader.name))
        read = wait_for("the box read again", self.read_again(before))
        read += gone
        calls = self.stop_traffic(traffic, leader)
        print(f"  {what}: {leader.name}'s database session gone after {gone:.1f} s; the"
              f" box read again {read:.1f} s after the fault ({read - gone:.1f} s after"
              " the session was gone)")
        self.end_call(conn)
        self.whole_call()
        del number
        return calls

    # -- the test --------------------------------------------------------------------------

    def test_each_box_read_by_exactly_one_instance_through_four_faults(self) -> None:
        first, second = self.instances["athens-1"], self.instances["rhodes-2"]
        first.start()
        first.wait_role("leading")
        wait_for("the box connected", lambda: self.box.connected == 1)
        second.start()
        second.wait_role("standby")
        sampler = Sampler(self.dsn, list(self.instances.values()))
        self.addCleanup(sampler.stop)
        print()
        self.whole_call()

        # 1. SIGKILL mid-call
        leader, _ = self.roles()
        assert leader.daemon is not None
        self.take_over("kill -9", leader, leader.daemon.process.kill)
        self.all_recorded_once("kill -9")
        leader.daemon.wait_exit()
        leader.start()  # back, as the standby

        # 2. SIGTERM mid-call
        leader, _ = self.roles()
        assert leader.daemon is not None
        self.take_over("SIGTERM", leader, lambda: leader.daemon.process.terminate()
                       if leader.daemon else None)
        self.all_recorded_once("SIGTERM")
        self.assertEqual(leader.daemon.wait_exit(), 0)
        leader.start()

        # 3. SIGSTOP for longer than the bound, then SIGCONT
        leader, _ = self.roles()
        assert leader.daemon is not None
        frozen = leader.daemon.process.pid
        handled = leader.peek()
        assert handled is not None
        counted = leader.webhooks()
        calls = self.take_over("SIGSTOP", leader, lambda: os.kill(frozen, signal.SIGSTOP))
        self.all_recorded_once("SIGSTOP (while frozen)")
        reached = Counter(a.outcome for c in calls for tries in c.events for a in tries
                          if a.instance == leader.name)
        os.kill(frozen, signal.SIGCONT)
        leader.wait_role("standby")
        # The requests it did not answer were in its socket: it handles them now, each
        # one recorded through the other instance already (and maybe out of order).
        # Its counters over the round: those and the ones it answered before the freeze.
        wait_for("the woken instance's late webhooks", lambda: leader.webhooks()["received"]
                 - counted["received"] >= reached["200"] + reached["no answer"])
        late = {k: int(v - counted[k]) for k, v in leader.webhooks().items()}
        print(f"    woken, {leader.name} handled the {reached['no answer']} webhooks it had"
              f" not answered (its counters over the round, {reached['200']} answered"
              f" before the freeze: {late})")
        woken = leader.peek()
        assert woken is not None
        begun = handled["lines"] + 2  # the RING and CONNECT of the call it began
        self.assertEqual(woken["lines"], begun, "woken, it read none of the waiting lines")
        self.all_recorded_once("SIGCONT")

        # 4. its lease session terminated by the server
        leader, _ = self.roles()
        [(pid,)] = query(self.dsn, "SELECT pid FROM pg_stat_activity WHERE"
                                   " application_name = %s", (f"dpvoip lease {leader.name}",))
        number, conn = self.begin_call()
        before = self.box.connections
        traffic = self.traffic()
        wait_for("a webhook call under way", lambda: traffic.calls and traffic.calls[0].events)
        began = time.monotonic()
        query(self.dsn, "SELECT pg_terminate_backend(%s)", (pid,))

        def lease_again() -> bool:  # the old leader noticed, and has a new session
            rows = query(self.dsn, "SELECT pid FROM pg_stat_activity WHERE"
                                   " application_name = %s", (f"dpvoip lease {leader.name}",))
            return bool(rows) and rows[0][0] != pid

        wait_for("the old leader's new lease session", lease_again)
        after, _ = self.roles()
        if after is not leader:  # taken over: the new leader connects after settling
            wait_for("the box read again", self.read_again(before))
        self.stop_traffic(traffic, None)  # its web and pool were never away
        print(f"  pg_terminate_backend: {after.name} reads the box"
              f" {time.monotonic() - began:.1f} s after"
              f" ({'taken over' if after is not leader else 'its lock taken again'})")
        self.end_call(conn)
        self.whole_call()
        self.all_recorded_once("pg_terminate_backend")
        del number

        sampler.stop()
        print(f"  sampled {sampler.samples} times: two leaders {len(sampler.too_many)}"
              " times")
        self.assertGreater(sampler.samples, 10)
        self.assertEqual(sampler.too_many, [])

        # both stopped cleanly: every request either holds has been handled (the woken
        # instance's late ones too), and everything is still there once
        for instance in self.instances.values():
            assert instance.daemon is not None
            self.assertEqual(instance.daemon.terminate(), 0)
        self.all_recorded_once("both stopped")
