"""Group commit: the events that arrive while transactions are in flight share the next.

Most of what one webhook costs the daemon is not its own logic but the plumbing of each
statement (the driver, the reactor, the kernel's sends): a transaction of many events costs
about what one costs. So at most ``in_flight`` transactions run at once; what arrives
meanwhile waits and goes, all together, into the next one. Each item is answered only
when its transaction has committed. A quiet daemon sends each event alone at once: the
grouping costs nothing when nobody waits.

Two items that must not share a transaction (``apart`` gives the same key: a signed string
used twice must be judged against the first use, committed) go into successive groups, in
their order. A group that fails is tried again one item at a time, so that one item's
failure is its own and not its neighbours'.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

Item = TypeVar("Item")
Result = TypeVar("Result")

#: The most items in one transaction: a group's statements stay short, and one slow group
#: holds few answers back.
MOST_PER_GROUP = 64
#: Transactions at once: enough that a slow one (a lock another instance holds) does not
#: hold up the rest, few enough that the events that arrive meanwhile share the next. Two
#: rather than three: bigger groups, so fewer statements per event, cost the daemon less
#: CPU per webhook and shortened the tail at 300 webhooks/s (bench.zadarma); one lets a
#: slow transaction hold every answer back.
IN_FLIGHT = 2


class CommitGroups(Generic[Item, Result]):
    """Runs ``commit(items)`` (one transaction; a result per item, in order) for groups of
    the items given to ``join``."""

    def __init__(self, commit: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
                 apart: Callable[[Item], Hashable], most: int = MOST_PER_GROUP,
                 in_flight: int = IN_FLIGHT) -> None:
        self._commit = commit
        self._apart = apart
        self._most = most
        self._limit = in_flight
        self._waiting: deque[_Waiting[Item, Result]] = deque()
        self.in_flight = 0
        self.groups = 0  # transactions run (a retry alone counts too)
        self.items = 0  # items committed or failed in them

    def join(self, item: Item) -> Deferred[Result]:
        """``item``'s result, once the transaction it went into has committed."""
        answer: Deferred[Result] = Deferred()
        self._waiting.append(_Waiting(item, answer))
        self._start()
        return answer

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _start(self) -> None:
        while self._waiting and self.in_flight < self._limit:
            self._run(self._next_group())

    def _next_group(self) -> list[_Waiting[Item, Result]]:
        """The waiting items in order, up to ``most``, leaving for later any whose key an
        earlier one of the group has (and, to keep their order, every later one with that
        key); an item to be tried alone goes alone."""
        if self._waiting[0].alone:
            return [self._waiting.popleft()]
        group: list[_Waiting[Item, Result]] = []
        keys: set[Hashable] = set()
        held: list[_Waiting[Item, Result]] = []
        while self._waiting and len(group) < self._most and not self._waiting[0].alone:
            entry = self._waiting.popleft()
            key = self._apart(entry.item)
            if key in keys:
                held.append(entry)
                continue
            keys.add(key)
            group.append(entry)
        self._waiting.extendleft(reversed(held))
        return group

    def _run(self, group: list[_Waiting[Item, Result]]) -> None:
        self.in_flight += 1
        self.groups += 1
        self.items += len(group)
        attempt = Deferred.fromCoroutine(self._committed([entry.item for entry in group]))

        def answer(results: Sequence[Result] | Failure) -> None:
            self.in_flight -= 1
            if isinstance(results, Failure):
                if len(group) == 1:
                    group[0].answer.errback(results)
                else:  # one item may be to blame: each alone, first, to its own answer
                    self._waiting.extendleft(
                        _Waiting(entry.item, entry.answer, alone=True)
                        for entry in reversed(group))
            else:
                for entry, result in zip(group, results, strict=True):
                    entry.answer.callback(result)
            self._start()

        attempt.addBoth(answer)

    async def _committed(self, items: list[Item]) -> Sequence[Result]:
        return await self._commit(items)


@dataclass(frozen=True)
class _Waiting(Generic[Item, Result]):
    item: Item
    answer: Deferred[Result]
    alone: bool = False  # its group failed: tried again on its own
