"""``dpvoip psql [--config FILE] [psql's own arguments]``: psql on dpvoip's database.

The README's queries need psql on the embedded server's socket, whose folder (and, on a
machine with only the ``pgserver`` wheel, whose psql) a newcomer cannot guess. Everything
after an optional leading ``--config FILE`` goes to psql untouched (``-c``, ``-f``, ``-A``:
dpvoip's own ``-c`` would otherwise take psql's). psql replaces this process, so that it
owns the terminal and its exit status is the command's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from dpvoip.tap import load_or_exit


def split_config(arguments: Sequence[str]) -> tuple[str | None, list[str]]:
    """(dpvoip's ``--config`` when it comes first, the rest for psql)."""
    rest = list(arguments)
    if rest[:1] == ["--config"] and len(rest) > 1:
        return rest[1], rest[2:]
    if rest and rest[0].startswith("--config="):
        return rest[0].removeprefix("--config="), rest[1:]
    return None, rest


def main(arguments: Sequence[str], environ: Mapping[str, str]) -> int:
    from dpvoip.store.psql import PsqlError, psql_invocation

    path, rest = split_config(arguments)
    config = load_or_exit(path, environ)
    try:
        invocation = psql_invocation(config, Path.cwd(), rest, environ)
    except PsqlError as error:
        print(f"dpvoip: {error}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    os.execve(invocation.program, invocation.argv, invocation.env)  # noqa: S606 (no shell)
    return 1  # not reached: execve replaces this process or raises
