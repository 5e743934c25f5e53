"""How long Zadarma's webhook journal is kept. Pure: the configuration checks each
provider's ``journal_days`` with it, the composition root asks it how long to keep.

The journal (``dpvoip.zadarma_event``, and the signed strings' owners in
``dpvoip.zadarma_binding``) is what a new event of a call is judged against (its earlier
events, the call its signed string belongs to). An event is only accepted while its
``call_start`` is within the freshness window (``guard.freshness``), so a call's events
are needed for that window (plus the clock skew allowed); the journal keeps them a day
longer, then they are pruned. A captured signature older than that is refused as stale
before the journal is read, so pruning its binding opens nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

#: Kept beyond the freshness window: a call's events straddle its end and the clocks of
#: Zadarma, PostgreSQL and dpvoip differ a little.
MARGIN_HOURS = 24.0


def shortest_journal_days(max_event_age_hours: float, max_event_ahead_minutes: float
                          ) -> float:
    """The fewest days a provider's events may be kept: while any event of their call can
    still be accepted, and a margin."""
    return (max_event_age_hours + max_event_ahead_minutes / 60 + MARGIN_HOURS) / 24


def journal_kept(days: Iterable[float]) -> timedelta | None:
    """How long the one journal of all Zadarma providers is kept, from each provider's
    ``journal_days``: the longest of them. None (never pruned) when one of them is 0 (kept
    for ever) or when no Zadarma provider is configured."""
    wanted = list(days)
    if not wanted or any(d == 0 for d in wanted):
        return None
    return timedelta(days=max(wanted))
