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
