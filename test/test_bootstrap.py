"""``tools/bootstrap`` run for real, in a copy of the tree, against shims of what it calls.

Why: the bootstrap runs before every ``make start`` and ``make test``. It once swallowed
pip's failures (``|| true``) and wrote its "installed" marker anyway, ran ``apt-get
update`` and reinstalled dpvoip on every start. These tests run the real script with a
PATH of shims that record every call: a Python whose ``-m venv`` makes a ``.venv`` of
shims and whose ``-m pip`` can fail like pip does, a ``dpvoip plugin-cache``, an
``apt-get`` that "installs" a package by putting its command on the PATH, an ``id`` that
says root, and a ``pg_config`` pointing at a fake PostgreSQL 15. Speed is shown by the
calls a run makes, never by the wall clock.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: What the script reads from the tree (the package's sources are hashed, never imported
#: by the shims, except by the interpreter that tells which PostgreSQL dpvoip would use).
TREE_FILES = ("setup.py", "pyproject.toml", "constraints.txt", "requirements-dev.txt")
TREE_DIRS = ("dpvoip", "twisted")
#: The real commands the script may run besides the shims (PATH holds nothing else, so
#: the machine's own redis-server, pg_config or apt-get cannot leak in).
REAL_TOOLS = ("bash", "cat", "sha256sum", "cut", "find", "sort", "xargs", "tr", "sed",
              "grep", "rm", "mv", "dirname", "ls", "flock")
PIP_ERROR = ("ERROR: Could not find a version that satisfies the requirement "
             "Twisted==99.0 (from versions: 26.10.0)")

PYTHON_SHIM = '''#!{real}
"""A fake interpreter: the base one (-m venv) and the virtualenv's (-m pip, -c)."""
import json, os, shutil, sys
args = sys.argv[1:]
def record(program):
    with open(os.environ["BOOTSTRAP_SHIM_LOG"], "a") as log:
        log.write(json.dumps({{"program": program, "args": args}}) + "\\n")
if args[:2] == ["-m", "venv"]:
    record("venv")
    bin_dir = os.path.join(args[2], "bin")
    os.makedirs(bin_dir)
    shutil.copy(__file__, os.path.join(bin_dir, "python"))
    shutil.copy(os.environ["BOOTSTRAP_DPVOIP_SHIM"], os.path.join(bin_dir, "dpvoip"))
elif args[:2] == ["-m", "pip"]:
    record("pip")
    failing = os.environ.get("FAKE_PIP_FAIL_ARG", ".")
    if os.environ.get("FAKE_PIP_ERROR") and "install" in args and failing in args:
        print("Collecting Twisted==99.0")
        sys.stderr.write(os.environ["FAKE_PIP_ERROR"] + "\\n")
        sys.exit(1)
    if any(a.startswith("pgserver") for a in args):
        bin_dir = os.path.join(".venv", "lib", "python3.11", "site-packages", "pgserver",
                               "pginstall", "bin")
        os.makedirs(bin_dir, exist_ok=True)
        for name in ("initdb", "pg_ctl"):
            with open(os.path.join(bin_dir, name), "w") as command:
                command.write("#!/bin/sh\\nexit 0\\n")
            os.chmod(os.path.join(bin_dir, name), 0o755)
    print("Collecting (fake)")
    print("Successfully installed (fake)")
elif args[:1] == ["-c"]:
    record("python -c")
    os.execv({real!r}, [{real!r}, *args])
else:
    sys.exit("python shim: unexpected arguments %r" % (args,))
'''

DPVOIP_SHIM = '''#!{real}
import json, os, sys
with open(os.environ["BOOTSTRAP_SHIM_LOG"], "a") as log:
    log.write(json.dumps({{"program": "dpvoip", "args": sys.argv[1:]}}) + "\\n")
found = not os.environ.get("FAKE_PLUGIN_MISSING")
print("twisted plugin cache rebuilt; dpvoip plugin found:", found)
sys.exit(0 if found else 1)
'''

APT_SHIM = '''#!{real}
"""A fake apt-get: records its calls; installing a package copies what the sandbox says
it provides (spare/<package>/*) into the shims' folder, which is first on PATH."""
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["BOOTSTRAP_SHIM_LOG"], "a") as log:
    log.write(json.dumps({{"program": "apt-get", "args": args}}) + "\\n")
if os.environ.get("FAKE_APT_FAIL"):
    sys.stderr.write("E: Unable to locate package (fake)\\n")
    sys.exit(100)
if "install" in args:
    for package in [a for a in args[args.index("install") + 1:] if not a.startswith("-")]:
        provided = os.path.join(os.environ["BOOTSTRAP_SPARE"], package)
        for name in os.listdir(provided):
            shutil.copy(os.path.join(provided, name), os.path.dirname(__file__))
'''


@dataclass
class Run:
    """One run of the script: its status, its output and the shims it called."""

    status: int
    stdout: str
    stderr: str
    calls: list[tuple[str, list[str]]] = field(default_factory=list)

    def programs(self, program: str) -> list[list[str]]:
        """The arguments of each call of one shim, in order."""
        return [args for name, args in self.calls if name == program]


class Sandbox:
    """A copy of the tree, a folder of shims first (and alone) on PATH, a call log."""

    def __init__(self, base: Path) -> None:
        self.tree = base / "tree"
        self.shims = base / "shims"
        self.tools = base / "tools"
        self.pg_bin = base / "pg" / "bin"
        self.spare = base / "spare"
        self.log = base / "calls.jsonl"
        #: Debian's folder of PostgreSQL versions, empty: only pg_config says where one is.
        self.pg_lib = base / "usr-lib-postgresql"
        for folder in (self.tree / "tools", self.shims, self.tools, self.pg_bin, self.pg_lib,
                       self.spare / "redis-server", self.spare / "postgresql"):
            folder.mkdir(parents=True)
        shutil.copy(ROOT / "tools" / "bootstrap", self.tree / "tools" / "bootstrap")
        for name in TREE_FILES:
            shutil.copy(ROOT / name, self.tree / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
        for name in TREE_DIRS:
            shutil.copytree(ROOT / name, self.tree / name, ignore=ignore)
        for tool in REAL_TOOLS:
            found = shutil.which(tool)
            assert found, f"{tool} is needed to run tools/bootstrap"
            (self.tools / tool).symlink_to(found)
        real = sys.executable
        self.script("python3.11", PYTHON_SHIM.format(real=real))
        self.script("dpvoip-shim", DPVOIP_SHIM.format(real=real))
        self.script("apt-get", APT_SHIM.format(real=real))
        self.script("id", '#!/bin/sh\necho "${FAKE_UID:-0}"\n')
        pg_config = f'#!/bin/sh\necho "{self.pg_bin}"\n'
        for folder in (self.shims, self.spare / "redis-server"):
            self.script("redis-server", "#!/bin/sh\nexit 0\n", folder=folder)
        for folder in (self.shims, self.spare / "postgresql"):
            self.script("pg_config", pg_config, folder=folder)
        for name in ("initdb", "pg_ctl"):
            self.script(name, "#!/bin/sh\nexit 0\n", folder=self.pg_bin)
        self.script("postgres", '#!/bin/sh\necho "postgres (PostgreSQL) 15.18 (fake)"\n',
                    folder=self.pg_bin)

    def script(self, name: str, text: str, folder: Path | None = None) -> None:
        path = (folder or self.shims) / name
        path.write_text(text)
        path.chmod(0o755)

    def without(self, *commands: str) -> None:
        """The machine lacks these system commands (apt-get can still install them)."""
        for command in commands:
            (self.shims / command).unlink()

    @property
    def marker(self) -> Path:
        return self.tree / ".venv" / ".dpvoip-installed"

    def run(self, *args: str, env: Mapping[str, str] | None = None) -> Run:
        """Run tools/bootstrap once; the calls returned are this run's only."""
        return self.finish(self.start(*args, env=env))

    def start(self, *args: str, env: Mapping[str, str] | None = None,
              ) -> subprocess.Popen[str]:
        self.log.write_text("")
        environment = {
            "PATH": f"{self.shims}:{self.tools}",
            "HOME": str(self.tree),
            "LANG": "C.UTF-8",
            "PYTHON": str(self.shims / "python3.11"),
            "BOOTSTRAP_SHIM_LOG": str(self.log),
            "BOOTSTRAP_DPVOIP_SHIM": str(self.shims / "dpvoip-shim"),
            "BOOTSTRAP_SPARE": str(self.spare),
            "BOOTSTRAP_PG_LIB": str(self.pg_lib),
            **(env or {}),
        }
        return subprocess.Popen(
            [str(self.tools / "bash"), str(self.tree / "tools" / "bootstrap"), *args],
            cwd=self.tree, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self, process: subprocess.Popen[str]) -> Run:
        stdout, stderr = process.communicate(timeout=120)
        logged = [json.loads(line) for line in self.log.read_text().splitlines()]
        calls = [(str(call["program"]), [str(a) for a in call["args"]]) for call in logged]
        return Run(process.returncode, stdout, stderr, calls)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    yield Sandbox(tmp_path)


def installs(run: Run) -> list[list[str]]:
    """The pip calls that install something."""
    return [args for args in run.programs("pip") if "install" in args]


def succeeded(run: Run) -> None:
    assert run.status == 0, f"bootstrap failed ({run.status}):\n{run.stdout}\n{run.stderr}"


def test_a_fresh_install_installs_everything_and_writes_the_marker_last(
        sandbox: Sandbox) -> None:
    run = sandbox.run("dev")
    succeeded(run)
    assert len(run.programs("venv")) == 1
    everything = installs(run)[-1]
    assert everything[-1] == "." and "requirements-dev.txt" in everything
    assert "pgserver>=0.1.4" not in everything  # a system PostgreSQL is there
    assert run.programs("dpvoip") == [["plugin-cache"]]
    assert run.programs("apt-get") == []
    assert "Collecting (fake)" in run.stdout  # pip's own progress is shown
    assert "[2/3] dpvoip and its pinned dependencies, the test tools" in run.stdout
    assert f"bootstrap: PostgreSQL: system PostgreSQL 15 ({sandbox.pg_bin})" in run.stdout
    assert sandbox.marker.read_text().splitlines()[1:3] == ["dev=yes", "pgserver=no"]


def test_a_second_run_with_nothing_changed_installs_nothing(sandbox: Sandbox) -> None:
    succeeded(sandbox.run("dev"))
    again = sandbox.run("dev")
    succeeded(again)
    # Only the one look at which PostgreSQL dpvoip would use: no pip, no plugin cache,
    # no apt-get, no virtualenv.
    assert [name for name, _ in again.calls] == ["python -c"]
    assert "up to date" in again.stdout
    # `make start` (no dev) after `make test` reinstalls nothing either.
    start = sandbox.run()
    succeeded(start)
    assert [name for name, _ in start.calls] == ["python -c"]


def test_a_failing_pip_fails_the_command_with_its_message_and_writes_no_marker(
        sandbox: Sandbox) -> None:
    run = sandbox.run("dev", env={"FAKE_PIP_ERROR": PIP_ERROR})
    assert run.status != 0
    assert PIP_ERROR in run.stderr
    assert "nothing is marked installed" in run.stderr
    assert not sandbox.marker.exists()
    assert run.programs("dpvoip") == []  # stopped at the failure
    # The next run (pip fixed) installs again instead of believing a marker.
    retry = sandbox.run("dev")
    succeeded(retry)
    assert installs(retry) and sandbox.marker.exists()


def test_a_failure_after_an_install_removes_the_old_marker(sandbox: Sandbox) -> None:
    succeeded(sandbox.run())
    with (sandbox.tree / "dpvoip" / "__init__.py").open("a") as source:
        source.write("# changed\n")
    run = sandbox.run(env={"FAKE_PIP_ERROR": PIP_ERROR})
    assert run.status != 0 and PIP_ERROR in run.stderr
    assert not sandbox.marker.exists()


def test_the_plugin_cache_is_part_of_the_install(sandbox: Sandbox) -> None:
    run = sandbox.run(env={"FAKE_PLUGIN_MISSING": "1"})
    assert run.status != 0
    assert not sandbox.marker.exists()


def test_a_changed_source_reinstalls_dpvoip_alone(sandbox: Sandbox) -> None:
    succeeded(sandbox.run("dev"))
    with (sandbox.tree / "dpvoip" / "config.py").open("a") as source:
        source.write("# changed\n")
    changed = sandbox.run("dev")
    succeeded(changed)
    (only,) = installs(changed)
    assert "--no-deps" in only and only[-1] == "."
    assert changed.programs("dpvoip") == [["plugin-cache"]]
    succeeded(settled := sandbox.run("dev"))
    assert installs(settled) == []


def test_a_new_module_counts_as_a_change_and_compiled_files_do_not(sandbox: Sandbox) -> None:
    succeeded(sandbox.run())
    cache = sandbox.tree / "dpvoip" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "config.cpython-311.pyc").write_bytes(b"compiled")
    unchanged = sandbox.run()
    succeeded(unchanged)
    assert installs(unchanged) == []
    (sandbox.tree / "dpvoip" / "new_module.py").write_text("")
    added = sandbox.run()
    succeeded(added)
    assert len(installs(added)) == 1


def test_changed_constraints_reinstall_the_dependencies(sandbox: Sandbox) -> None:
    succeeded(sandbox.run())
    with (sandbox.tree / "constraints.txt").open("a") as constraints:
        constraints.write("# raised a pin\n")
    run = sandbox.run()
    succeeded(run)
    assert "-c" in installs(run)[-1] and "--no-deps" not in installs(run)[-1]


def test_the_test_tools_are_added_once_after_a_plain_start(sandbox: Sandbox) -> None:
    start = sandbox.run()
    succeeded(start)
    assert all("requirements-dev.txt" not in args for args in installs(start))
    dev = sandbox.run("dev")
    succeeded(dev)
    assert "requirements-dev.txt" in installs(dev)[-1]
    succeeded(again := sandbox.run("dev"))
    assert installs(again) == []


def test_apt_get_is_not_called_when_nothing_is_missing(sandbox: Sandbox) -> None:
    for args in (("dev",), ("dev",), ()):
        run = sandbox.run(*args)
        succeeded(run)
        assert run.programs("apt-get") == []


def test_a_missing_test_tool_is_installed_with_one_update_then_never_again(
        sandbox: Sandbox) -> None:
    sandbox.without("redis-server")
    run = sandbox.run("dev")
    succeeded(run)
    apt = run.programs("apt-get")
    assert [a for a in apt if "update" in a] == [["update", "-qq"]]
    assert [a[-1] for a in apt if "install" in a] == ["redis-server"]
    again = sandbox.run("dev")
    succeeded(again)
    assert again.programs("apt-get") == []


def test_a_test_tool_that_cannot_be_installed_fails_with_what_to_do(sandbox: Sandbox) -> None:
    sandbox.without("redis-server")
    as_user = sandbox.run("dev", env={"FAKE_UID": "1000"})
    assert as_user.status != 0
    assert as_user.programs("apt-get") == []  # not root: never tries
    assert "apt-get install redis-server" in as_user.stderr
    failing = sandbox.run("dev", env={"FAKE_APT_FAIL": "1"})
    assert failing.status != 0
    assert "E: Unable to locate package" in failing.stderr
    assert not sandbox.marker.exists()


def test_two_missing_packages_share_one_apt_get_update(sandbox: Sandbox) -> None:
    sandbox.without("pg_config", "redis-server")
    run = sandbox.run("dev")
    succeeded(run)
    apt = run.programs("apt-get")
    assert [a for a in apt if "update" in a] == [["update", "-qq"]]
    assert [a[-1] for a in apt if "install" in a] == ["postgresql", "redis-server"]
    assert all("pgserver>=0.1.4" not in args for args in installs(run))
    assert sandbox.marker.read_text().splitlines()[2] == "pgserver=no"
    again = sandbox.run("dev")
    succeeded(again)
    assert again.programs("apt-get") == [] and installs(again) == []


def test_without_a_system_postgresql_the_wheel_is_installed_and_apt_not_retried(
        sandbox: Sandbox) -> None:
    sandbox.without("pg_config")
    failing_apt = {"FAKE_APT_FAIL": "1"}
    run = sandbox.run(env=failing_apt)
    succeeded(run)
    assert [a for a in run.programs("apt-get") if "update" in a] == [["update", "-qq"]]
    assert "the pgserver wheel's PostgreSQL instead" in run.stdout
    assert "pgserver>=0.1.4" in installs(run)[-1]
    assert sandbox.marker.read_text().splitlines()[2] == "pgserver=yes"
    # Every later start: the wheel's PostgreSQL is there, so apt-get is left alone.
    again = sandbox.run(env=failing_apt)
    succeeded(again)
    assert again.programs("apt-get") == [] and installs(again) == []


def waiting_in_flock(process: subprocess.Popen[str]) -> bool:
    """Whether the script's shell has a ``flock`` child (it waits for the lock)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()  # "pid (command) state ppid ..."
        except OSError:
            continue  # the process ended meanwhile
        command, _, rest = text.partition("(")[2].rpartition(")")
        if command == "flock" and int(rest.split()[1]) == process.pid:
            return True
    return False


def test_two_bootstraps_at_once_take_turns(sandbox: Sandbox) -> None:
    """The second waits for the first and then finds its marker: it installs nothing."""
    succeeded(sandbox.run())
    installed = sandbox.marker.read_text()
    # A first bootstrap is installing: it holds the lock and has removed the marker.
    sandbox.marker.unlink()
    with (sandbox.tree / ".venv" / ".bootstrap.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        second = sandbox.start()
        deadline = time.monotonic() + 60  # a hang detector, not a measure
        while not waiting_in_flock(second):
            assert second.poll() is None, "the second bootstrap did not wait for the lock"
            assert time.monotonic() < deadline, "the second bootstrap never reached the lock"
            time.sleep(0.05)
        sandbox.marker.write_text(installed)  # the first one is done
    run = sandbox.finish(second)
    succeeded(run)
    assert installs(run) == [] and "up to date" in run.stdout


def test_make_start_can_run_the_script() -> None:
    """The Makefile runs tools/bootstrap directly: it must stay executable in git."""
    assert os.access(ROOT / "tools" / "bootstrap", os.X_OK)
