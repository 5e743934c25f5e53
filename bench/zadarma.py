"""bench/zadarma: signed Zadarma webhooks over HTTP into the daemon as wired.

    .venv/bin/python -m bench.zadarma                      # 1,000,000-entry directory
    .venv/bin/python -m bench.zadarma --entries 100000 --seconds 10

Prints, for a private PostgreSQL holding ``--entries`` directory entries and ``--history``
past calls, vacuumed and analysed once the directory is built (the steady state of an
office's database: see ``bench.directory.settle``), after two seconds of load not counted
(the pool's connections plan their statements on first use):
- NOTIFY_START answered with caller_name (caller in the directory): p50/p99, sequential;
- signed NOTIFY_END (caller matched, call + log + CRM update committed) at ``--rate``
  requests/s: p50/p99;
- the most NOTIFY_END requests/s with ``--concurrency`` requests in flight;
- the reference: a bare Twisted web server answering 200 on the same loopback, same
  client (so the figures can be read on another machine as ratios).
The load generator runs in a separate process (one core each), speaking HTTP/1.1 with
keep-alive, and signs every request as Zadarma does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.directory import (
    call_history,
    crm_database,
    rss_kib,
    sample_numbers,
    started_daemon,
)
from bench.verdicts import cpu_hog, p99, report

SECRET = "bench-secret"  # noqa: S105 - signs the benchmark's own requests


def percentiles(samples: list[float]) -> str:
    return (f"p50 {statistics.median(samples) * 1000:.2f} ms, p99 {p99(samples) * 1000:.2f} ms"
            f" (n={len(samples)})")


def client(port: int, numbers: list[str], mode: str, seconds: float, rate: float,
           concurrency: int) -> dict[str, Any]:
    """The load generator (its own process): raw HTTP/1.1 keep-alive connections."""
    import http.client
    import threading
    from urllib.parse import urlencode

    from dpvoip.zadarma.signing import webhook_signature

    latencies: list[float] = []
    errors: dict[int, int] = {}
    failures: dict[str, int] = {}
    count = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def form(n: int, kind: str) -> dict[str, str]:
        caller = numbers[n % len(numbers)]
        base = {"event": kind, "pbx_call_id": f"in_{os.getpid():08d}{n:032d}",
                "call_start": time.strftime("%Y-%m-%d %H:%M:%S"), "caller_id": caller,
                # one number called per event: a signed string belongs to one call, and
                # the callers repeat within a second
                "called_did": f"30210{n % 10**7:07d}"}
        if kind == "NOTIFY_END":
            base.update(duration="65", disposition="answered", status_code="16",
                        is_recorded="0", internal="100", calltype="normal")
        return base

    def worker(offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        n = offset
        while time.monotonic() < deadline:
            if mode == "reference":
                body, headers = b"", {}
                method, path = "GET", "/"
            else:
                data = form(n, mode)
                body = urlencode(data).encode()
                headers = {"Content-Type": "application/x-www-form-urlencoded",
                           "Signature": webhook_signature(SECRET, data) or "",
                           "X-Forwarded-For": "185.45.152.42"}
                method, path = "POST", "/voip/zd/"
            began = time.perf_counter()
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as error:
                with lock:
                    name = type(error).__name__
                    failures[name] = failures.get(name, 0) + 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            elapsed = time.perf_counter() - began
            with lock:
                if response.status != 200:
                    errors[response.status] = errors.get(response.status, 0) + 1
                    continue
                latencies.append(elapsed)
                count[0] += 1
            n += concurrency
            if rate:
                time.sleep(max(0.0, concurrency / rate - elapsed))
        connection.close()

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "rate": count[0] / (time.monotonic() - started),
            "errors": errors, "failures": failures}


def _cpu_seconds() -> float:
    """CPU time of this process (the daemon; the load generator is another process)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def drive(port: int, numbers: list[str], mode: str, seconds: float, rate: float = 0,
          concurrency: int = 1) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.zadarma", "--client", json.dumps(
            {"port": port, "numbers": numbers, "mode": mode, "seconds": seconds,
             "rate": rate, "concurrency": concurrency})],
        capture_output=True, text=True, check=False, timeout=seconds + 120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    if done.returncode != 0:
        raise SystemExit(f"load generator failed: {done.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--history", type=int, default=200_000,
                        help="past calls in the CRM (with three log lines each)")
    parser.add_argument("--profile", help="write the daemon's cProfile of the saturated run "
                        "to this file (and print its top functions)")
    parser.add_argument("--hog", action="store_true",
                        help="keep one core busy with another process meanwhile")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        options = json.loads(args.client)
        print(json.dumps(client(**options)))
        return

    from twisted.internet import defer, task, threads
    from twisted.web import resource, server

    from dpvoip.config import (
        Config,
        DatabaseSettings,
        Secret,
        WebSettings,
        ZadarmaSettings,
    )

    with crm_database(args.entries) as (dsn, _):
        call_history(dsn, args.history)

        async def run(reactor: Any) -> None:
            config = Config(
                database=replace(DatabaseSettings(), url=Secret(dsn), pool_size=8),
                web=replace(WebSettings(), listen="tcp:0:interface=127.0.0.1"),
                zadarma=replace(ZadarmaSettings(), secret=Secret(SECRET),
                                timezone="Europe/Athens"),
                fritzbox=(),
            )
            started = await started_daemon(config, reactor, dsn)
            daemon, port = started.daemon, started.port
            # Callers as a Greek account shows them: national numbers of the directory.
            numbers = [n[3:] for n in sample_numbers(dsn, 3000) if n.startswith("+30")]

            class Ok(resource.Resource):
                isLeaf = True

                def render_GET(self, request: Any) -> bytes:
                    return b"ok"

            bare = reactor.listenTCP(0, server.Site(Ok()), interface="127.0.0.1")
            bare_port = bare.getHost().port

            def load(*a: Any, **k: Any) -> Any:
                return threads.deferToThread(drive, *a, **k)

            # Not counted: each pooled connection plans its statements on first use.
            await load(port, numbers, "NOTIFY_END", 2, concurrency=args.concurrency)
            start = await load(port, numbers, "NOTIFY_START", args.seconds, rate=50)
            end = await load(port, numbers, "NOTIFY_END", args.seconds, rate=args.rate,
                             concurrency=max(1, int(args.rate // 40)))
            profile = None
            if args.profile:
                import cProfile

                # CPU time of the reactor's thread, not wall time: a profile in wall time
                # charges the daemon with the moments PostgreSQL had the core.
                profile = cProfile.Profile(time.thread_time)
                profile.enable()
            cpu_before, machine_before = _cpu_seconds(), _machine_busy()
            most = await load(port, numbers, "NOTIFY_END", args.seconds,
                              concurrency=args.concurrency)
            cpu = _cpu_seconds() - cpu_before
            rss = rss_kib() * 1024
            busy, elapsed = (a - b for a, b in zip(_machine_busy(), machine_before,
                                                   strict=True))
            if profile is not None:
                import pstats

                profile.disable()
                profile.dump_stats(args.profile)
                pstats.Stats(profile).sort_stats("tottime").print_stats(25)
            reference = await load(bare_port, numbers, "reference", args.seconds / 3,
                                   concurrency=args.concurrency)
            print(f"directory: {daemon.directory.state.entries:,} entries")
            print(f"NOTIFY_START -> caller_name answer: {percentiles(start['latencies'])}")
            print(f"NOTIFY_END at {end['rate']:.0f} req/s (asked {args.rate:g}):"
                  f" {percentiles(end['latencies'])}")
            print(f"NOTIFY_END most: {most['rate']:.0f} req/s with {args.concurrency} in"
                  f" flight, {percentiles(most['latencies'])}")
            served = most["rate"] * args.seconds
            print(f"daemon CPU (its one Python thread) per NOTIFY_END: "
                  f"{cpu / served * 1000:.3f} ms = {served / cpu:.0f} req/s per core;"
                  f" the whole machine was {busy / elapsed * 100:.0f}% busy of"
                  f" {os.cpu_count()} cores (PostgreSQL, load generator, daemon)")
            failed = {k: v for run in (start, end, most)
                      for k, v in [*run["errors"].items(), *run["failures"].items()]}
            if failed:
                print(f"non-200 answers: {failed}")
            print(f"daemon RSS after the load: {rss / 1e6:.1f} MB")
            print(f"reference bare Twisted 200: {reference['rate']:.0f} req/s,"
                  f" {percentiles(reference['latencies'])};"
                  f" ratio {most['rate'] / reference['rate']:.2f}")
            verdicts = [
                ("NOTIFY_START answer p99 <= 5 ms", p99(start["latencies"]) <= 0.005),
                ("NOTIFY_END p99 <= 10 ms at 300 req/s", p99(end["latencies"]) <= 0.010
                 and end["rate"] >= 0.95 * 300),
                ("NOTIFY_END >= 2,000 req/s on one core of daemon CPU", served / cpu >= 2000),
                ("NOTIFY_END >= 0.25 of the bare Twisted reference",
                 most["rate"] >= 0.25 * reference["rate"]),
                ("daemon RSS <= 72 MB under load", rss <= 72_000_000),
            ]
            missed.extend(report(verdicts))
            await bare.stopListening()
            await started.stop()

        missed: list[str] = []
        try:
            with cpu_hog(args.hog):
                task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
        except SystemExit as exit_:
            if exit_.code:
                raise
        if missed:
            raise SystemExit(f"{len(missed)} quality target(s) missed")


if __name__ == "__main__":
    main()
