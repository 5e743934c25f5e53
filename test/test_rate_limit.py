"""The sliding-window limiter: exactly ``limit`` requests per window and key, the next one
exactly a window after the oldest, refused requests not counted, keys independent, and the
memory held bounded by what the last window saw."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpvoip.core.rate_limit import RateLimiter


def test_the_limit_is_reached_and_freed_exactly_a_window_later() -> None:
    limiter = RateLimiter(3, 60.0)
    assert limiter.take("alice", 100.0) is None
    assert limiter.take("alice", 110.0) is None
    assert limiter.take("alice", 120.0) is None
    assert limiter.remaining("alice", 120.0) == 0
    # Full: the wait is until the oldest (100) leaves the window at 160.
    assert limiter.take("alice", 130.0) == pytest.approx(30.0)
    assert limiter.take("alice", 159.999) == pytest.approx(0.001)
    # Exactly a window after the oldest: allowed again, and then full until 170.
    assert limiter.take("alice", 160.0) is None
    assert limiter.take("alice", 160.0) == pytest.approx(10.0)
    assert limiter.remaining("alice", 170.0) == 1
    assert limiter.remaining("alice", 240.0) == 3


def test_refused_requests_are_not_counted() -> None:
    limiter = RateLimiter(2, 10.0)
    assert limiter.take("k", 0.0) is None
    assert limiter.take("k", 1.0) is None
    for tick in range(100):  # hammering while full does not push the window on
        assert limiter.take("k", 1.0 + tick * 0.05) is not None
    assert limiter.take("k", 10.0) is None
    assert limiter.take("k", 11.0) is None
    assert limiter.take("k", 11.5) == pytest.approx(8.5)


def test_keys_are_independent() -> None:
    limiter = RateLimiter(1, 60.0)
    assert limiter.take(1, 0.0) is None
    assert limiter.take(1, 1.0) == pytest.approx(59.0)
    assert limiter.take(2, 1.0) is None
    assert limiter.take(("zadarma", "api"), 1.0) is None
    assert limiter.remaining(1, 1.0) == 0
    assert limiter.remaining(3, 1.0) == 1


def test_remaining_does_not_count() -> None:
    limiter = RateLimiter(2, 60.0)
    for _ in range(5):
        assert limiter.remaining("k", 0.0) == 2
    assert limiter.tracked_keys() == 0


def test_the_wait_returned_is_always_enough() -> None:
    """Even where float rounding would make ``now + wait`` fall just short."""
    limiter = RateLimiter(1, 0.1)
    assert limiter.take("k", 0.2) is None
    now = 0.25
    wait = limiter.take("k", now)
    assert wait is not None
    assert wait > 0
    assert now + wait >= 0.2 + 0.1
    assert limiter.take("k", now + wait) is None


def test_idle_keys_are_forgotten() -> None:
    limiter = RateLimiter(5, 60.0)
    for user in range(1_000):
        limiter.take(user, float(user) / 100)  # 1000 users within 10 s
    assert limiter.tracked_keys() == 1_000
    # Users 0..900 made their only request at t <= 9: a window later, they are forgotten.
    limiter.take("late", 69.0)
    assert limiter.tracked_keys() == 99 + 1
    limiter.remaining("anyone", 1_000.0)
    assert limiter.tracked_keys() == 0


def test_memory_stays_bounded_by_one_window_of_traffic() -> None:
    """A day of a new key every second, each taking up to twice its limit."""
    limit, window = 3, 60.0
    limiter = RateLimiter(limit, window)
    largest = 0
    for second in range(86_400):
        now = float(second)
        for _ in range(2 * limit):
            limiter.take(f"user{second}", now)
        largest = max(largest, limiter.tracked_keys())
        stored = sum(len(times) for times in limiter._times.values())
        assert stored <= limit * limiter.tracked_keys()
    assert largest == window  # the keys of the last 60 seconds, never more


def test_time_going_back_a_little_lets_nothing_through_early() -> None:
    limiter = RateLimiter(1, 60.0)
    assert limiter.take("k", 100.0) is None
    wait = limiter.take("k", 90.0)  # the clock stepped back 10 s
    assert wait == pytest.approx(70.0)
    assert limiter.take("k", 159.0) is not None
    assert limiter.take("k", 160.0) is None


def test_time_set_back_by_more_than_a_window_starts_afresh() -> None:
    """Rather than refusing everyone until the clock has caught up again."""
    limiter = RateLimiter(1, 60.0)
    assert limiter.take("k", 10_000.0) is None
    assert limiter.take("k", 100.0) is None
    assert limiter.take("k", 101.0) == pytest.approx(59.0)


@pytest.mark.parametrize(("limit", "window"), [
    (0, 60.0), (-1, 60.0), (1, 0.0), (1, -1.0), (1, math.inf), (1, math.nan),
])
def test_a_meaningless_limit_is_refused(limit: int, window: float) -> None:
    with pytest.raises(ValueError):
        RateLimiter(limit, window)


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf])
def test_a_meaningless_time_is_refused(now: float) -> None:
    limiter = RateLimiter(1, 1.0)
    with pytest.raises(ValueError):
        limiter.take("k", now)
    with pytest.raises(ValueError):
        limiter.remaining("k", now)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

STEPS = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=30, allow_nan=False),  # time since the last request
        st.sampled_from("abc"),
    ),
    max_size=200,
)


@given(limit=st.integers(1, 5), window=st.floats(0.5, 60), steps=STEPS)
def test_never_more_than_limit_in_any_window_and_never_refused_without_cause(
    limit: int, window: float, steps: list[tuple[float, str]]
) -> None:
    limiter = RateLimiter(limit, window)
    allowed: dict[str, list[float]] = {key: [] for key in "abc"}
    now = 1_000.0
    for gap, key in steps:
        now += gap
        # A request at t counts until t + window, exclusive (as the limiter computes it).
        in_window = [t for t in allowed[key] if t + window > now]
        assert limiter.remaining(key, now) == limit - len(in_window)
        wait = limiter.take(key, now)
        if wait is None:
            assert len(in_window) < limit
            allowed[key].append(now)
        else:
            # Refused only when full, and told to wait until the oldest leaves the window.
            assert len(in_window) == limit
            assert wait > 0
            assert now + wait >= min(in_window) + window
            assert wait <= window + 4 * math.ulp(now + window)  # float rounding aside
        # Exactly the keys with a request in the window are remembered.
        active = sum(any(t + window > now for t in times) for times in allowed.values())
        assert limiter.tracked_keys() == active
    for times in allowed.values():
        for start in times:
            assert sum(start <= t < start + window for t in times) <= limit


@given(limit=st.integers(1, 5), window=st.floats(0.001, 60), steps=STEPS)
def test_waiting_the_answer_is_always_enough(
    limit: int, window: float, steps: list[tuple[float, str]]
) -> None:
    limiter = RateLimiter(limit, window)
    now = 0.0
    for gap, key in steps:
        now += gap
        wait = limiter.take(key, now)
        if wait is not None:
            now += wait
            assert limiter.take(key, now) is None
