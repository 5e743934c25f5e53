"""What every connection dpvoip keeps up as a client shares (a Fritz!Box's CallMonitor,
an Asterisk's Manager Interface): a back-off that never gives up, and short TCP keepalive
timers so that a dead path is noticed in about 90 s instead of the kernel's two hours.
Its own module so that a PBX's client does not import the Fritz!Box's code.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import ISystemHandle, ITCPTransport

#: TCP keepalive: first probe after 60 s of silence, then every 10 s, dead after 3.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 10, 3


def keepalive(protocol: Any) -> None:
    """prepareConnection: short TCP keepalive timers on the connection's socket.

    ``protocol`` is what ``ClientService`` hands over (its proxy of the client's
    protocol). A transport that is not TCP (a test's ``StringTransport``) has no keepalive
    to set."""
    transport = protocol.transport
    if not ITCPTransport.providedBy(transport):
        return
    transport.setTcpKeepAlive(True)
    if not ISystemHandle.providedBy(transport):
        return
    handle = transport.getHandle()
    if not isinstance(handle, socket.socket):
        return
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE),
                          ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, option):  # Linux has all three; other systems some
            handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def retry_policy(initial: float = 1.0, cap: float = 60.0,
                 random: Callable[[], float] = random.random) -> Callable[[int], float]:
    """Exponential back-off that never gives up: ``initial`` doubled at each failure, never
    more than ``cap``. The jitter (a quarter of the delay, so that the boxes behind one
    router do not retry in step) is taken off the delay, never added: the cap is the
    cap."""

    def delay(attempt: int) -> float:  # ClientService counts failed attempts from 1
        base = min(initial * 2.0 ** (min(max(attempt, 1), 64) - 1), cap)
        return base * (0.75 + 0.25 * random())

    return delay
