"""The statements a test's code sends to PostgreSQL, as texts: the round trips a hot path
costs (each execute on a cursor is one message to the server and its answer)."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from txpostgres.txpostgres import Cursor


def statements_sent(test: SynchronousTestCase) -> list[str]:
    """From now on (until ``test`` ends), the text of every execute on any connection."""
    sent: list[str] = []
    execute = Cursor.execute

    def counted(cursor: Cursor, query: str, params: Any = None) -> Any:
        sent.append(query)
        return execute(cursor, query, params)

    test.patch(Cursor, "execute", counted)
    return sent


def messages(sent: list[str]) -> list[str]:
    """The messages of ``sent`` that write or read (a connection's PREPAREs left out)."""
    return [text for text in sent if "PREPARE " not in text]


def told_runs(sent: list[str]) -> list[int]:
    """How many statements each told message of ``sent`` held (``Batch.run_told``)."""
    return [text.count("EXECUTE") for text in messages(sent) if "dpvoip.told" in text]
