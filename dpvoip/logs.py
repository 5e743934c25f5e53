"""Log observers: readable text or JSON lines, filtered by level.

Secrets never reach a log line because they are ``Secret`` objects (masked in repr) and
the access log leaves query strings out; these observers only format.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)


def observer(format: str, level: str = "info", stream: IO[str] | None = None) -> ILogObserver:
    stream = stream or sys.stdout
    base: Any = jsonFileLogObserver(stream, recordSeparator="") if format == "json" else (
        textFileLogObserver(stream)
    )
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(base, [predicate])


def json_observer() -> ILogObserver:
    """For ``twistd --logger dpvoip.logs.json_observer``: JSON lines on standard output."""
    return observer("json")


def configured_observer() -> ILogObserver:
    """For ``twistd --logger``: the format and level of $DPVOIP_CONFIG's [log] section."""
    import os

    from dpvoip.tap import load_or_exit

    settings = load_or_exit(None, os.environ).log
    return observer(settings.format, settings.level)
