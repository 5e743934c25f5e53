"""A private PostgreSQL in dpvoip's state folder: the standalone default and the tests' server.

It listens on a unix socket only (``listen_addresses = ''``), trusts local connections
(the socket folder is private), and runs as an unprivileged user when dpvoip runs as root,
because ``initdb`` and ``postgres`` refuse to run as root. The binaries are the system's
PostgreSQL when present, else those of the ``pgserver`` wheel.

The functions here block (they run ``initdb`` and ``pg_ctl``): the daemon calls them from
a thread, the tests and the command line call them directly.

A data folder is started only with the binaries of the PostgreSQL major version that made
it (its ``PG_VERSION``): those found among the installed ones, else one line saying what
to do. An object stops only the server it started (or adopted from a killed dpvoip, under
the state folder's lock): never one that another process started after it.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

SUPERUSER = "dpvoip"
DATABASE = "dpvoip"
_SOCKET_PATH_LIMIT = 100  # sun_path is 108 bytes; ".s.PGSQL.5432" must fit behind the folder


class EmbeddedError(Exception):
    """The embedded PostgreSQL could not be found, initialised or started."""


def candidate_bindirs() -> list[Path]:
    """Folders that may hold PostgreSQL's binaries, the preferred first: ``pg_config``'s,
    the system's versions newest first, ``initdb`` on the PATH, the ``pgserver`` wheel's."""
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
    usable: list[Path] = []
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists() and folder not in usable:
            usable.append(folder)
    return usable


_NO_BINARIES = ("no PostgreSQL binaries found: install the system's postgresql package or "
                "`pip install pgserver`, or set DATABASE_URL")


def find_bindir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``."""
    found = candidate_bindirs()
    if not found:
        raise EmbeddedError(_NO_BINARIES)
    return found[0]


def major_of(version: str) -> str | None:
    """The major version in ``PG_VERSION`` ("15", "9.6") or in ``pg_ctl --version``'s
    answer ("pg_ctl (PostgreSQL) 15.18 (Debian ...)", "... 17beta1"): two numbers before
    10, one from 10 on."""
    for word in version.replace("(", " ").replace(")", " ").split():
        found = re.match(r"(\d+)(?:\.(\d+))?", word)
        if found is None:
            continue
        first, second = found.groups()
        if int(first) >= 10:
            return first
        return f"{first}.{second}" if second is not None else None
    return None


def binaries_major(bindir: Path) -> str | None:
    """The major version of the binaries in ``bindir`` (None when ``pg_ctl`` cannot say)."""
    try:
        out = subprocess.run([str(bindir / "pg_ctl"), "--version"], capture_output=True,
                             text=True, timeout=30, check=False, cwd="/")
    except OSError:
        return None
    return major_of(out.stdout) if out.returncode == 0 else None


def choose_bindir(data_major: str | None, installed: list[tuple[Path, str | None]]
                  ) -> Path | None:
    """The binaries to run a data folder of ``data_major`` with (None for a new folder:
    the preferred, first one). None when no installed version made it."""
    if data_major is None:
        return installed[0][0] if installed else None
    for folder, major in installed:
        if major == data_major:
            return folder
    return None


def version_advice(data: Path, data_major: str, installed: list[tuple[Path, str | None]]
                   ) -> str:
    """One line for a data folder no installed PostgreSQL can run: what made it, what is
    here, what to do."""
    here = ", ".join(sorted({f"PostgreSQL {m}" for _, m in installed if m})) or "none"
    return (f"the embedded database {data} was made by PostgreSQL {data_major}, which is not "
            f"installed (found: {here}): install PostgreSQL {data_major} to run it as it is, "
            f"or dump it with PostgreSQL {data_major}'s pg_dumpall and move "
            f"{data.parent} aside (dpvoip then makes a new, empty one)")


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

    def __init__(self, folder: Path, bindir: Path | None = None,
                 search: Callable[[], list[Path]] = candidate_bindirs) -> None:
        self.folder = folder.absolute()
        self.data = self.folder / "data"
        self.log_file = self.folder / "postgres.log"
        self._bindir = bindir
        self._search = search
        self.run_as = unprivileged_user()
        # The postmaster this object started or adopted (None: none yet, or it failed).
        self.started_pid: int | None = None
        self._start_tried = False
        socket_dir = self.folder / "run"
        if len(str(socket_dir)) > _SOCKET_PATH_LIMIT - 15:
            digest = hashlib.sha256(str(self.folder).encode()).hexdigest()[:12]
            socket_dir = Path(tempfile.gettempdir()) / f"dpvoip-pg-{digest}"
        self.socket_dir = socket_dir

    @property
    def bindir(self) -> Path:
        """The binaries for this data folder: those of the version that made it."""
        if self._bindir is None:
            self._bindir = self._choose_bindir()
        return self._bindir

    def data_major(self) -> str | None:
        """The major version that made the data folder (None: not made yet)."""
        try:
            return major_of((self.data / "PG_VERSION").read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError):
            return None

    def _choose_bindir(self) -> Path:
        candidates = self._search()
        if not candidates:
            raise EmbeddedError(_NO_BINARIES)
        wanted = self.data_major() if self.initialised() else None
        if wanted is None:
            return candidates[0]
        installed = [(folder, binaries_major(folder)) for folder in candidates]
        chosen = choose_bindir(wanted, installed)
        if chosen is None:
            raise EmbeddedError(version_advice(self.data, wanted, installed))
        return chosen

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
        """A postmaster runs on this data folder (not merely a stale ``postmaster.pid``,
        nor the unreaped zombie of a killed one: a container's init may never reap it)."""
        pid = self.server_pid()
        return pid is not None and postmaster_alive(pid)

    def start(self, timeout: float = 60) -> None:
        """Start the server (adopting one left running by a killed dpvoip) and its database.

        The server it started or adopted is the one ``stop`` stops: the state folder's lock
        makes sure no other dpvoip runs on it, so a running one is a killed dpvoip's.
        """
        self._start_tried = True
        self.started_pid = None
        _ = self.bindir  # another major version's folder: one line, before anything runs
        self.initialise()
        if not self.running():
            self._clear_stale_lock()
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
        self.started_pid = self.server_pid()
        self.create_database(DATABASE)

    def _clear_stale_lock(self) -> None:
        """Remove the lock files of a postmaster that is gone but left them (killed, or an
        unreaped zombie, which PostgreSQL takes for a live server and would refuse to start
        beside forever), once no old server process is attached to its shared memory:
        that interlock is the lock file's whole point, so it is checked before."""
        pid = self.server_pid()
        if pid is None or postmaster_alive(pid):
            return
        attached = shared_memory_attached(self.data / "postmaster.pid")
        if attached:
            raise EmbeddedError(
                f"the killed PostgreSQL (pid {pid}) still has {attached} processes attached "
                "to its shared memory; they end on their own, start again then")
        if attached is None:
            return  # no way to tell here: PostgreSQL's own check decides
        for lock in (self.data / "postmaster.pid",
                     self.socket_dir / f".s.PGSQL.{self.port()}.lock"):
            if _first_int(lock) == pid:
                lock.unlink(missing_ok=True)

    def port(self) -> int:
        """The port number in the socket's name (5432 unless the cluster says otherwise)."""
        lines = _lines(self.data / "postmaster.pid")
        return int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else 5432

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
        """Stop the server. After ``start``, only the server that start started or adopted:
        not when start failed, nor one that another process started since (an object never
        started, as in the tests' clean-ups, stops whatever runs on the folder)."""
        if not self.running():
            return
        if self._start_tried and self.server_pid() != self.started_pid:
            return
        stopped = self._run(
            "pg_ctl", "stop", "-w", "-t", str(int(timeout)), "-m", mode, "-D", str(self.data),
            timeout=timeout + 10,
        )
        if stopped.returncode != 0 and self.running():
            raise EmbeddedError(f"PostgreSQL did not stop: {_tail(stopped.stderr)}")

    def server_pid(self) -> int | None:
        return _first_int(self.data / "postmaster.pid")


@contextmanager
def for_command(state: Path) -> Iterator[EmbeddedPostgres]:
    """The state folder's PostgreSQL for a one-off command (``migrate``, ``lookup``,
    ``token``), as its owner allows. With no dpvoip on the folder, the command holds the
    folder's lock while it runs: a daemon started meanwhile refuses, rather than sharing
    a server that the command then stops under it; the command stops the server at the
    end if it started it. With a dpvoip on the folder, its server is used as it is, never
    started or stopped by the command (``EmbeddedError`` while it is not up yet)."""
    from dpvoip.state_folder import AlreadyRunning, InstanceLock, StateFolderError

    embedded = EmbeddedPostgres(state / "pg")
    try:
        lock = InstanceLock.acquire(state)
    except AlreadyRunning as running:
        holder: AlreadyRunning | None = running
    except StateFolderError as error:
        raise EmbeddedError(str(error)) from None
    else:
        holder = None
    if holder is not None:  # the daemon's server, as it is
        if not embedded.running():
            raise EmbeddedError(f"{holder}, and its PostgreSQL is not up yet: try again "
                                "once it is (dpvoip check says)")
        yield embedded
        return
    try:
        started_here = not embedded.running()
        embedded.start()
        try:
            yield embedded
        finally:
            if started_here:
                embedded.stop()
    finally:
        lock.release()


def postmaster_alive(pid: int) -> bool:
    """A PostgreSQL server runs as ``pid``: not a zombie (``kill(pid, 0)`` says yes to one),
    nor another program that got the number of a server gone since (after a reboot)."""
    if Path("/proc/self/stat").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
            name = stat.split("(", 1)[1].rsplit(")", 1)[0]
            state = stat.rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return False
        return bool(state) and state[0] not in ("Z", "X") and name.startswith("postgres")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shared_memory_attached(pid_file: Path) -> int | None:
    """How many processes are still attached to the System V segment ``postmaster.pid``
    names (0: none, or the segment is gone); None when this system cannot tell."""
    lines = _lines(pid_file)
    table = Path("/proc/sysvipc/shm")
    if len(lines) < 7 or not table.exists():
        return None
    words = lines[6].split()
    if len(words) != 2 or not words[1].isdigit():
        return None
    try:
        rows = table.read_text(encoding="ascii").splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        fields = row.split()
        if len(fields) > 6 and fields[1] == words[1]:
            return int(fields[6])
    return 0


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="ascii", errors="replace").splitlines()
    except OSError:
        return []


def _first_int(path: Path) -> int | None:
    lines = _lines(path)
    first = lines[0].strip() if lines else ""
    return int(first) if first.isdigit() else None


def _tail(text: str, lines: int = 3) -> str:
    return " / ".join(text.strip().splitlines()[-lines:]) or "no output"
