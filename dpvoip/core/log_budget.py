"""How many warnings of one kind may be written per window, and how many were held back;
a connection's outage told calmly; numbers as people read them.

Pure: the time is passed in. A flood of one kind of trouble (a box sending garbage at line
rate, a full disk refusing every event) must not become a flood of log lines: the first
``per_window`` of a kind in a window are written, the rest are only counted, and the
first line written after that says how many were held back ("N more like this in the
last minute"). Nothing is lost from the record: the counters that the metrics show are
kept elsewhere and count every one.

``Outage`` applies the same idea to a connection that keeps failing (a Fritz!Box that is
off, a wrong host name): the first failure of each kind (name not found, refused, timed
out, unreachable) is told at once, a repeated one at most once a window with how many
attempts failed since, and the attempt that connects again is told with how long it was
out. ``seconds_text`` and ``for_people`` keep floats such as 0.8127479001925022 out of log
lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Kind:
    window_start: float
    written: int = 0
    held: int = 0  # held back since the last line written of this kind


@dataclass
class LogBudget:
    """``allow(kind, now)`` says whether to write a line of ``kind`` now, and how many of
    that kind were held back before it (to be said in the line written)."""

    per_window: int = 10
    window: float = 60.0
    held_total: int = 0
    _kinds: dict[str, _Kind] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.per_window < 1 or self.window <= 0:
            raise ValueError("a log budget needs at least one line per positive window")

    def allow(self, kind: str, now: float) -> tuple[bool, int]:
        """(write it?, held back before it). When the answer is to write, the count of
        lines held back is handed over once and starts again from zero."""
        state = self._kinds.get(kind)
        if state is None or now - state.window_start >= self.window or now < state.window_start:
            held = state.held if state is not None else 0
            self._kinds[kind] = _Kind(now, written=1)
            return True, held
        if state.written < self.per_window:
            state.written += 1
            held, state.held = state.held, 0
            return True, held
        state.held += 1
        self.held_total += 1
        return False, 0

    def pending(self, kind: str) -> int:
        """Lines of ``kind`` held back and not yet reported."""
        state = self._kinds.get(kind)
        return state.held if state is not None else 0


def more_like_this(held: int, window: float = 60.0) -> str:
    """The words a line carries after lines of its kind were held back ("" when none)."""
    if not held:
        return ""
    span = "minute" if window == 60.0 else f"{window:g} s"
    return f" ({held} more like this in the last {span})"


@dataclass(frozen=True)
class Failing:
    """A failed attempt to tell: ``first`` of its kind in this outage, else how many
    attempts of its kind failed since its last line (``unsaid``, this one included) over
    how many seconds (``span``)."""

    first: bool
    unsaid: int = 0
    span: float = 0.0


@dataclass(frozen=True)
class Recovered:
    """An outage over: ``attempts`` failed over ``lasted`` seconds, the last of ``kind``."""

    attempts: int
    lasted: float
    kind: str


@dataclass
class Outage:
    """The failed attempts of one connection until it works again: which to tell (a
    ``Failing``) and which only to count (None). A kind of failure is told at once the
    first time in an outage, then at most once per ``window``; a change of kind is told at
    once too. Pure: the time is passed in."""

    window: float = 60.0
    attempts: int = 0  # failed attempts since the connection last worked
    began: float | None = None  # when the first of them failed
    kind: str = ""  # the kind of the last one
    _said: dict[str, tuple[float, int]] = field(default_factory=dict)  # kind: (at, unsaid)

    def failed(self, kind: str, now: float) -> Failing | None:
        """An attempt failed with ``kind`` at ``now``: a ``Failing`` to tell, or None."""
        self.attempts += 1
        if self.began is None:
            self.began = now
        self.kind = kind
        said = self._said.get(kind)
        if said is None:
            self._said[kind] = (now, 0)
            return Failing(first=True)
        at, unsaid = said
        unsaid += 1
        if at <= now < at + self.window:
            self._said[kind] = (at, unsaid)
            return None
        self._said[kind] = (now, 0)
        return Failing(first=False, unsaid=unsaid, span=max(now - at, 0.0))

    def ended(self, now: float) -> Recovered | None:
        """The connection works again: what the outage was (None when there was none);
        the next failure starts a new outage, told at once."""
        if not self.attempts or self.began is None:
            return None
        over = Recovered(self.attempts, max(now - self.began, 0.0), self.kind)
        self.attempts, self.began, self.kind = 0, None, ""
        self._said.clear()
        return over


def seconds_text(seconds: float) -> str:
    """A duration as people say it: ``0.8 s``, ``12 s``, ``3 min``, ``2.5 h``."""
    if seconds < 10:
        return f"{seconds:.1f}".removesuffix(".0") + " s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f}".removesuffix(".0") + " h"


def for_people(value: float) -> float | int:
    """``value`` with the digits a person reads: two significant ones below 10
    (0.8127479001925022 is 0.81), one decimal below 100, none above; an integral value
    stays as it is written (``60.0``)."""
    if value != value or value in (float("inf"), float("-inf")) or value == int(value):
        return value
    size = abs(value)
    if size >= 100:
        return round(value)
    if size >= 10:
        return round(value, 1)
    return float(f"{value:.2g}")
