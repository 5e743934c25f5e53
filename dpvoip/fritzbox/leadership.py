"""Who reads a Fritz!Box: the lease state machine, pure (no I/O, no reactor, no clock).

Several dpvoip instances may share one PostgreSQL; each box must be read by exactly one
of them. The one that holds the box's advisory lock (``store.leases``) on its lease
connection leads the box. This module decides, from plain facts handed in with the time,
what an instance does with each box; ``fritzbox.service.BoxLeadership`` does it.

Roles of a box in this instance:

* ``STANDBY``: another instance leads it, or nobody yet; no connection to the box.
* ``LEADING``: this instance holds the lock and trusts it: it reads and records lines.
* ``LOST``: it led, but can no longer be sure it still holds the lock (its lease
  connection broke, or no heartbeat came back in time). It records nothing: the box's
  connection is paused (its lines wait, unread) until it is known whether the lock is
  still, or again, this instance's (then the held lines are read) or another's (then
  they are dropped with the connection).

Why a local deadline. A frozen leader (SIGSTOP, a stalled VM) does not know it was
frozen. Its session ends on the server ``idle_session_timeout`` after its last query
(``store.leases``), and only then can a standby take the lock. So the leader trusts its
lease only until ``lease_seconds`` after it *sent* its last heartbeat that was answered
(the server was idle from no earlier than that moment), and ``lease_seconds`` is shorter
than the server's timeout: when it wakes, the lease has run out before any other
instance could have taken the box, and the line it finds waiting is not read
(``may_read`` is asked on every line, not only on a timer).

Why a new leader settles first. A session can also end at once (``pg_terminate_backend``,
a restart): a standby may then take the lock before the old leader has noticed. A new
leader that takes over from another instance therefore starts reading only
``lease_seconds`` after it got the lock: by then the old leader's lease has run out,
whatever it noticed. Taking over from nobody, or from this same instance (a restart on
the same state folder, which allows one process), starts at once.

When PostgreSQL cannot be reached at all. An instance that led a box and finds the
database unreachable (its lease connection cannot connect) keeps reading the box into
its spool (issue 7: a single dpvoip must not lose the calls of a database outage). It
cannot know whether another instance reaches PostgreSQL meanwhile (a partition of its
own network): see docs/decisions.md for what then happens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum


class Role(Enum):
    STANDBY = "standby"
    LEADING = "leading"
    LOST = "lost"


class Prior(Enum):
    """Who held the box's lock before this instance took it (the term the leader writes
    when it takes the lock, ``store.leases``)."""

    NOBODY = "nobody"  # no term written yet: the first leader ever
    SAME_TERM = "same term"  # this instance's own current term: nobody led in between
    THIS_INSTANCE = "this instance"  # an older term of this instance (a restart)
    OTHER = "other"  # another instance


@dataclass(frozen=True)
class LeaseRules:
    """The lease's timing (seconds). ``lease_seconds`` must stay below the server's
    ``idle_session_timeout`` (``store.leases.IDLE_SESSION_TIMEOUT``)."""

    lease_seconds: float = 4.0
    heartbeat_seconds: float = 1.0  # also how often a standby asks for the lock

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_seconds < self.lease_seconds:
            raise ValueError("the heartbeat must come more often than the lease runs out")


# -- what to do: plain data ----------------------------------------------------------------


@dataclass(frozen=True)
class Lead:
    """Begin reading ``box``, ``after`` seconds from now (0: at once)."""

    box: str
    after: float


@dataclass(frozen=True)
class Hold:
    """Stop recording ``box``'s lines; keep the connection with its lines unread."""

    box: str
    why: str


@dataclass(frozen=True)
class Resume:
    """Read the held lines of ``box`` and go on reading."""

    box: str
    why: str


@dataclass(frozen=True)
class Drop:
    """Stop reading ``box``: drop its connection and whatever it held unread."""

    box: str
    why: str


Action = Lead | Hold | Resume | Drop


@dataclass
class BoxLease:
    """One box as this instance sees it (read by ``/readyz``, ``/metrics``)."""

    name: str
    role: Role = Role.STANDBY
    locked: bool = False  # the lock is held by the current lease session
    leader: str | None = None  # who leads it, as last seen ("" when nobody did)
    since: float | None = None  # when this instance began leading it
    leads: int = 0  # how often this instance began leading it
    takeovers: int = 0  # ... of those, from another instance
    losses: int = 0  # how often it stopped trusting its lead


@dataclass
class Leadership:
    """The boxes of one instance and its one lease: decisions from facts.

    Each input takes ``now`` (seconds, the caller's clock) and returns the actions to
    carry out, in order. Nothing here reads a clock or touches a socket.
    """

    instance: str
    boxes: Iterable[str]
    rules: LeaseRules = field(default_factory=LeaseRules)

    def __post_init__(self) -> None:
        self.lease: dict[str, BoxLease] = {name: BoxLease(name) for name in self.boxes}
        self.deadline: float | None = None  # the lease is trusted until then
        self.unreachable = False  # the database cannot be reached at all

    # -- questions ---------------------------------------------------------------------

    def may_read(self, box: str, now: float) -> bool:
        """Whether a line of ``box`` may be recorded now: asked on every line."""
        lease = self.lease[box]
        if lease.role is not Role.LEADING:
            return False
        return self.unreachable or (self.deadline is not None and now < self.deadline)

    def to_try(self) -> list[str]:
        """The boxes whose lock this instance asks for at its next heartbeat."""
        return [name for name, lease in self.lease.items() if not lease.locked]

    def leads(self, box: str) -> bool:
        return self.lease[box].role is Role.LEADING

    # -- facts ---------------------------------------------------------------------------

    def answered(self, sent_at: float, now: float, granted: Mapping[str, Prior],
                 refused: Mapping[str, str | None]) -> list[Action]:
        """A heartbeat sent at ``sent_at`` was answered: the session held its locks then.
        ``granted``: boxes whose lock it got now (with who held it before); ``refused``:
        boxes whose lock another session holds (with that session's name, if known)."""
        self.unreachable = False
        self.deadline = max(self.deadline or sent_at, sent_at + self.rules.lease_seconds)
        actions: list[Action] = []
        for name, prior in granted.items():
            actions += self._granted(self.lease[name], prior, now)
        for name, holder in refused.items():
            lease = self.lease[name]
            lease.leader = holder if holder is not None else ""
            if lease.role is not Role.STANDBY:
                actions.append(self._step_down(lease, f"{holder or 'another instance'}"
                                                      " leads it now"))
        for lease in self.lease.values():  # a late heartbeat came back: trusted again
            if (lease.role is Role.LOST and lease.locked and now < self.deadline
                    and lease.name not in granted):
                lease.role = Role.LEADING
                actions.append(Resume(lease.name, "the lease is confirmed again"))
        return actions + self.tick(now)  # an answer that came too late trusts nothing

    def _granted(self, lease: BoxLease, prior: Prior, now: float) -> list[Action]:
        if lease.role is not Role.STANDBY and prior is Prior.SAME_TERM:
            lease.locked = True
            lease.leader = self.instance
            if lease.role is Role.LEADING:  # read on through an outage: nobody else did
                return []
            lease.role = Role.LEADING
            return [Resume(lease.name, "the lock is this instance's again; nobody led"
                                       " in between")]
        actions: list[Action] = []
        if lease.role is not Role.STANDBY:  # another led in between: start afresh
            actions.append(self._step_down(lease, "another instance led it meanwhile"))
        lease.role = Role.LEADING
        lease.locked = True
        lease.leader = self.instance
        lease.since = now
        lease.leads += 1
        lease.takeovers += prior is Prior.OTHER
        settle = self.rules.lease_seconds if prior is Prior.OTHER else 0.0
        actions.append(Lead(lease.name, settle))
        return actions

    def _step_down(self, lease: BoxLease, why: str) -> Drop:
        if lease.role is Role.LEADING:
            lease.losses += 1
        lease.role = Role.STANDBY
        lease.locked = False
        lease.since = None
        return Drop(lease.name, why)

    def failed(self, now: float, why: str) -> list[Action]:
        """The lease connection broke (or a heartbeat failed): every lock it held is
        gone with its session, so every box it led is held until it is known who leads.
        (The database was reachable: there was a session to lose.)"""
        self.deadline = None
        self.unreachable = False
        actions: list[Action] = []
        for lease in self.lease.values():
            lease.locked = False
            if lease.role is Role.LEADING:
                actions.append(self._hold(lease, why))
        return actions

    def cannot_connect(self, now: float) -> list[Action]:
        """The lease connection cannot be made: PostgreSQL is unreachable from here.
        The boxes this instance led are read again, into its spool (see the module)."""
        self.unreachable = True
        actions: list[Action] = []
        for lease in self.lease.values():
            lease.locked = False
            if lease.role is Role.LOST:
                lease.role = Role.LEADING
                actions.append(Resume(lease.name, "the database is unreachable: reading"
                                                  " on into the spool"))
        return actions

    def tick(self, now: float) -> list[Action]:
        """Time passes: a lease not confirmed in time is no longer trusted."""
        if self.unreachable or self.deadline is None or now < self.deadline:
            return []
        return [self._hold(lease, "no heartbeat answered in time")
                for lease in self.lease.values() if lease.role is Role.LEADING]

    def _hold(self, lease: BoxLease, why: str) -> Hold:
        lease.role = Role.LOST
        lease.losses += 1
        return Hold(lease.name, why)

    def stopping(self) -> list[Action]:
        """The instance stops: every box is dropped (before its lock is released)."""
        return [self._step_down(lease, "dpvoip is stopping")
                for lease in self.lease.values() if lease.role is not Role.STANDBY]
