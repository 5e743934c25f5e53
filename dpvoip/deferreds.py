"""The small Deferred tools every service shares: observers, a deadline, a shield.

Written once here so that no service keeps its own list of waiters, its own timer race or
its own cancellation relay (magic-wormhole's ``observer.py`` is the model: a thing that
fires once for everyone who asks, before or after it happened).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


def _relay(outcome: Any, to: Deferred[T]) -> None:
    """Give ``outcome`` (a result or a Failure) to ``to``."""
    if isinstance(outcome, Failure):
        to.errback(outcome)
    else:
        to.callback(outcome)


class OneShotObserver(Generic[T]):
    """Something that happens once (the schema prepared, the spool replayed): everyone who
    asks, before or after, gets a Deferred that fires with its result.

    A waiter's Deferred may be cancelled (the asker gave up): the later ``fire`` skips it.
    """

    def __init__(self) -> None:
        self._waiters: list[Deferred[T]] = []
        self._result: T | Failure | None = None
        self._fired = False

    @property
    def fired(self) -> bool:
        return self._fired

    def peek(self) -> T | None:
        """The result once fired successfully, else None (for synchronous readers such as a
        statement builder that needs the prepared schema's capabilities)."""
        result = self._result
        return None if not self._fired or isinstance(result, Failure) else result

    def when_fired(self) -> Deferred[T]:
        waiter: Deferred[T] = Deferred()
        if self._fired:
            _relay(self._result, waiter)
        else:
            self._waiters.append(waiter)
        return waiter

    def fire(self, result: T | Failure) -> None:
        """Fire every waiter, now and later (a second call is ignored: it happened once)."""
        if self._fired:
            return
        self._fired, self._result = True, result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:  # cancelled by its asker
                _relay(result, waiter)


class EmptyableSet(Generic[K]):
    """A set of things under way (requests, writes, connections) that tells who asks when
    it is empty (at shutdown: "wait for what is in flight")."""

    def __init__(self) -> None:
        self._items: set[K] = set()
        self._waiters: list[Deferred[None]] = []

    def add(self, item: K) -> None:
        self._items.add(item)

    def discard(self, item: K) -> None:
        """Forget ``item`` (if it is there); the set's waiters fire when it is empty."""
        self._items.discard(item)
        if not self._items:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.called:  # cancelled by its asker
                    waiter.callback(None)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __iter__(self) -> Iterator[K]:
        """A snapshot: the set may change while the caller goes through it."""
        return iter(list(self._items))

    def when_empty(self) -> Deferred[None]:
        if not self._items:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter


def shield(inner: Deferred[T]) -> Deferred[T]:
    """A Deferred with ``inner``'s result whose cancellation does not reach ``inner`` (a
    write, once started, is not rolled back because the client that caused it left)."""
    outer: Deferred[T] = Deferred()

    def relay(result: Any) -> None:
        if not outer.called:  # else the caller cancelled outer and is gone
            _relay(result, outer)

    inner.addBoth(relay)
    return outer


def within(clock: IReactorTime, work: Deferred[T], seconds: float, *,
           cancel_work: bool = False) -> Deferred[T]:
    """``work``'s result or failure, or ``TimeoutError`` after ``seconds``.

    By default ``work`` is left to finish (a commit in flight cannot be called back, and
    txpostgres logs a critical error when a query is cancelled through
    ``Deferred.addTimeout``); it is not cancelled when the returned Deferred is.

    ``cancel_work``: at the deadline, or when the returned Deferred is cancelled, ``work``
    is cancelled too (an HTTP exchange nobody waits for any more must not keep its
    connection). Unlike ``Deferred.addTimeout``, the deadline always gives
    ``TimeoutError``, whatever failure the cancelled ``work`` ends with.
    """

    def cancelled(_: Deferred[T]) -> None:
        if timer.active():
            timer.cancel()
        if cancel_work:
            work.cancel()

    result: Deferred[T] = Deferred(cancelled)

    def give_up() -> None:
        if not result.called:
            result.errback(defer.TimeoutError(f"nothing within {seconds:g} s"))
        if cancel_work:
            work.cancel()

    timer = clock.callLater(seconds, give_up)

    def settle(outcome: Any) -> None:
        if timer.active():
            timer.cancel()
        if not result.called:
            _relay(outcome, result)

    work.addBoth(settle)
    return result


def race(clock: IReactorTime, work: Deferred[T], seconds: float, fallback: T) -> Deferred[T]:
    """``work``'s result, or ``fallback`` after ``seconds`` or on failure (probes only);
    ``work`` is left to finish, as with ``within``."""
    return within(clock, work, seconds).addErrback(lambda _: fallback)
