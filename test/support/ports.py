"""A loopback TCP port a test keeps from its first listen to its end, even while it is
closed (connections refused) between two listens.

A fake Fritz!Box that "reboots" must refuse connections for a while and then listen
again on the same port, since the daemon under test is configured with that port. Closing
the listening socket and binding the port number again later races with every other
process on the machine: another test run's ``listen(0)`` may be handed the port in
between, and the fake then fails to listen (or the daemon talks to a stranger).

So the port is never released: a *reservation* socket is bound to it (``SO_REUSEPORT``,
never listening) for as long as the test runs. Each listen is a new socket bound to the
same port with ``SO_REUSEPORT`` as well, handed to the reactor with ``adoptStreamPort``;
closing it leaves only the reservation, which does not listen, so the kernel refuses
connections (RST) exactly as for a closed port. Nobody else can bind the port meanwhile:
binding it needs ``SO_REUSEPORT`` and the same user, and Twisted's ``listenTCP`` never
sets it. The kernel does not pick a bound port as the source port of an outgoing
connection either, so the daemon can never connect to itself through it.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory

LOOPBACK = "127.0.0.1"


class HeldPort:
    """One loopback port, held until ``close()``; ``listen()`` serves it, any number of
    times, one listener at a time."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.host = host
        self._reservation = _reusable_socket()
        self._reservation.bind((host, 0))
        self.port: int = self._reservation.getsockname()[1]

    def listen(self, reactor: Any, factory: Factory, backlog: int = 50) -> IListeningPort:
        """Listen on the held port: the reactor's ``IListeningPort`` (stop it to refuse
        connections again)."""
        listening = _reusable_socket()
        try:
            listening.bind((self.host, self.port))
            listening.listen(backlog)
            listening.setblocking(False)
            port: IListeningPort = reactor.adoptStreamPort(
                listening.fileno(), socket.AF_INET, factory)
        finally:
            listening.close()  # the reactor holds its own duplicate of the descriptor
        return port

    def close(self) -> None:
        """Give the port back (at the end of the test)."""
        self._reservation.close()


class HeldPortReactor:
    """The real reactor, except that ``listenTCP`` listens on ``held`` (for code that
    listens through a reactor, such as the Fritz!Box simulator): the first listen asks for
    port 0 or the held port, later ones for the held port again."""

    def __init__(self, reactor: Any, held: HeldPort) -> None:
        self._reactor = reactor
        self.held = held

    def listenTCP(self, port: int, factory: Factory, backlog: int = 50,
                  interface: str = LOOPBACK) -> IListeningPort:
        if port not in (0, self.held.port) or interface != self.held.host:
            raise ValueError(f"only {self.held.host}:{self.held.port} is held, not "
                             f"{interface}:{port}")
        return self.held.listen(self._reactor, factory, backlog)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def _reusable_socket() -> socket.socket:
    made = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    made.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return made
