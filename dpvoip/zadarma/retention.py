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
#: ``[zadarma] journal_days`` when not set.
DEFAULT_JOURNAL_DAYS = 90.0


def shortest_journal_days(max_event_age_hours: float, max_event_ahead_minutes: float
                          ) -> float:
    """The fewest days a provider's events may be kept: while any event of their call can
    still be accepted, and a margin."""
    return (max_event_age_hours + max_event_ahead_minutes / 60 + MARGIN_HOURS) / 24


def kept_days(journal_days: float, max_event_age_hours: float,
              max_event_ahead_minutes: float) -> float:
    """A provider's ``journal_days`` as kept: never shorter than its freshness window
    needs (a configuration from before the setting, with a freshness window of a year,
    keeps its journal for that year and a day); 0 stays 0 (for ever)."""
    if journal_days == 0:
        return 0.0
    return max(journal_days, shortest_journal_days(max_event_age_hours,
                                                   max_event_ahead_minutes))


def journal_kept(days: Iterable[float]) -> timedelta | None:
    """How long the one journal of all Zadarma providers is kept, from each provider's
    ``journal_days``: the longest of them. None (never pruned) when one of them is 0 (kept
    for ever) or when no Zadarma provider is configured."""
    wanted = list(days)
    if not wanted or any(d == 0 for d in wanted):
        return None
    return timedelta(days=max(wanted))
