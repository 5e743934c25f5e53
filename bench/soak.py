"""bench/soak: the daemon's memory over a long load with every feature on (issue 21, target 5).

    .venv/bin/python -m bench.soak                # 1,000,000 events at 1,500/s, 1 h at most
    .venv/bin/python -m bench.soak --entries 20000 --history 2000 --events 30000 --sample 5000

The installed ``dpvoip run`` runs as its own process against a private PostgreSQL holding
the CRM's tables (``--entries`` directory entries, ``--history`` past calls; a first start,
not measured, builds dpvoip's schema and directory index, as in ``bench.start``), with
every feature of the target configured:
- Zadarma webhooks (``[zadarma]``), the load: ``--events`` signed events, NOTIFY_START and
  NOTIFY_END of one call after the other, callers from the directory and unknown ones, at
  ``--rate`` events/s over ``--concurrency`` HTTP/1.1 keep-alive connections, sent by a
  load generator in its own process;
- a Fritz!Box (``[[fritzbox]]``): ``dpvoip fritz-sim`` on 127.0.0.1 plays a call a second
  on its CallMonitor port and serves their call list over TR-064 (TLS, the daemon reading
  it every 30 s);
- a second provider: ``dpvoip asterisk-sim``, a fake Asterisk's Manager Interface playing a
  call every few seconds (``[[provider]] kind = "asterisk"``);
- the old monitor's endpoints (``[legacy_monitor]``): the load generator creates and ends a
  call a second through ``POST /accounting/api/fritz-webhook/``;
- live streams: ``--streams`` connections on ``GET /voip/events`` (a staff user's token:
  every stream gets every event), read throughout by another process.

The daemon's RSS (``VmRSS`` of its ``/proc/<pid>/status``) is sampled every ``--sample``
events and at the end. Printed: the table of samples (events, RSS MB, elapsed s); the RSS
after the warm-up (the first sample at 10 % of the events), its maximum and at the end; the
growth from the warm-up to the end (MB, and MB per 100,000 events); the answers that were
not 200; the calls in the database by source (proof that the events landed); what each
feature did (the daemon's /metrics, /readyz and log lines, the frames the streams read).
Then the verdicts; the exit status is 1 when a target is missed. The run stops by itself
after ``--max-seconds`` (and says so); everything listens on 127.0.0.1 only, and every
process and the private PostgreSQL are stopped at the end, also on errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from bench.directory import call_history, crm_database, sample_numbers, settle
from bench.live import bench_environment, staff_user
from bench.start import BIN, config_text
from bench.verdicts import cpu_hog, report
from bench.zadarma import SECRET
from dpvoip.web.server import LISTENING

ZONE = "Europe/Athens"
OWN = "2107654321"  # the office's own number, on the box and the PBX
LEGACY_TOKEN = "soak-monitor-token"  # noqa: S105 - the bench's own daemon's
PBX_SECRET = "soak-manager-secret"  # noqa: S105 - the bench's own fake PBX's
RSS_TARGET_MB, FLAT_TARGET_MB = 72.0, 2.0
#: Calls in the fake box's and the fake PBX's scripts (each played in a loop).
BOX_CALLS, PBX_CALLS = 600, 100
#: The metrics printed as evidence of what each feature did.
EVIDENCE = ("dpvoip_zadarma_webhooks", "dpvoip_zadarma_webhooks_refused",
            "dpvoip_fritzbox_connected", "dpvoip_fritzbox_lines",
            "dpvoip_call_list_passes", "dpvoip_call_list_failures", "dpvoip_call_list_calls",
            "dpvoip_asterisk_connected", "dpvoip_asterisk_events",
            "dpvoip_legacy_monitor_requests", "dpvoip_live_streams_open",
            "dpvoip_live_streams_dropped", "dpvoip_live_frames_sent")
#: Daemon log lines not shown: one a request, one a call change (counted instead).
ROUTINE = re.compile(r"\[dpvoip\.(web\.access|ingest)#")


def caller(numbers: list[str], n: int) -> str:
    """The n-th caller: a directory number, or every fifth time one the directory cannot
    have (its numbers start 69 or 21), so that lookups miss too."""
    if n % 5 == 4:
        return f"231{n % 10**7:07d}"
    return numbers[n % len(numbers)]


def rss_bytes(pid: int) -> int:
    """RSS of process ``pid`` (the daemon, not this bench), from its ``VmRSS`` (KiB)."""
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) * 1024


# -- the load generator (its own process) -----------------------------------------------


class _Tally:
    """What the load generator's threads share: the next call, the answers, the progress
    lines the bench samples the RSS at."""

    def __init__(self, sample: int) -> None:
        self.lock = threading.Lock()
        self.next_call = 0
        self.events = 0
        self.statuses: dict[str, int] = {}
        self.legacy: dict[str, int] = {}
        self._sample = sample

    def take(self, calls: int, deadline: float) -> int | None:
        with self.lock:
            if self.next_call >= calls or time.monotonic() > deadline:
                return None
            self.next_call += 1
            return self.next_call - 1

    def answered(self, status: str) -> None:
        with self.lock:
            self.events += 1
            if status != "200":
                self.statuses[status] = self.statuses.get(status, 0) + 1
            if self.events % self._sample == 0:
                print(f"progress {self.events}", flush=True)


def zadarma_forms(numbers: list[str], n: int, tag: str) -> tuple[dict[str, str], ...]:
    """NOTIFY_START and NOTIFY_END of call ``n``: its own pbx_call_id, and its own number
    called (a signed string belongs to one call, and the callers repeat)."""
    common = {"pbx_call_id": f"in_{tag}{n:032d}", "caller_id": caller(numbers, n),
              "call_start": datetime.now(ZoneInfo(ZONE)).strftime("%Y-%m-%d %H:%M:%S"),
              "called_did": f"30210{n % 10**7:07d}"}
    answered = n % 4 != 3
    end = {**common, "event": "NOTIFY_END", "duration": "65" if answered else "0",
           "disposition": "answered" if answered else "no answer", "status_code": "16",
           "is_recorded": "0", "internal": "100", "calltype": "normal"}
    return {**common, "event": "NOTIFY_START"}, end


def _post(connection: Any, path: str, body: bytes, headers: dict[str, str]) -> tuple[str, bytes]:
    """(status, body) of one request; the error's name when it failed (the connection is
    then closed: http.client opens it again on the next request)."""
    import http.client

    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return str(response.status), response.read()
    except (OSError, http.client.HTTPException) as error:
        connection.close()
        return type(error).__name__, b""


def webhook_worker(port: int, numbers: list[str], tally: _Tally, calls: int, rate: float,
                   began: float, deadline: float, tag: str) -> None:
    """Calls taken in turn, each event sent at its time on the shared schedule (or at
    once when the daemon is behind it: the concurrency bounds the load)."""
    import http.client
    from urllib.parse import urlencode

    from dpvoip.zadarma.signing import webhook_signature

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while (n := tally.take(calls, deadline)) is not None:
        for index, form in enumerate(zadarma_forms(numbers, n, tag)):
            if rate:
                time.sleep(max(0.0, began + (2 * n + index) / rate - time.monotonic()))
            status, _ = _post(connection, "/voip/zd/", urlencode(form).encode(), {
                "Content-Type": "application/x-www-form-urlencoded",
                "Signature": webhook_signature(SECRET, form) or "",
                "X-Forwarded-For": "185.45.152.42"})  # a Zadarma address, via the proxy
            tally.answered(status)
    connection.close()


def legacy_monitor(port: int, numbers: list[str], tally: _Tally, stop: threading.Event,
                   tag: str) -> None:
    """The old monitor's v4 webhook, a call a second: created, then ended (missed or
    answered) with the row id the create answered."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json",
               "Authorization": f"Bearer {LEGACY_TOKEN}"}
    n = 0
    while not stop.wait(1.0):
        at = datetime.now(ZoneInfo(ZONE)).replace(microsecond=0)
        create = {"action": "create", "call_id": f"{tag}_{n}", "direction": "incoming",
                  "phone_number": caller(numbers, n), "started_at": at.isoformat()}
        status, body = _post(connection, "/accounting/api/fritz-webhook/",
                             json.dumps(create).encode(), headers)
        if status in ("200", "201"):
            update = {"action": "update", "id": json.loads(body)["id"],
                      "status": "missed" if n % 2 else "completed",
                      "ended_at": (at + timedelta(seconds=1)).isoformat()}
            status, _ = _post(connection, "/accounting/api/fritz-webhook/",
                              json.dumps(update).encode(), headers)
        with tally.lock:
            tally.legacy[status] = tally.legacy.get(status, 0) + 1
        n += 1
    connection.close()


def load(port: int, numbers: list[str], events: int, rate: float, concurrency: int,
         sample: int, deadline: float) -> None:
    """The load generator: prints ``progress N`` every ``sample`` events answered, then
    its figures (JSON)."""
    tally = _Tally(sample)
    tag = f"{os.getpid() % 10**8:08d}"
    stop = threading.Event()
    legacy = threading.Thread(target=legacy_monitor, args=(port, numbers, tally, stop, tag))
    legacy.start()
    began = time.monotonic()
    workers = [threading.Thread(target=webhook_worker, args=(
        port, numbers, tally, events // 2, rate, began, deadline, tag))
        for _ in range(concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.monotonic() - began
    stop.set()
    legacy.join()
    print(json.dumps({"events": tally.events, "seconds": seconds, "statuses": tally.statuses,
                      "legacy": tally.legacy, "deadline": time.monotonic() > deadline}),
          flush=True)


# -- the stream readers (their own process) ---------------------------------------------


@dataclass
class _Stream:
    sock: socket.socket
    head: bytes = b""
    status: str = ""  # the answer's status line; "closed" when closed before it
    tail: bytes = b""
    frames: int = 0


def _open_streams(port: int, token: str, count: int,
                  selector: selectors.BaseSelector) -> list[_Stream]:
    request = (f"GET /voip/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream"
               f"\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
    opened = []
    for _ in range(count):
        stream = _Stream(socket.create_connection(("127.0.0.1", port)))
        stream.sock.sendall(request)
        stream.sock.setblocking(False)
        selector.register(stream.sock, selectors.EVENT_READ, stream)
        opened.append(stream)
    return opened


def _take(stream: _Stream, data: bytes) -> None:
    """Count the frames in ``data`` (an event's frame has a line ``event: <kind>``; the
    tail kept covers one split between two reads)."""
    if not stream.status:
        stream.head += data
        if b"\r\n\r\n" not in stream.head:
            return
        head, data = stream.head.split(b"\r\n\r\n", 1)
        stream.status = head.split(b"\r\n", 1)[0].decode("latin-1")
    seen = stream.tail + data
    stream.frames += seen.count(b"\nevent: ")
    stream.tail = seen[-7:]


def _figures(opened: list[_Stream]) -> str:
    return json.dumps({"frames": sum(s.frames for s in opened),
                       "closed": sum(s.sock.fileno() < 0 for s in opened),
                       "refused": [s.status for s in opened if " 200 " not in s.status + " "]})


def read_streams(port: int, token: str, count: int) -> None:
    """``count`` streams read until a line on stdin; prints ``ready`` once every one has
    answered (``not ready`` and its figures when some did not within a minute), and at the
    end its figures (JSON): frames read, streams closed early, refused."""
    selector = selectors.DefaultSelector()
    opened = _open_streams(port, token, count, selector)
    selector.register(sys.stdin, selectors.EVENT_READ, None)
    patience, said = time.monotonic() + 60, False
    while True:
        for key, _ in selector.select(timeout=1):
            if key.data is None:
                sys.stdin.readline()
                print(_figures(opened), flush=True)
                return
            stream: _Stream = key.data
            try:
                data = stream.sock.recv(262144)
            except OSError:
                data = b""
            if not data:
                selector.unregister(stream.sock)
                stream.sock.close()
                stream.status = stream.status or "closed"
                continue
            _take(stream, data)
        if not said and all(s.status for s in opened):
            said = True
            print("ready", flush=True)
        elif not said and time.monotonic() > patience:
            print(f"not ready {_figures(opened)}", flush=True)
            return


# -- the fakes and the daemon ---------------------------------------------------------


def box_script(numbers: list[str], calls: int) -> str:
    """A call a second on the fake box, each ringing 3 s on its own connection id (four
    in turn); every third one answered on handset 11 after a second."""
    steps = []
    for second in range(calls + 3):
        lines = []
        if second < calls:
            lines.append(f"{{now}};RING;{second % 4};{caller(numbers, second)};{OWN};SIP0;")
        if second >= 1 and (second - 1) % 3 == 0 and second - 1 < calls:
            lines.append(f"{{now}};CONNECT;{(second - 1) % 4};11;"
                         f"{caller(numbers, second - 1)};")
        if 0 <= second - 3 < calls:
            talked = 2 if (second - 3) % 3 == 0 else 0
            lines.append(f"{{now}};DISCONNECT;{(second - 3) % 4};{talked};")
        steps += [f"{1 if i == 0 else 0} {line}" for i, line in enumerate(lines)]
    return "\n".join(steps) + "\n"


def pbx_script(numbers: list[str], calls: int) -> str:
    """A call every few seconds on the fake PBX, answered and missed in turn."""
    steps = []
    for n in range(calls):
        who = caller(numbers, n + 7)
        steps.append(f"1 incoming-answered caller={who} ext=201 ring=2 talk=4" if n % 2 else
                     f"1 incoming-missed caller={who} ext=202 ring=3")
    return "\n".join(steps) + "\n"


def _wait_for(log: Path, pattern: re.Pattern[str], process: subprocess.Popen[bytes],
              patience: float) -> re.Match[str]:
    """The first match of ``pattern`` in the process's log, as soon as it is written."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        found = pattern.search(log.read_text(errors="replace"))
        if found:
            return found
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"{process.args!r} did not say {pattern.pattern!r} (exit"
                     f" {process.poll()}):\n{log.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def spawned(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process writing to ``log``, stopped with SIGTERM afterwards (killed when
    it does not stop within a minute)."""
    with log.open("ab") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT,
                                   env=bench_environment())
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def fake_box(stack: contextlib.ExitStack, folder: Path, numbers: list[str]) -> list[str]:
    """``dpvoip fritz-sim`` with its TR-064 side (TLS) on free ports; the ``[[fritzbox]]``
    lines it prints for dpvoip (ports, login, the certificate's fingerprint)."""
    script, log = folder / "box.txt", folder / "box.log"
    script.write_text(box_script(numbers, BOX_CALLS))
    process = stack.enter_context(spawned(
        [str(BIN / "dpvoip"), "fritz-sim", str(script), "--port", "0", "--tr064-port", "0",
         "--loop"], log))
    found = _wait_for(log, re.compile(r'^\[\[fritzbox\]\]$.*?^tr064_certificate = "[0-9a-f]{64}"$',
                                      re.MULTILINE | re.DOTALL), process, 60)
    return found.group(0).splitlines()


def fake_pbx(stack: contextlib.ExitStack, folder: Path, numbers: list[str]) -> int:
    """``dpvoip asterisk-sim`` on a free port; the port."""
    script, log = folder / "pbx.txt", folder / "pbx.log"
    script.write_text(pbx_script(numbers, PBX_CALLS))
    process = stack.enter_context(spawned(
        [str(BIN / "dpvoip"), "asterisk-sim", str(script), "--port", "0", "--loop",
         "--secret", PBX_SECRET], log))
    return int(_wait_for(log, re.compile(r"AMI on 127\.0\.0\.1:(\d+)"), process, 60).group(1))


def soak_config(dsn: str, state: Path, box: list[str], pbx_port: int, streams: int) -> str:
    """Every feature of the target on, each as an office writes it."""
    return "\n".join([
        f'[daemon]\nstate_dir = "{state}"', f'[database]\nurl = "{dsn}"',
        '[web]\nlisten = "tcp:0:interface=127.0.0.1"',
        f'[directory]\nown_numbers = ["{OWN}"]',
        f'[zadarma]\nsecret = "{SECRET}"\ntimezone = "{ZONE}"',
        f'[legacy_monitor]\ntoken = "{LEGACY_TOKEN}"',
        f"[live]\nmax_streams = {max(200, streams)}",
        *box, f'own_numbers = ["{OWN}"]', "reconcile_every_seconds = 30",
        '[[provider]]\nkind = "asterisk"\nname = "pbx"\nhost = "127.0.0.1"',
        f'port = {pbx_port}\nusername = "dpvoip"\nsecret = "{PBX_SECRET}"',
        'trunk_patterns = ["PJSIP/provider-*"]', ""])


def readyz(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as response:  # noqa: S310
            found: dict[str, Any] = json.load(response)
            return found
    except (urllib.error.URLError, OSError, ValueError):
        return None


@contextlib.contextmanager
def running(config: Path, log: Path, patience: float
            ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``dpvoip run`` of ``config``, once ready with its directory built: (process, URL)."""
    with spawned([str(BIN / "dpvoip"), "run", "--config", str(config)], log) as process:
        url = _wait_for(log, LISTENING, process, patience).group(1)
        deadline = time.monotonic() + patience
        while not ((state := readyz(url)) and state["directory"]["built"]):
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"dpvoip not ready with its directory built:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield process, url


def stream_token(config: Path) -> str:
    """A dpvoip token of the CRM's staff user ``bench`` (made by ``staff_user``)."""
    made = subprocess.run([str(BIN / "dpvoip"), "token", "create", "--user", "bench",
                           "--label", "soak", "--config", str(config)],
                          capture_output=True, text=True, check=True, env=bench_environment())
    return made.stdout.strip().splitlines()[-1]


def _child(option: str, settings: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench.soak", option, json.dumps(settings)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=bench_environment())


class StreamReaders:
    """The stream readers' process, once its streams are open."""

    def __init__(self, port: int, token: str, count: int) -> None:
        self._child = _child("--streams-process", {"port": port, "token": token,
                                                    "count": count})
        assert self._child.stdout is not None
        answer = self._child.stdout.readline().strip()
        if answer != "ready":
            self.kill()
            raise SystemExit(f"the stream readers could not open their streams: {answer!r}")

    def stop(self) -> dict[str, Any]:
        """Its figures (frames read, streams closed early, refused)."""
        out, _ = self._child.communicate("stop\n", timeout=60)
        figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return figures

    def kill(self) -> None:
        if self._child.poll() is None:
            self._child.kill()
            self._child.wait()


# -- the soak -----------------------------------------------------------------------------


class Sample(NamedTuple):
    events: int
    rss: int  # bytes
    elapsed: float


def _lines(stream: Any) -> queue.Queue[str | None]:
    """The lines of ``stream`` as they come, read by a thread (None at its end): the bench
    waits for them with a timeout, so that a stuck load generator cannot hold it."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def drive(options: dict[str, Any], daemon_pid: int, deadline: float
          ) -> tuple[list[Sample], dict[str, Any]]:
    """Run the load generator to its end (or the deadline), sampling the daemon's RSS at
    each of its progress lines and at the end: (samples, its figures)."""
    child = _child("--load-process", {**options, "deadline": deadline})
    assert child.stdout is not None
    began = time.monotonic()
    lines, samples = _lines(child.stdout), [Sample(0, rss_bytes(daemon_pid), 0.0)]
    figures: dict[str, Any] = {"deadline": True, "statuses": {"load generator stuck": 1}}
    try:
        while (line := lines.get(timeout=max(1.0, deadline + 60 - time.monotonic()))
               ) is not None:
            if line.startswith("progress "):
                samples.append(Sample(int(line.split()[1]), rss_bytes(daemon_pid),
                                      time.monotonic() - began))
            elif line.startswith("{"):
                figures = json.loads(line)
    except queue.Empty:
        pass
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    end = Sample(figures.get("events", 0), rss_bytes(daemon_pid), time.monotonic() - began)
    return [*samples, end], figures


def _metrics(url: str) -> list[str]:
    """The /metrics samples of the features (EVIDENCE)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    return [line for line in text.splitlines() if not line.startswith("#")
            and re.split(r"[{ ]", line)[0].removesuffix("_total") in EVIDENCE]


def _total(metrics: list[str], name: str, label: str = "") -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics
               if re.split(r"[{ ]", line)[0].removesuffix("_total") == name and label in line)


def calls_in_database(dsn: str) -> dict[str, int]:
    """accounting_voipcall rows by source, from their call ids."""
    import psycopg2

    connection = psycopg2.connect(dsn)
    with connection.cursor() as cursor:
        cursor.execute("SELECT split_part(call_id, '-', 1), count(*) FROM accounting_voipcall"
                       " GROUP BY 1 ORDER BY 1")
        rows = {str(prefix): int(count) for prefix, count in cursor.fetchall()}
    connection.close()
    names = {"zd": "Zadarma", "fb": "Fritz!Box", "ast": "Asterisk", "lm": "old monitor",
             "past": "history"}
    return {names.get(prefix, prefix): count for prefix, count in rows.items()}


def print_samples(samples: list[Sample], asked: int) -> tuple[Sample, Sample]:
    """The table; (the warm-up sample, the last)."""
    print(f"{'events':>10} {'RSS MB':>8} {'elapsed s':>10}")
    for index, sample in enumerate(samples):
        print(f"{sample.events:>10,} {sample.rss / 1e6:>8.1f} {sample.elapsed:>10.1f}"
              + ("  (before the load)" if index == 0 else "")
              + ("  (the end)" if index == len(samples) - 1 else ""))
    warm = next((s for s in samples if s.events >= asked / 10), samples[-1])
    end = samples[-1]
    grown = (end.rss - warm.rss) / 1e6
    per = grown / (end.events - warm.events) * 100_000 if end.events > warm.events else 0.0
    print(f"RSS after warm-up ({warm.events:,} events): {warm.rss / 1e6:.1f} MB;"
          f" max {max(s.rss for s in samples) / 1e6:.1f} MB; at the end"
          f" ({end.events:,} events) {end.rss / 1e6:.1f} MB")
    print(f"growth from warm-up to the end: {grown:+.2f} MB over"
          f" {end.events - warm.events:,} events = {per:+.3f} MB per 100,000 events")
    return warm, end


def print_evidence(url: str, log: Path, readers: StreamReaders, figures: dict[str, Any],
                   dsn: str) -> tuple[list[str], dict[str, Any]]:
    """What each feature did, as the daemon and the clients saw it (the daemon's figures
    read while the streams are still open): (its metrics, the stream readers' figures)."""
    state, metrics = readyz(url) or {}, _metrics(url)
    streams = readers.stop()
    print(f"calls in the database: {calls_in_database(dsn)}")
    print(f"old monitor's webhook answers (create and update): {figures.get('legacy')}")
    print(f"streams: frames read {streams.get('frames', 0):,}, closed early"
          f" {streams.get('closed')}, refused {streams.get('refused')}")
    print(f"/readyz fritzbox: {json.dumps(state.get('fritzbox'))}")
    print(f"/readyz providers: {json.dumps(state.get('providers'))}")
    print("/metrics:\n  " + "\n  ".join(metrics))
    lines = log.read_text(errors="replace").splitlines()
    shown = [line for line in lines if not ROUTINE.search(line)]
    print(f"daemon log: {len(lines) - len(shown):,} lines of requests and call changes, and"
          f" these {len(shown)} (the first 30):\n  " + "\n  ".join(shown[:30]))
    return metrics, streams


def verdicts(samples: list[Sample], warm: Sample, complete: bool, metrics: list[str],
             streams: dict[str, Any]) -> list[str]:
    ran = {
        "Fritz!Box lines": _total(metrics, "dpvoip_fritzbox_lines"),
        "TR-064 reads": _total(metrics, "dpvoip_call_list_passes", 'result="ok"'),
        "AMI events": _total(metrics, "dpvoip_asterisk_events"),
        "old monitor calls": _total(metrics, "dpvoip_legacy_monitor_requests", "created"),
        "stream frames read": streams.get("frames", 0),
    }
    idle = [name for name, count in ran.items() if not count]
    if idle:
        print(f"features that did nothing: {', '.join(idle)}")
    if not complete:
        print("the soak did not drive every event asked: not flat over them")
    return report([
        (f"daemon RSS <= {RSS_TARGET_MB:g} MB under load with every feature on",
         max(s.rss for s in samples) <= RSS_TARGET_MB * 1e6),
        (f"RSS flat over the soak (growth from warm-up to end <= {FLAT_TARGET_MB:g} MB)",
         complete and samples[-1].rss - warm.rss <= FLAT_TARGET_MB * 1e6),
        ("every feature ran during the soak", not idle and not streams.get("closed")),
    ])


def prepared(stack: contextlib.ExitStack, args: argparse.Namespace, folder: Path
             ) -> tuple[str, list[str], Path]:
    """The private PostgreSQL with the CRM's tables, dpvoip's schema and directory built
    by a first start (not measured), the fakes up and the soak's configuration written:
    (DSN, the callers, the configuration)."""
    dsn, _ = stack.enter_context(crm_database(args.entries))
    call_history(dsn, args.history)
    staff_user(dsn)
    state, first = folder / "state", folder / "first.toml"
    first.write_text(config_text(dsn, state))
    with running(first, folder / "first.log", patience=1800):
        pass
    settle(dsn)
    # Callers as the box and a Greek account show them: national numbers of the directory.
    numbers = [n[3:] for n in sample_numbers(dsn, 3000) if n.startswith("+30")]
    config = folder / "dpvoip.toml"
    config.write_text(soak_config(dsn, state, fake_box(stack, folder, numbers),
                                  fake_pbx(stack, folder, numbers), args.streams))
    return dsn, numbers, config


def soak(args: argparse.Namespace, folder: Path, deadline: float) -> list[str]:
    """Everything up, the load driven, the figures printed; the targets missed."""
    with contextlib.ExitStack() as stack:
        dsn, numbers, config = prepared(stack, args, folder)
        token = stream_token(config)
        log = folder / "daemon.log"
        daemon, url = stack.enter_context(running(config, log, patience=600))
        port = int(url.rsplit(":", 1)[1])
        readers = StreamReaders(port, token, args.streams)
        stack.callback(readers.kill)
        print(f"soak: {args.events:,} events asked at {args.rate:g}/s ({args.concurrency}"
              f" connections); directory {args.entries:,} entries, history"
              f" {args.history:,} calls; {args.streams} streams; daemon pid {daemon.pid}")
        samples, figures = drive(
            {"port": port, "numbers": numbers, "events": args.events, "rate": args.rate,
             "concurrency": args.concurrency, "sample": args.sample}, daemon.pid, deadline)
        done, seconds = samples[-1].events, figures.get("seconds", 0.0)
        if figures.get("deadline"):
            print(f"stopped at the deadline (--max-seconds {args.max_seconds:g}) after"
                  f" {done:,} of {args.events:,} events")
        print(f"load: {done:,} events in {seconds:.0f} s ({done / max(seconds, 1e-9):.0f}/s)")
        warm, _ = print_samples(samples, args.events)
        print(f"non-200 answers: {figures.get('statuses') or 'none'}")
        time.sleep(1)  # the last events reach the streams
        metrics, streams = print_evidence(url, log, readers, figures, dsn)
        complete = done >= args.events // 2 * 2 and not figures.get("deadline")
        return verdicts(samples, warm, complete, metrics, streams)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000,
                        help="Zadarma webhook events (NOTIFY_START and NOTIFY_END pairs)")
    parser.add_argument("--rate", type=float, default=1500.0,
                        help="events a second asked (0: as fast as the daemon answers)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="keep-alive connections sending the webhooks")
    parser.add_argument("--sample", type=int, default=50_000,
                        help="events between two samples of the daemon's RSS")
    parser.add_argument("--streams", type=int, default=20, help="live event streams open")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=200_000,
                        help="past calls in the CRM (with three log lines each)")
    parser.add_argument("--max-seconds", type=float, default=3600.0,
                        help="the whole run stops by itself after this many seconds")
    parser.add_argument("--hog", action="store_true",
                        help="keep one core busy with another process meanwhile")
    parser.add_argument("--keep", action="store_true",
                        help="keep the folder of the logs and configurations (path printed)")
    parser.add_argument("--load-process", help=argparse.SUPPRESS)
    parser.add_argument("--streams-process", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_process:
        load(**json.loads(args.load_process))
        return
    if args.streams_process:
        read_streams(**json.loads(args.streams_process))
        return
    # SIGTERM and Ctrl-C unwind like an error: every child and the PostgreSQL stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench.soak: terminated"))
    deadline = time.monotonic() + args.max_seconds
    folder = Path(tempfile.mkdtemp(prefix="dpvoip-bench-soak-"))
    try:
        with cpu_hog(args.hog):
            missed = soak(args, folder, deadline)
    finally:
        if args.keep:
            print(f"logs and configurations kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    if missed:
        raise SystemExit(f"{len(missed)} quality target(s) missed")


if __name__ == "__main__":
    main()
