"""Real redis-servers for the tests of the CRM's sessions in Redis.

``redis()`` is one server for the whole test run (like ``support.postgres.postgres()``),
started at first use in a temporary folder and stopped at exit. It listens on a unix
socket in that folder and on a loopback TCP port, requires a password (the ``default``
user's) and knows a second ACL user, so that every way the CRM's ``REDIS_CACHE_URL`` can
name it is exercised.

The TCP port: redis-server cannot be told to pick a free one (its port 0 means "no TCP"),
and a port the test suite found free, released and handed over could be taken by another
process in between. So redis-server itself binds a random loopback port, once; when that
port is taken, it exits saying so and another is tried. No port is ever released and
bound again.

``private_redis(case)`` is a server of one test's own, on a unix socket only (a path,
so it can be stopped and started again at the same address), no password.

``RedisServer.command`` is a small blocking client of the server's own protocol (RESP),
for set-up and assertions: written apart from the code under test (txredisapi).
"""

from __future__ import annotations

import atexit
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

#: How long a starting server may take before it is called hung (a hang detector: an
#: idle machine needs milliseconds).
HUNG_SECONDS = 60.0
#: Loopback ports redis-server tries, below Linux's ephemeral range (32768-60999) so that
#: outgoing connections do not take them.
_PORTS = range(20000, 32000)
_ATTEMPTS = 50

DEFAULT_PASSWORD = "default p@ss/word"  # needs percent-encoding in a URL
ACL_USER = "crm"
ACL_PASSWORD = "acl-secret-for-the-crm"


class RedisError(Exception):
    """An error reply of the server (``-ERR ...``)."""


class RedisServer:
    """One redis-server process in its own temporary folder, loopback only."""

    def __init__(self, *, tcp: bool, password: str = "") -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="dpvoip-test-redis-"))
        self.socket = self.folder / "redis.sock"
        self.log = self.folder / "redis.log"
        self.password = password
        self.tcp = tcp
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    # -- the process ---------------------------------------------------------------------

    def _arguments(self, port: int) -> list[str]:
        arguments = [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.folder), "--logfile", str(self.log),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--protected-mode", "yes", "--databases", "16",
        ]
        if self.password:
            arguments += ["--requirepass", self.password,
                          "--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "+@all"]
        return arguments

    def start(self) -> None:
        """Start the server (again, at the same socket path and port when it ran before)."""
        if self.port or not self.tcp:
            self._launch(self.port)
            return
        for _ in range(_ATTEMPTS):
            port = random.choice(_PORTS)  # a port number, not a secret
            if self._launch(port, may_be_taken=True):
                self.port = port
                return
        raise RuntimeError(f"redis-server found no free loopback port in {_ATTEMPTS} tries")

    def _launch(self, port: int, may_be_taken: bool = False) -> bool:
        """Run redis-server on ``port`` (0: no TCP) until it answers PING; False when the
        port was taken (and ``may_be_taken``)."""
        self.log.write_bytes(b"")
        self.process = subprocess.Popen(self._arguments(port), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + HUNG_SECONDS
        while True:
            if self.process.poll() is not None:
                said = self.log.read_text(errors="replace")
                self.process = None
                if may_be_taken and "Address already in use" in said:
                    return False
                raise RuntimeError(f"redis-server did not start:\n{said}")
            if self.socket.exists():
                try:
                    if self.command("PING") == b"PONG":
                        return True
                except (OSError, RedisError):
                    pass
            if time.monotonic() > deadline:
                self.stop_process()
                raise RuntimeError(f"redis-server did not answer within {HUNG_SECONDS:g} s")
            time.sleep(0.01)

    def stop_process(self) -> None:
        """Kill the server at once (SIGKILL: Redis is gone, as after a crash)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        self.socket.unlink(missing_ok=True)

    def close(self) -> None:
        self.stop_process()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- a blocking client ---------------------------------------------------------------

    def command(self, *args: str | bytes | int, db: int = 0) -> Any:
        """Run one command over the unix socket (authenticated, on database ``db``) and
        return its reply: bytes, int, None, a list, or ``RedisError`` raised."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(HUNG_SECONDS)
            connection.connect(str(self.socket))
            reader = connection.makefile("rb")
            commands: list[tuple[str | bytes | int, ...]] = []
            if self.password:
                commands.append(("AUTH", self.password))
            if db:
                commands.append(("SELECT", db))
            commands.append(args)
            for each in commands:
                connection.sendall(_encode(each))
            replies = [_reply(reader) for _ in commands]
        for reply in replies:
            if isinstance(reply, RedisError):
                raise reply
        return replies[-1]

    # -- how the CRM would name it ---------------------------------------------------------

    def unix_url(self, db: int, password: str | None = None) -> str:
        secret = self.password if password is None else password
        userinfo = f":{_quote(secret)}@" if secret else ""
        return f"unix://{userinfo}{self.socket}?db={db}"

    def tcp_url(self, db: int, user: str = "", password: str | None = None) -> str:
        secret = self.password if password is None else password
        userinfo = f"{_quote(user)}:{_quote(secret)}@" if secret else ""
        return f"redis://{userinfo}127.0.0.1:{self.port}/{db}"


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _encode(args: tuple[str | bytes | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _reply(reader: Any) -> Any:
    line: bytes = reader.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("connection closed mid-reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        return RedisError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data: bytes = reader.read(size + 2)
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_reply(reader) for _ in range(count)]
    raise OSError(f"unexpected reply {line!r}")


_server: RedisServer | None = None


def redis() -> RedisServer:
    """The shared server (unix socket and loopback TCP, password and an ACL user)."""
    global _server
    if _server is None:
        _server = RedisServer(tcp=True, password=DEFAULT_PASSWORD)
        atexit.register(_server.close)
    return _server


def private_redis(case: Any) -> RedisServer:
    """A server of the test's own (unix socket only, no password), removed afterwards."""
    server = RedisServer(tcp=False)
    case.addCleanup(server.close)
    return server
