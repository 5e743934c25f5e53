"""A sliding-window rate limit per key: at most ``limit`` requests in any ``window`` seconds.

Used per CRM user (so a script or a stuck button cannot dial in a loop) and for dpvoip's own
Zadarma API budget (kept below Zadarma's 100 requests a minute, so dpvoip learns of a limit
before Zadarma answers 429). A sliding window, not fixed buckets: buckets let twice the limit
through around a bucket boundary.

Pure: the caller passes the time (a monotonic clock is best; see :class:`RateLimiter` for
what happens when it goes back).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable


class RateLimiter:
    """At most ``limit`` allowed ``take`` calls per key in any ``window_seconds``.

    A request made at ``t`` counts until ``t + window_seconds`` (exclusive): with the limit
    reached, the next one is allowed exactly a window after the oldest counted one.

    Memory stays bounded by the traffic of one window: each key keeps at most ``limit``
    times, and a key with nothing left in the window is forgotten. Keys are kept in the
    order of their last allowed request, so the forgotten ones are always at the front and
    each call forgets them in amortised constant time.

    Time never goes back for the limiter: an earlier ``now`` than already seen counts as the
    latest seen (nothing is let through early), unless it is earlier by more than a window,
    which means the clock was set back; then all counts are dropped (at worst one more
    ``limit`` per key gets through) rather than refusing everyone until the clock catches up.
    """

    def __init__(self, limit: int, window_seconds: float) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        if not (window_seconds > 0 and math.isfinite(window_seconds)):
            raise ValueError(f"window_seconds must be positive and finite, not {window_seconds}")
        self.limit = limit
        self.window = float(window_seconds)
        self._latest = -math.inf
        # Per key the times of its counted requests, oldest first; keys ordered by their
        # newest counted request, least recent first.
        self._times: OrderedDict[Hashable, deque[float]] = OrderedDict()

    def take(self, key: Hashable, now: float) -> float | None:
        """None if allowed (and counted); else the seconds until the next request would be
        allowed (> 0). A refused request is not counted: retrying does not prolong the wait."""
        times = self._current(key, self._advance(now))
        if len(times) < self.limit:
            times.append(self._latest)
            self._times[key] = times
            self._times.move_to_end(key)
            return None
        free_at = times[0] + self.window
        wait = free_at - now
        while now + wait < free_at:  # rounding: waiting ``wait`` must be enough
            wait = math.nextafter(wait, math.inf)
        return wait

    def remaining(self, key: Hashable, now: float) -> int:
        """How many requests ``key`` may still make now."""
        return self.limit - len(self._current(key, self._advance(now)))

    def tracked_keys(self) -> int:
        """Keys with a request counted in the window (as of the last take or remaining)."""
        return len(self._times)

    def _advance(self, now: float) -> float:
        """The limiter's time for a call at ``now``, after forgetting keys it leaves idle."""
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time, not {now}")
        if now < self._latest - self.window:
            self._times.clear()  # the clock was set back: the old times mean nothing now
            self._latest = now
        else:
            self._latest = max(self._latest, now)
        while self._times:
            key, times = next(iter(self._times.items()))
            if times and times[-1] + self.window > self._latest:
                break
            del self._times[key]
        return self._latest

    def _current(self, key: Hashable, now: float) -> deque[float]:
        """The times of ``key``'s requests still in the window at ``now`` (a new, untracked
        deque if none)."""
        times = self._times.get(key)
        if times is None:
            return deque()
        while times and times[0] + self.window <= now:
            times.popleft()
        return times
