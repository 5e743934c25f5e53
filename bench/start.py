"""bench/start: from `dpvoip run` to a ready daemon, with the database initialised.

    .venv/bin/python -m bench.start                       # 1,000,000-entry directory, 5 runs
    .venv/bin/python -m bench.start --entries 100000 --runs 3 --hog

A private PostgreSQL holds the CRM's tables and ``--entries`` directory entries; a first
start builds dpvoip's schema and directory index (not timed). Then ``--runs`` starts of the
installed ``dpvoip run``, each timed from the spawn to its "listening on" line and to the
first ``/readyz`` answering 200, and stopped with SIGTERM. Also printed: how long the
process takes to import its code (``python -c "import dpvoip.service"``), the floor of a
start, and its RSS once ready (issue 21: ready in <= 1 s).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.directory import crm_database
from bench.verdicts import cpu_hog, report
from dpvoip.web.server import LISTENING

BIN = Path(sys.executable).parent


def config_text(dsn: str, state: Path) -> str:
    """The bench's daemon: Zadarma webhooks on the loopback, and no Fritz!Box (without the
    empty list, the default box ``fritz.box`` would be read: the office's real one)."""
    return ('fritzbox = []\n'
            f'[daemon]\nstate_dir = "{state}"\n'
            f'[database]\nurl = "{dsn}"\n'
            '[web]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            '[zadarma]\nsecret = "bench-secret"\ntimezone = "Europe/Athens"\n')


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def one_start(config: Path, log: Path, patience: float) -> tuple[float, float, int]:
    """(seconds to the listening line, seconds to ready, RSS KiB once ready)."""
    with log.open("wb") as output:
        began = time.perf_counter()
        process = subprocess.Popen([str(BIN / "dpvoip"), "run", "--config", str(config)],
                                   stdout=output, stderr=subprocess.STDOUT)
        try:
            listening = url = None
            deadline = began + patience
            while time.perf_counter() < deadline:
                if url is None:
                    found = LISTENING.search(log.read_text(errors="replace"))
                    if found:
                        listening, url = time.perf_counter() - began, found.group(1)
                if url is not None and ready(url):
                    up = time.perf_counter() - began
                    rss = int(Path(f"/proc/{process.pid}/status").read_text()
                              .split("VmRSS:")[1].split()[0])
                    assert listening is not None
                    return listening, up, rss
                if process.poll() is not None:
                    raise SystemExit(f"dpvoip exited {process.returncode}:\n"
                                     f"{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.005)
            raise SystemExit(f"not ready within {patience} s:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def import_seconds() -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import dpvoip.service"], check=True)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hog", action="store_true",
                        help="keep one core busy with another process meanwhile")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="dpvoip-bench-start-"))
    try:
        with crm_database(args.entries) as (dsn, _):
            config = folder / "dpvoip.toml"
            config.write_text(config_text(dsn, folder / "state"))
            one_start(config, folder / "first.log", patience=1800)  # schema, directory
            with cpu_hog(args.hog):
                imports = [import_seconds() for _ in range(args.runs)]
                runs = [one_start(config, folder / f"run{n}.log", patience=300)
                        for n in range(args.runs)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    listening = [r[0] for r in runs]
    up = [r[1] for r in runs]
    print(f"directory {args.entries:,} entries; {args.runs} starts of `dpvoip run`")
    print("  to the listening line: " + ", ".join(f"{s:.2f}" for s in listening)
          + f" s (median {statistics.median(listening):.2f} s)")
    print("  to /readyz 200:        " + ", ".join(f"{s:.2f}" for s in up)
          + f" s (median {statistics.median(up):.2f} s)")
    print(f"  importing dpvoip.service alone: median {statistics.median(imports):.2f} s")
    print(f"  RSS once ready: median {statistics.median(r[2] for r in runs) / 1024:.1f} MiB")
    missed = report([("start to ready <= 1 s (median)", statistics.median(up) <= 1.0)])
    if missed:
        raise SystemExit(f"{len(missed)} quality target(s) missed")


if __name__ == "__main__":
    main()
