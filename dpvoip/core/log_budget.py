"""How many warnings of one kind may be written per window, and how many were held back.

Pure: the time is passed in. A flood of one kind of trouble (a box sending garbage at line
rate, a full disk refusing every event) must not become a flood of log lines: the first
``per_window`` of a kind in a window are written, the rest are only counted, and the
first line written after that says how many were held back ("N more like this in the
last minute"). Nothing is lost from the record: the counters that the metrics show are
kept elsewhere and count every one.
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
