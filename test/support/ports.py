"""A loopback TCP port a test keeps from its first listen to its end, even while it is
closed (connections refused) between two listens.

A fake that "reboots" must refuse connections for a while and then listen again on the
same port; releasing the port and binding it again races with every other process on the
machine. The simulator's ``HeldPort`` (``dpvoip.testing.fritzbox``) holds a port with a
never-listening reservation socket; the tests use it for their own fakes too.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory

from dpvoip.testing.fritzbox import HeldPort as _SimulatorPort

LOOPBACK = "127.0.0.1"


class HeldPort(_SimulatorPort):
    """One loopback port, held until ``close()``; ``listen()`` serves it, any number of
    times, one listener at a time."""

    def __init__(self, host: str = LOOPBACK) -> None:
        super().__init__(host)

    def close(self) -> None:
        """Give the port back (at the end of the test)."""
        self.release()


class HeldPortReactor:
    """The real reactor, except that ``listenTCP`` listens on ``held`` (for code that
    listens through a reactor): the first listen asks for port 0 or the held port, later
    ones for the held port again."""

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
