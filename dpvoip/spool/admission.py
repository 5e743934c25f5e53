"""Whether a new event may still go straight to the database, or is spooled at once.

An event sent to a database that is behind waits for a connection behind everything sent
before it. Near saturation that queue grew past the deadline: hundreds of events timed
out, were spooled, and were then written by the database all the same when their turn
came (the work done twice: once by the late attempt, once by the replay), which kept the
database behind and the replay starved. So an event is sent straight only while the wait
it would find is well within the deadline; otherwise it is spooled at once (answered at
once, without the caller's name), and the database spends its time on what it can still
commit in time, and on the replay.

The wait is estimated from the events that landed: each tells how long one event keeps a
connection (its latency, less the share of it spent waiting behind the ones in flight when
it was sent). Pure: the caller passes the times and counts.
"""

from __future__ import annotations

#: The share of the deadline a new event's estimated latency may take.
SHARE_OF_DEADLINE = 0.5
#: How much each landed event moves the estimate (an exponential moving average).
WEIGHT = 0.2


class Admission:
    """The estimate of one event's time on a connection, and the admission rule."""

    def __init__(self, deadline: float, connections: int,
                 share: float = SHARE_OF_DEADLINE, weight: float = WEIGHT) -> None:
        self._limit = deadline * share
        self._connections = max(1, connections)
        self._weight = weight
        self.service_seconds = 0.0  # nothing seen yet: everything is admitted

    def _queued(self, in_flight: int) -> float:
        """How many connection-turns a new event waits with ``in_flight`` ahead of it."""
        return max(0, in_flight + 1 - self._connections) / self._connections

    def landed(self, latency: float, ahead: int) -> None:
        """An event sent with ``ahead`` events in flight took ``latency`` seconds (a timed
        out one: at least the deadline)."""
        service = max(0.0, latency) / (1.0 + self._queued(ahead))
        if self.service_seconds == 0.0:
            self.service_seconds = service
        else:
            self.service_seconds += self._weight * (service - self.service_seconds)

    def expected_latency(self, in_flight: int) -> float:
        return self.service_seconds * (1.0 + self._queued(in_flight))

    def admits(self, in_flight: int) -> bool:
        """Whether a new event may go straight: always while a connection is free (so that
        the estimate is renewed after a slow spell), else while the wait it would find
        leaves it well within the deadline."""
        if in_flight < self._connections:
            return True
        return self.expected_latency(in_flight) <= self._limit
