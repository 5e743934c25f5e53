"""A private PostgreSQL in dpvoip's state folder: the standalone default and the tests' server.

It listens on a unix socket only (``listen_addresses = ''``), trusts local connections
(the socket folder is private), and runs as an unprivileged user when dpvoip runs as root,
because ``initdb`` and ``postgres`` refuse to run as root. The binaries are the system's
PostgreSQL when present, else those of the ``pgserver`` wheel.

The functions here block (they run ``initdb`` and ``pg_ctl``): the daemon calls them from
a thread, the tests and the command line call them directly.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

SUPERUSER = "dpvoip"
DATABASE = "dpvoip"
_SOCKET_PATH_LIMIT = 100  # sun_path is 108 bytes; ".s.PGSQL.5432" must fit behind the folder


class EmbeddedError(Exception):
    """The embedded PostgreSQL could not be found, initialised or started."""


def find_bindir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    candidates.extend(Path(p) for p in versions)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    spec = importlib.util.find_spec("pgserver")
    if spec and spec.origin:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    raise EmbeddedError(
        "no PostgreSQL binaries found: install the system's postgresql package or "
        "`pip install pgserver`, or set DATABASE_URL"
    )


@dataclass(frozen=True)
class RunAs:
    uid: int
    gid: int
    name: str


def unprivileged_user() -> RunAs | None:
    """The user PostgreSQL runs as when we are root: ``postgres`` if it exists, else nobody."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return RunAs(entry.pw_uid, entry.pw_gid, name)
    raise EmbeddedError("running as root and found no unprivileged user for PostgreSQL")


class EmbeddedPostgres:
    """One PostgreSQL cluster in ``folder`` (``folder/data`` and a private socket folder)."""

    def __init__(self, folder: Path, bindir: Path | None = None) -> None:
        self.folder = folder.absolute()
        self.data = self.folder / "data"
        self.log_file = self.folder / "postgres.log"
        self._bindir = bindir
        self.run_as = unprivileged_user()
        socket_dir = self.folder / "run"
        if len(str(socket_dir)) > _SOCKET_PATH_LIMIT - 15:
            digest = hashlib.sha256(str(self.folder).encode()).hexdigest()[:12]
            socket_dir = Path(tempfile.gettempdir()) / f"dpvoip-pg-{digest}"
        self.socket_dir = socket_dir

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    def dsn(self, database: str = DATABASE) -> str:
        return f"host={self.socket_dir} dbname={database} user={SUPERUSER}"

    # -- steps ---------------------------------------------------------------------------

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        owner = self.run_as
        return subprocess.run(
            [str(self.bindir / argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=owner.uid if owner else None,
            group=owner.gid if owner else None,
            extra_groups=[] if owner else None,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            cwd="/",
        )

    def _own(self, path: Path) -> None:
        if self.run_as is not None:
            os.chown(path, self.run_as.uid, self.run_as.gid)

    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def initialise(self) -> None:
        for folder in (self.folder, self.socket_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._own(folder)
        if self.initialised():
            return
        self.data.mkdir(mode=0o700, exist_ok=True)
        self._own(self.data)
        if self.run_as is not None:
            self._check_reachable()
        done = self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
            "-E", "UTF8", "--locale=C", "--no-instructions",
        )
        if done.returncode != 0:
            raise EmbeddedError(f"initdb failed: {_tail(done.stderr or done.stdout)}")
        with (self.data / "postgresql.auto.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                "listen_addresses = ''\n"
                "max_connections = 50\n"
                "shared_buffers = 128MB\n"
                "fsync = on\n"
            )

    def _check_reachable(self) -> None:
        assert self.run_as is not None
        probe = subprocess.run(
            ["test", "-w", str(self.data)], user=self.run_as.uid, group=self.run_as.gid,
            extra_groups=[], check=False,
        )
        if probe.returncode != 0:
            raise EmbeddedError(
                f"PostgreSQL runs as the unprivileged user {self.run_as.name!r}, which cannot "
                f"reach {self.data}: choose a state_dir that user can enter (e.g. /var/lib/dpvoip)"
            )

    def running(self) -> bool:
        if not self.initialised():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data), timeout=30).returncode == 0

    def start(self, timeout: float = 60) -> None:
        """Start the server (adopting one left running by a killed dpvoip) and its database."""
        self.initialise()
        if not self.running():
            self.log_file.touch(exist_ok=True)
            self._own(self.log_file)
            started = self._run(
                "pg_ctl", "start", "-w", "-t", str(int(timeout)), "-D", str(self.data),
                "-l", str(self.log_file),
                "-o", f"-c unix_socket_directories='{self.socket_dir}' -c listen_addresses=''",
                timeout=timeout + 10,
            )
            if started.returncode != 0:
                raise EmbeddedError(
                    f"PostgreSQL did not start: {_tail(started.stderr or started.stdout)}; "
                    f"see {self.log_file}"
                )
        self.create_database(DATABASE)

    def create_database(self, name: str, template: str = "template1") -> bool:
        """Create ``name`` unless it exists; True when it was created."""
        connection = psycopg2.connect(self.dsn("postgres"))
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone():
                    return False
                cursor.execute(
                    sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                        sql.Identifier(name), sql.Identifier(template)
                    )
                )
                return True
        finally:
            connection.close()

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        if not self.running():
            return
        stopped = self._run(
            "pg_ctl", "stop", "-w", "-t", str(int(timeout)), "-m", mode, "-D", str(self.data),
            timeout=timeout + 10,
        )
        if stopped.returncode != 0 and self.running():
            raise EmbeddedError(f"PostgreSQL did not stop: {_tail(stopped.stderr)}")

    def server_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None


def _tail(text: str, lines: int = 3) -> str:
    return " / ".join(text.strip().splitlines()[-lines:]) or "no output"
