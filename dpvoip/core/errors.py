"""One line about an error, for logs and answers: its message's first line, else its type.

psycopg2, Twisted and OpenSSL put whole paragraphs (and sometimes the statement) in an
error's text; a log line or an HTTP answer wants the first line only.
"""

from __future__ import annotations


def summary(error: BaseException | str | None) -> str:
    """The first non-blank line of ``error``'s message, or its type's name when it has
    none (never an empty reason after "failed": pass the error, not its text, which may
    be empty). None, which a Twisted ``Failure``'s ``value`` is typed as allowing, says
    so."""
    if error is None:
        return "no reason given"
    text = error if isinstance(error, str) else str(error)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return "" if isinstance(error, str) else type(error).__name__
