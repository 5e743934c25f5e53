"""Waiting on the real reactor for something the test cannot be told about directly.

A test that runs real sockets sometimes has no event to wait on (the fake holds a
request, a connection closed on the other side): it polls. How long it polls is a hang
detector, never a speed requirement: a loaded machine may take many times the idle time,
and a test must then be slower, not fail. So the bound is a minute, well past anything
real, and below the trial ``timeout`` (120 s) of the tests that use it, so that a hang
fails here with a message instead of as a bare timeout.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater

#: How long ``until`` polls before it calls the condition hung.
HUNG_SECONDS = 60.0
#: How often it looks.
POLL_SECONDS = 0.01


async def until(check: Callable[[], object], seconds: float = HUNG_SECONDS) -> None:
    """Wait until ``check()`` is true, looking every ``POLL_SECONDS`` on the reactor;
    after ``seconds`` without it, fail: the thing waited for is not coming."""
    deadline = reactor.seconds() + seconds
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not reached within {seconds:g} s: hung")
        await deferLater(reactor, POLL_SECONDS, lambda: None)


async def settle(seconds: float = 0.1) -> None:
    """Let the reactor run a little, for a test that checks that something does *not*
    happen (a reply that should not come, a timer that should not fire).

    On a loaded machine the reactor may get less done in that while: the check may then
    miss a fault, but never fails a correct program, so there is no bound to raise."""
    await deferLater(reactor, seconds, lambda: None)
