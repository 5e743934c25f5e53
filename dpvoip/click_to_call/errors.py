"""The one failure of the click-to-call services that is not a decision: the CRM's
database did not answer. The web answers it with 503 (try again shortly) without knowing
which driver said what."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from dpvoip.core.errors import summary
from dpvoip.store.database import is_database_error

T = TypeVar("T")


class DatabaseUnreachable(Exception):
    """The CRM's database is down or refused a statement: nothing was decided."""


async def from_database(work: Awaitable[T]) -> T:
    """``work``'s result; a database failure comes out as ``DatabaseUnreachable`` (any
    other error as it is)."""
    try:
        return await work
    except Exception as error:
        if is_database_error(error):
            raise DatabaseUnreachable(summary(error)) from error
        raise
