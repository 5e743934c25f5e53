"""Run the real daemon (twistd, as installed) in a subprocess and talk to it over HTTP.

The daemon binds its own web port (``tcp:0``) and says which in its log ("listening on
http://..."): no test picks a port for it. Every wait here is a generous bound on
something that must happen (start, readiness, exit), not a measure of how fast it
happens: a machine busy with other work (two test runs at once on two cores, an initdb)
may take many times as long as an idle one, and only a hang should fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dpvoip.web.server import LISTENING

BIN = Path(sys.executable).parent
#: How long a daemon may take to start, be ready or stop before the test gives up on it.
PATIENCE = 120.0
REPO = Path(__file__).resolve().parents[2]


def clean_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DPVOIP_") and k not in (
               "DATABASE_URL", "FRITZ_HOST", "FRITZ_PORT", "FRITZ_API_TOKEN", "ZADARMA_KEY",
               "ZADARMA_SECRET", "SECRET_KEY", "JWT_SIGNING_KEY")}
    env.update(extra)
    return env


class Daemon:
    """One daemon process; its output goes to a file so a test can read all of it."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.output_path = cwd / f"daemon-{time.monotonic_ns()}.log"
        self._output = self.output_path.open("wb")
        self.process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=self._output, stderr=subprocess.STDOUT,
        )
        self.url = ""

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = PATIENCE) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.search(self.output())
            if found:
                self.url = found.group(1)
                return self.url
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"daemon never listened:\n{self.output()}")

    def get(self, path: str) -> tuple[int, dict[str, object]]:
        try:
            with urllib.request.urlopen(self.url + path,  # noqa: S310
                                        timeout=PATIENCE) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def wait_ready(self, timeout: float = PATIENCE) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        body: dict[str, object] = {}
        while time.monotonic() < deadline:
            status, body = self.get("/readyz")
            if status == 200:
                return body
            time.sleep(0.1)
        raise AssertionError(f"never ready: {body}\n{self.output()}")

    def terminate(self, timeout: float = PATIENCE) -> int:
        """SIGTERM; the exit status. How quickly a stop gives up on stuck work is the web
        server's ``drain_timeout``, tested with a Clock in ``test_web``; here only that
        the process exits, cleanly."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"no exit {timeout}s after SIGTERM:\n{self.output()}") from None

    def wait_exit(self, timeout: float = PATIENCE) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running:\n{self.output()}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(PATIENCE)
        self._output.close()


def twistd(*args: str) -> list[str]:
    return [str(BIN / "twistd"), *args]


def scratch(case: Any) -> Path:
    """A state folder of its own for an in-process daemon (its spool), removed afterwards:
    never the working directory, where one test's spool would replay into the next."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="dpvoip-state-"))
    case.addCleanup(shutil.rmtree, folder, True)
    return folder
