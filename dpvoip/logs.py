"""Log observers: readable text or JSON lines, filtered by level.

Secrets never reach a log line because they are ``Secret`` objects (masked in repr) and
the access log leaves query strings out; these observers only format.

The JSON form is one flat object per line, for log shippers: ``time`` (ISO 8601, UTC),
``level``, ``namespace``, ``message`` (the rendered text) and the event's own fields.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)


def json_line(event: dict[str, Any]) -> str:
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in ("message", "format", "time", "system", "isError"):
            continue
        record.setdefault(key, value)
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"


def observer(format: str, level: str = "info", stream: IO[str] | None = None) -> ILogObserver:
    stream = stream or sys.stdout
    base: ILogObserver = (
        FileLogObserver(stream, json_line) if format == "json" else textFileLogObserver(stream)
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
