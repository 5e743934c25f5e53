"""bench/live: 200 open event streams (``GET /voip/events``) while 50 calls/s change.

    .venv/bin/python -m bench.live                         # 200 streams, 50 calls/s, 15 s
    .venv/bin/python -m bench.live --streams 50 --calls 20 --seconds 5

The daemon runs as wired (``service.build``) in this process, against a private
PostgreSQL holding the CRM's tables (``--entries`` directory entries, ``--history`` past
calls, settled as in ``bench.zadarma``). Two other processes, each on the loopback only:
- the load generator: incoming Zadarma calls, ``--calls`` new ones a second, each with
  several changes, every webhook signed as Zadarma signs it and posted to ``/voip/zd/``
  over HTTP/1.1 keep-alive: an answered call (4 in 5) is NOTIFY_START, NOTIFY_ANSWER
  0.5 s later and NOTIFY_END 2 s after the start (events: ringing, answered, ended); a
  missed one NOTIFY_START and NOTIFY_END (ringing, ended, and a ticket created or
  grouped). Each webhook's send time and answer time are kept, by call and event;
- the streams: ``--streams`` raw HTTP/1.1 connections reading ``/voip/events`` (signed in
  with a dpvoip token of a staff user: every stream gets every event, the most the hub
  can be asked to fan out), in ``--stream-processes`` processes, each one thread on a
  ``selectors`` loop that stamps every read with ``time.monotonic()`` (the system's
  CLOCK_MONOTONIC, the same in every process).

Printed:
- delivery from the commit to the stream client's receipt, p50/p99/max over every
  (event, stream). The commit time is PostgreSQL's own: the private server runs with
  ``track_commit_timestamp``, and each event's row (``xmin``) gives its transaction's
  commit time, to the microsecond, on the machine's clock (the clients' stamps are
  converted). Also from the webhook that caused the event: its send time (an upper
  bound: the webhook's own time is included) and its answer's receipt (negative when the
  stream heard first). The event's ``at`` is no commit time: it is the call's own time,
  to the second. Target: p99 <= 100 ms, from the commit;
- the daemon's RSS: after the load without streams, with the streams open (idle), after
  the load with the streams;
- the call path: webhook p50/p99 without and with the streams, same load; target: p99
  with the streams at most 2x (and + 10 ms) the p99 without; the daemon's CPU for the
  same calls with and without the streams (so, per frame delivered), the reactor's lag
  (a 10 ms timer) and how often the daemon was preempted (made to wait for a core);
- CPU: the daemon's (its one Python thread), the stream clients', the machine's.

The phases, in order: 2 s of load not counted (the pool's connections plan their
statements), the load without streams, the streams opened, the load with them, the
streams closed. Every figure is for this machine as it was: with 2 cores, PostgreSQL,
the load generator and the stream clients share them with the daemon, and what they take
is printed so that it can be read. ``--raw`` writes every time (commit, announcement
heard, published, received) for a closer look.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from bench.directory import (
    call_history,
    crm_database,
    rss_kib,
    sample_numbers,
    started_daemon,
)
from bench.verdicts import p99, report

SECRET = "bench-secret"  # noqa: S105 - signs the benchmark's own requests
ZONE = "Europe/Athens"
#: Seconds from a call's NOTIFY_START to its NOTIFY_ANSWER and NOTIFY_END.
ANSWER_AFTER, END_AFTER = 0.5, 2.0
#: One call in MISSED_EVERY is missed (a ticket), the others answered.
MISSED_EVERY = 5
#: The state a webhook's event gives the call on the stream.
STATE_OF = {"NOTIFY_START": "ringing", "NOTIFY_ANSWER": "answered", "NOTIFY_END": "ended"}


def _percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, int(len(ordered) * share) - 1)]


def ms(samples: list[float]) -> str:
    if not samples:
        return "no samples"
    return (f"p50 {_percentile(samples, 0.5) * 1000:.1f} ms, p99 {p99(samples) * 1000:.1f} ms,"
            f" max {max(samples) * 1000:.1f} ms (n={len(samples)})")


def _cpu_of_process() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _preempted() -> int:
    """Involuntary context switches of this process: the daemon made to wait for a core."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


class ReactorLag:
    """How late a 10 ms timer fires on the daemon's reactor: the time a webhook or an
    event waits before the reactor gets to it (busy, or not given a core)."""

    INTERVAL = 0.010

    def __init__(self, reactor: Any) -> None:
        from twisted.internet.task import LoopingCall

        self.samples: list[float] = []
        self._last = time.monotonic()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._loop.start(self.INTERVAL, now=False)

    def _tick(self) -> None:
        now = time.monotonic()
        self.samples.append(max(0.0, now - self._last - self.INTERVAL))
        self._last = now

    def take(self) -> list[float]:
        samples, self.samples = self.samples, []
        return samples

    def stop(self) -> None:
        self._loop.stop()


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


# -- the load generator (its own process) -----------------------------------------------


def calls(port: int, numbers: list[str], rate: float, seconds: float,
          workers: int, tag: str) -> dict[str, Any]:
    """``rate`` new incoming calls a second for ``seconds``, each webhook at its time;
    every webhook's (call id, event, sent, answered, status)."""
    import http.client
    from urllib.parse import urlencode

    from dpvoip.zadarma.signing import webhook_signature

    zone = ZoneInfo(ZONE)
    began = time.monotonic() + 0.2
    plan: list[tuple[float, int, dict[str, str]]] = []
    for n in range(int(rate * seconds)):
        at = began + n / rate
        start = datetime.now(zone).strftime("%Y-%m-%d %H:%M:%S")
        common = {"pbx_call_id": f"in_{tag}{os.getpid():08d}{n:024d}", "call_start": start,
                  # one number called per call: a signed string belongs to one call
                  "caller_id": numbers[n % len(numbers)], "called_did": f"30210{n % 10**7:07d}"}
        missed = n % MISSED_EVERY == 0
        plan.append((at, len(plan), {"event": "NOTIFY_START", **common}))
        if not missed:
            plan.append((at + ANSWER_AFTER, len(plan),
                         {"event": "NOTIFY_ANSWER", **common, "destination": "100"}))
        plan.append((at + END_AFTER, len(plan), {
            "event": "NOTIFY_END", **common, "duration": "0" if missed else "2",
            "disposition": "no answer" if missed else "answered", "status_code": "16",
            "is_recorded": "0", "calltype": "normal", "internal": "100"}))
    heapq.heapify(plan)
    lock = threading.Lock()
    done: list[tuple[str, str, float, float, int]] = []
    failures: dict[str, int] = {}
    lateness: list[float] = []

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while True:
            with lock:
                if not plan:
                    break
                due, _, form = heapq.heappop(plan)
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            body = urlencode(form).encode()
            headers = {"Content-Type": "application/x-www-form-urlencoded",
                       "Signature": webhook_signature(SECRET, form) or "",
                       "X-Forwarded-For": "185.45.152.42"}
            sent = time.monotonic()
            try:
                connection.request("POST", "/voip/zd/", body=body, headers=headers)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as error:
                with lock:
                    name = type(error).__name__
                    failures[name] = failures.get(name, 0) + 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            answered = time.monotonic()
            with lock:
                lateness.append(max(0.0, sent - due))
                done.append((form["pbx_call_id"], form["event"], sent, answered,
                             response.status))
        connection.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"webhooks": done, "failures": failures, "late_p99": p99(lateness or [0.0]),
            "cpu": _cpu_of_process()}


# -- the stream clients (their own processes) --------------------------------------------

_FRAME = re.compile(rb"id: (\d+)\nevent: (\w+)\ndata: ([^\n]*)\n\n")


def _answered(ready: int, refused: dict[str, int], count: int) -> None:
    """Once every stream is answered: ``ready``, or what refused some (the bench stops)."""
    if ready + sum(refused.values()) == count:
        sys.stdout.write("ready\n" if ready == count else f"refused: {refused}\n")
        sys.stdout.flush()


def streams(port: int, token: str, count: int) -> None:
    """``count`` streams: prints ``ready`` once each has its headers, reads until a line
    on stdin, then prints its figures (JSON): per event id, its call, state and every
    receipt time."""
    request = (f"GET /voip/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream"
               f"\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytes] = {}
    heads: dict[socket.socket, bool] = {}
    refused: dict[str, int] = {}
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(request)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock], heads[sock] = b"", False
    selector.register(sys.stdin, selectors.EVENT_READ, "stop")
    received: dict[int, list[Any]] = {}  # id -> [kind, call id, state or action, times]
    ready = closed = 0
    while True:
        for key, _ in selector.select(timeout=30):
            if key.data == "stop":
                sys.stdin.readline()  # the bench says stop
                out = {"events": received, "ready": ready, "closed": closed,
                       "refused": refused, "cpu": _cpu_of_process()}
                sys.stdout.write(json.dumps(out) + "\n")
                sys.stdout.flush()
                return
            sock = key.fileobj  # type: ignore[assignment]
            now = time.monotonic()
            try:
                data = sock.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                selector.unregister(sock)
                sock.close()
                closed += 1
                if not heads[sock]:  # closed before answering: refused as well
                    refused["closed"] = refused.get("closed", 0) + 1
                    _answered(ready, refused, count)
                continue
            buffer = buffers[sock] + data
            if not heads[sock]:
                if b"\r\n\r\n" not in buffer:
                    buffers[sock] = buffer
                    continue
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                status = head.split(b"\r\n", 1)[0].decode("latin-1")
                if " 200 " not in status + " ":
                    refused[status] = refused.get(status, 0) + 1
                    selector.unregister(sock)
                    sock.close()
                else:
                    heads[sock] = True
                    ready += 1
                _answered(ready, refused, count)
                if not heads.get(sock):
                    continue
            end = buffer.rfind(b"\n\n")
            if end < 0:
                buffers[sock] = buffer
                continue
            for match in _FRAME.finditer(buffer, 0, end + 2):
                ident = int(match.group(1))
                seen = received.get(ident)
                if seen is None:
                    body = json.loads(match.group(3))
                    seen = received[ident] = [
                        match.group(2).decode(), body.get("call_id"),
                        body.get("state") or body.get("action"), []]
                seen[3].append(now)
            buffers[sock] = buffer[end + 2:]


# -- the daemon's side -------------------------------------------------------------------


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.live", *args]


def bench_environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def drive(port: int, numbers: list[str], rate: float, seconds: float, tag: str
          ) -> dict[str, Any]:
    options = {"port": port, "numbers": numbers, "rate": rate, "seconds": seconds,
               "workers": 16, "tag": tag}
    done = subprocess.run(_python("--calls-process", json.dumps(options)),
                          capture_output=True, text=True, check=False,
                          timeout=seconds + 120, env=bench_environment())
    if done.returncode != 0:
        raise SystemExit(f"load generator failed: {done.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


class StreamClients:
    """The stream processes: opened, then stopped for their figures."""

    def __init__(self, port: int, token: str, count: int, processes: int) -> None:
        shares = [count // processes + (1 if i < count % processes else 0)
                  for i in range(processes)]
        self._children = [
            subprocess.Popen(
                _python("--streams-process", json.dumps(
                    {"port": port, "token": token, "count": share})),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=bench_environment())
            for share in shares if share]

    def wait_ready(self) -> None:
        for child in self._children:
            assert child.stdout is not None
            line = child.stdout.readline().strip()
            if line != "ready":
                raise SystemExit(f"stream clients failed to open their streams: {line!r}")

    def stop(self) -> list[dict[str, Any]]:
        figures = []
        for child in self._children:
            out, _ = child.communicate("stop\n", timeout=120)
            figures.append(json.loads(out.strip().splitlines()[-1]))
        return figures


def commits(dsn: str, ids: list[int]) -> dict[int, float]:
    """Each event's commit time (``track_commit_timestamp``: the commit of the transaction
    that inserted its row), as ``time.monotonic()`` reads it."""
    import psycopg2

    offset = time.time() - time.monotonic()
    connection = psycopg2.connect(dsn)
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, extract(epoch FROM pg_xact_commit_timestamp(xmin))"
                       " FROM dpvoip.live_event WHERE id = ANY(%s)", (ids,))
        found = {int(i): float(at) - offset for i, at in cursor.fetchall() if at is not None}
    connection.close()
    return found


def delivery(webhooks: list[list[Any]], clients: list[dict[str, Any]],
             committed: dict[int, float]
             ) -> tuple[list[float], list[float], list[float], dict[str, int]]:
    """(from the commit, from the webhook's send, from its answer) for every (call event,
    stream), and the counts of events matched and not."""
    from dpvoip.zadarma.events import call_id as zadarma_call_id

    sent: dict[tuple[str, str], tuple[float, float]] = {}
    for pbx_call_id, event, at, answered, _status in webhooks:
        sent[(zadarma_call_id(pbx_call_id), STATE_OF[event])] = (at, answered)
    merged: dict[str, list[Any]] = {}
    for figures in clients:
        for ident, (kind, call_id, state, times) in figures["events"].items():
            merged.setdefault(ident, [kind, call_id, state, []])[3].extend(times)
    from_commit: list[float] = []
    from_send: list[float] = []
    from_answer: list[float] = []
    counts = {"call events": 0, "unmatched": 0, "ticket events": 0, "deliveries": 0,
              "no commit time": 0}
    for ident, (kind, call_id, state, times) in merged.items():
        if int(ident) in committed:
            from_commit += [t - committed[int(ident)] for t in times]
        else:
            counts["no commit time"] += 1
        if kind == "ticket":  # committed by its NOTIFY_END, with the call's end
            counts["ticket events"] += 1
            state = "ended"
        elif kind == "call":
            counts["call events"] += 1
        else:
            continue
        counts["deliveries"] += len(times)
        key = (str(call_id), state)
        if key not in sent:
            counts["unmatched"] += 1
            continue
        began, answered = sent[key]
        from_send += [t - began for t in times]
        from_answer += [t - answered for t in times]
    return from_commit, from_send, from_answer, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--calls", type=float, default=50.0, help="new calls a second")
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="seconds of calls started in each measured phase")
    parser.add_argument("--stream-processes", type=int, default=2)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--history", type=int, default=50_000,
                        help="past calls in the CRM (with three log lines each)")
    parser.add_argument("--profile", help="write the daemon's cProfile of the phase with "
                        "the streams to this file (and print its top functions)")
    parser.add_argument("--raw", help="write every webhook's and event's times (JSON) of "
                        "the phase with the streams to this file")
    parser.add_argument("--calls-process", help=argparse.SUPPRESS)
    parser.add_argument("--streams-process", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.calls_process:
        print(json.dumps(calls(**json.loads(args.calls_process))))
        return
    if args.streams_process:
        streams(**json.loads(args.streams_process))
        return

    from twisted.internet import defer, task, threads

    from dpvoip.config import (
        Config,
        DatabaseSettings,
        LiveSettings,
        Secret,
        WebSettings,
        ZadarmaSettings,
    )
    from dpvoip.store.tokens import create_token

    missed: list[str] = []
    with crm_database(args.entries) as (dsn, _), commit_timestamps(dsn):
        call_history(dsn, args.history)

        async def run(reactor: Any) -> None:
            config = Config(
                database=replace(DatabaseSettings(), url=Secret(dsn), pool_size=8),
                web=replace(WebSettings(), listen="tcp:0:interface=127.0.0.1"),
                zadarma=replace(ZadarmaSettings(), secret=Secret(SECRET), timezone=ZONE,
                                create_tickets=True),
                live=replace(LiveSettings(), max_streams=max(200, args.streams)),
                fritzbox=(),
            )
            started = await started_daemon(config, reactor, dsn)
            daemon, port = started.daemon, started.port
            numbers = [n[3:] for n in sample_numbers(dsn, 3000) if n.startswith("+30")]
            await threads.deferToThread(staff_user, dsn)
            _, token = await create_token(daemon.store, "public", "bench")

            trace: dict[str, list[Any]] = {"notified": [], "published": []}
            if args.raw and daemon.live is not None:
                feed, hub_ = daemon.live.feed, daemon.live.hub

                def notified(payload: str) -> None:
                    trace["notified"].append((time.monotonic(), payload))
                    feed.notified(payload)

                daemon.live.connection.watch(notified, feed.listening)
                publish = hub_.publish

                def published(events: Any) -> None:
                    events = list(events)
                    trace["published"].append((time.monotonic(), [e.id for e in events]))
                    publish(events)

                hub_.publish = published

            def load(seconds: float, tag: str) -> Any:
                return threads.deferToThread(drive, port, numbers, args.calls, seconds, tag)

            await load(2, "w")  # not counted: statements planned on each connection
            await task.deferLater(reactor, END_AFTER + 1, lambda: None)
            lag = ReactorLag(reactor)
            cpu_before, began = _cpu_of_process(), time.monotonic()
            switches = _preempted()
            lag.take()
            without = await load(args.seconds, "a")
            await task.deferLater(reactor, 1, lambda: None)  # as with the streams, below
            cpu_without = _cpu_of_process() - cpu_before
            elapsed_without = time.monotonic() - began
            lag_without, switches_without = lag.take(), _preempted() - switches
            rss_without = rss_kib() * 1024

            clients = StreamClients(port, token, args.streams, args.stream_processes)
            await threads.deferToThread(clients.wait_ready)
            await task.deferLater(reactor, 1, lambda: None)
            rss_idle = rss_kib() * 1024
            profile = None
            if args.profile:
                import cProfile

                profile = cProfile.Profile(time.thread_time)
                profile.enable()
            cpu_before, machine_before = _cpu_of_process(), _machine_busy()
            began, switches = time.monotonic(), _preempted()
            lag.take()
            loaded = await load(args.seconds, "b")
            await task.deferLater(reactor, 1, lambda: None)  # the last events delivered
            elapsed = time.monotonic() - began
            cpu = _cpu_of_process() - cpu_before
            lag_with, switches_with = lag.take(), _preempted() - switches
            lag.stop()
            busy, total = (a - b for a, b in zip(_machine_busy(), machine_before,
                                                 strict=True))
            rss_streams = rss_kib() * 1024
            if profile is not None:
                import pstats

                profile.disable()
                profile.dump_stats(args.profile)
                pstats.Stats(profile).sort_stats("tottime").print_stats(25)
            hub = daemon.live.hub if daemon.live is not None else None
            dropped = hub.counters.streams_dropped if hub is not None else -1
            received = await threads.deferToThread(clients.stop)
            ids = sorted({int(i) for c in received for i in c["events"]})
            committed = await threads.deferToThread(commits, dsn, ids)
            from_commit, from_send, from_answer, counts = delivery(
                loaded["webhooks"], received, committed)
            if args.raw:
                Path(args.raw).write_text(json.dumps(
                    {"webhooks": loaded["webhooks"], "clients": received,
                     "committed": committed, **trace}))

            hook_without = [a - s for _, _, s, a, status in without["webhooks"]
                            if status == 200]
            hook_with = [a - s for _, _, s, a, status in loaded["webhooks"] if status == 200]
            statuses: dict[str, int] = {}
            for run_ in (without, loaded):
                for *_, status in run_["webhooks"]:
                    if status != 200:
                        statuses[str(status)] = statuses.get(str(status), 0) + 1
                for name, n in run_["failures"].items():
                    statuses[name] = statuses.get(name, 0) + n
            opened = sum(c["ready"] for c in received)
            refused = {k: v for c in received for k, v in c["refused"].items()}
            expected = counts["call events"] + counts["ticket events"]
            deliveries = counts["deliveries"]
            print(f"calls: {args.calls:g}/s for {args.seconds:g} s a phase, each"
                  f" {len(loaded['webhooks']) / max(1, args.calls * args.seconds):.1f}"
                  f" webhooks ({len(loaded['webhooks']) / args.seconds:.0f} webhooks/s);"
                  f" load generator late p99 {loaded['late_p99'] * 1000:.1f} ms")
            print(f"streams: {opened} open of {args.streams} (refused: {refused or 'none'}),"
                  f" {args.stream_processes} client processes; dropped by the hub: {dropped};"
                  f" events seen {expected} ({counts['ticket events']} tickets,"
                  f" {counts['unmatched']} unmatched), {deliveries} deliveries"
                  f" ({deliveries / max(1, expected):.1f} streams an event)")
            print(f"delivery, from the commit (PostgreSQL's commit timestamp):"
                  f" {ms(from_commit)}")
            print(f"delivery, from the webhook's send: {ms(from_send)}")
            print(f"delivery, from the webhook's answer: {ms(from_answer)}")
            print(f"webhook without streams: {ms(hook_without)}")
            print(f"webhook with {opened} streams:    {ms(hook_with)}")
            print(f"daemon RSS: {rss_without / 1e6:.1f} MB after the load without streams,"
                  f" {rss_idle / 1e6:.1f} MB with the streams open, {rss_streams / 1e6:.1f} MB"
                  f" after the load with them")
            client_cpu = sum(c["cpu"] for c in received)
            print(f"daemon CPU for the same calls: {cpu_without:.2f} s without streams,"
                  f" {cpu:.2f} s with them: {(cpu - cpu_without) / max(1, deliveries) * 1e6:.1f}"
                  f" us a frame delivered; {cpu_without / elapsed_without * 100:.0f}% and"
                  f" {cpu / elapsed * 100:.0f}% of a core over the phase")
            print(f"reactor lag (a 10 ms timer): {ms(lag_without)} without streams;"
                  f" {ms(lag_with)} with them; the daemon preempted {switches_without} and"
                  f" {switches_with} times")
            print(f"CPU during the load with streams ({elapsed:.1f} s): daemon"
                  f" {cpu / elapsed * 100:.0f}% of a core, stream clients"
                  f" {client_cpu / elapsed * 100:.0f}%, load generator"
                  f" {loaded['cpu'] / elapsed * 100:.0f}%; the machine"
                  f" {busy / total * 100:.0f}% busy of {os.cpu_count()} cores")
            if statuses:
                print(f"webhooks not answered 200: {statuses}")
            verdicts = [
                ("delivery p99 <= 100 ms (from the commit)",
                 bool(from_commit) and p99(from_commit) <= 0.100
                 and not counts["no commit time"]),
                (f"every stream got every event ({args.streams} open, none dropped)",
                 opened == args.streams and dropped == 0
                 and deliveries == expected * args.streams and counts["unmatched"] == 0),
                ("webhook p99 with the streams <= 2x without + 10 ms",
                 bool(hook_with) and p99(hook_with) <= 2 * p99(hook_without) + 0.010),
                ("every webhook answered 200", not statuses),
            ]
            missed.extend(report(verdicts))
            await started.stop()

        try:
            task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
        except SystemExit as exit_:
            if exit_.code:
                raise
    if missed:
        raise SystemExit(f"{len(missed)} quality target(s) missed")


@contextlib.contextmanager
def commit_timestamps(dsn: str) -> Iterator[None]:
    """The private PostgreSQL restarted with ``track_commit_timestamp`` (each event's
    commit time is then known to the microsecond); stopped afterwards (``crm_database``
    stops only the server it started)."""
    import psycopg2

    from dpvoip.store.embedded import EmbeddedPostgres

    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("ALTER SYSTEM SET track_commit_timestamp = on")
        cursor.execute("SHOW data_directory")
        (data,) = cursor.fetchone() or ("",)
    connection.close()
    cluster = EmbeddedPostgres(Path(data).parent)
    cluster.stop()
    cluster.start()
    try:
        yield
    finally:
        cluster.stop(mode="immediate")


def staff_user(dsn: str) -> None:
    """The CRM user the streams sign in as (a staff user: sees every call)."""
    import psycopg2

    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO public.auth_user (password, is_superuser, username, first_name,"
            " last_name, email, is_staff, is_active, date_joined) VALUES ('!', false,"
            " 'bench', 'Bench', '', '', true, true, now())")
    connection.close()


if __name__ == "__main__":
    main()
