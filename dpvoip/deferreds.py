"""The small Deferred tools every service shares: observers, a deadline, a shield.

Written once here so that no service keeps its own list of waiters, its own timer race or
its own cancellation relay (magic-wormhole's ``observer.py`` is the model: a thing that
fires once for everyone who asks, before or after it happened).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class OneShotObserver(Generic[T]):
    """Something that happens once (the schema prepared, the spool replayed): everyone who
    asks, before or after, gets a Deferred that fires with its result."""

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
        if self._fired:
            result = self._result
            return defer.fail(result) if isinstance(result, Failure) else defer.succeed(
                result)  # type: ignore[arg-type]
        waiter: Deferred[T] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def fire(self, result: T | Failure) -> None:
        """Fire every waiter, now and later (a second call is ignored: it happened once)."""
        if self._fired:
            return
        self._fired, self._result = True, result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


class EmptyableSet(Generic[K]):
    """A set of things under way (requests, writes) that tells who asks when it is empty."""

    def __init__(self) -> None:
        self._items: set[K] = set()
        self._waiters: list[Deferred[None]] = []

    def add(self, item: K) -> None:
        self._items.add(item)

    def discard(self, item: K) -> None:
        self._items.discard(item)
        if not self._items:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Any:
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
        if not outer.called:
            outer.errback(result) if isinstance(result, Failure) else outer.callback(result)

    inner.addBoth(relay)
    return outer


def within(clock: IReactorTime, work: Deferred[T], seconds: float) -> Deferred[T]:
    """``work``'s result or failure, or ``TimeoutError`` after ``seconds``; ``work`` itself
    is left to finish (a commit in flight cannot be called back, and txpostgres logs a
    critical error when a query is cancelled through ``Deferred.addTimeout``)."""
    result: Deferred[T] = Deferred()

    def give_up() -> None:
        if not result.called:
            result.errback(defer.TimeoutError(f"nothing within {seconds:g} s"))

    timer = clock.callLater(seconds, give_up)

    def settle(outcome: Any) -> None:
        if timer.active():
            timer.cancel()
        if not result.called:
            result.errback(outcome) if isinstance(outcome, Failure) else result.callback(
                outcome)

    work.addBoth(settle)
    return result


def race(clock: IReactorTime, work: Deferred[T], seconds: float, fallback: T) -> Deferred[T]:
    """``work``'s result, or ``fallback`` after ``seconds`` or on failure (probes only)."""
    return within(clock, work, seconds).addErrback(lambda _: fallback)


def settled(work: Deferred[Any]) -> Deferred[None]:
    """Fires with None once ``work`` has a result, whatever it is (for waiting on it)."""
    done: Deferred[None] = Deferred()
    work.addBoth(lambda _: done.callback(None))
    return done

