r"""Log observers: readable text or JSON lines, filtered by level.

Secrets never reach a log line because they are ``Secret`` objects (masked in repr) and
the access log leaves query strings out; these observers only format.

Every value a log line shows may come from outside (a caller id, a user agent, a path), so
the text form escapes, in one place (``text_line``), every control character of the
rendered message and its system: a newline is written ``\n``, an ESC ``\x1b``, any other
C0 or C1 control, DEL, a line or paragraph separator and a lone surrogate likewise; so no
value can start a forged line or drive the terminal that shows the log. A traceback keeps
its own lines, each indented with a tab as Twisted's classic format does, its controls
escaped too. The JSON form is valid JSON whatever the values: the encoder escapes C0
controls, and C1 controls, DEL, the separators and lone surrogates are escaped as
``\uXXXX`` too.

The JSON form is one flat object per line, for log shippers: ``time`` (ISO 8601, UTC),
``level``, ``namespace``, ``message`` (the rendered text) and the event's own fields.

A float an event carries is rendered with the digits a person reads (``for_people``: 0.81,
not 0.8127479001925022), whoever logged it (dpvoip, Twisted, a library); the JSON form
keeps the exact value in its field.
"""

from __future__ import annotations

import functools
import json
import math
import re
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
    formatTime,
)

from dpvoip.core.log_budget import for_people

#: What a log line must not carry raw: C0 controls, DEL, C1 controls, the Unicode line and
#: paragraph separators, lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_UNSAFE_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: After JSON encoding (C0 is escaped already): what is still raw, as \uXXXX.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` on one line, without terminal controls: see the module's doc."""
    return _UNSAFE.sub(_escape_one, text)


def _system(event: dict[str, Any]) -> str:
    system = event.get("log_system")
    if system is not None:
        return str(system)
    level = event.get("log_level")
    return f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"


def rounded(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with its floats as people read them (``for_people``), for rendering its
    message; the event itself when it carries none. Twisted's own fields (``log_*``: the
    time) are left alone."""
    changed = {key: for_people(value) for key, value in event.items()
               if isinstance(value, float) and not key.startswith("log_")}
    return {**event, **changed} if changed else event


#: The access log's line (``web.server``): one per request, so rendered here without
#: Twisted's general formatter, which costs a webhook more than its signature check.
ACCESS_FORMAT = "{client} {method} {path} {status} {sent}B {elapsed_ms:.1f}ms"


def _message(event: dict[str, Any]) -> str:
    """The event's rendered message (an access line directly, others by Twisted)."""
    if event.get("log_format") is ACCESS_FORMAT:
        try:
            return (f"{event['client']} {event['method']} {event['path']} {event['status']}"
                    f" {event['sent']}B {event['elapsed_ms']:.1f}ms")
        except (KeyError, TypeError, ValueError):
            pass  # not as web.server logs it: Twisted's formatter says what is wrong
    return formatEvent(rounded(event))


def _time_text(when: float | None) -> str:
    """``formatTime``'s text (to the second), made once a second rather than once a line."""
    return formatTime(when) if when is None else _second_text(math.floor(when))


@functools.lru_cache(maxsize=4)
def _second_text(second: int) -> str:
    return formatTime(second)


def text_line(event: dict[str, Any]) -> str | None:
    """Twisted's classic line (``time [system] message``), every value escaped, floats
    rounded for people; a traceback follows on its own lines, each indented with a tab."""
    message = _message(event)
    failure = event.get("log_failure")
    if not message and failure is None:
        return None
    line = (f"{_time_text(event.get('log_time'))} [{escape(_system(event))}] "
            f"{escape(message)}")
    if failure is not None:
        try:
            traceback = failure.getTraceback()
        except Exception:
            traceback = "(the traceback could not be formatted)"
        traceback = _UNSAFE_BUT_NEWLINE.sub(_escape_one, traceback.rstrip("\n"))
        line += "\n\t" + traceback.replace("\n", "\n\t")
    return line + "\n"


def json_line(event: dict[str, Any]) -> str:
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"),
        "message": _message(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in ("message", "format", "time", "system", "isError"):
            continue
        record.setdefault(key, value)
    text = json.dumps(record, default=str, ensure_ascii=False)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


def observer(format: str, level: str = "info", stream: IO[str] | None = None) -> ILogObserver:
    stream = stream or sys.stdout
    base: ILogObserver = (
        FileLogObserver(stream, json_line) if format == "json"
        else FileLogObserver(stream, text_line)
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
