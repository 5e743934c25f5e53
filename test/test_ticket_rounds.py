"""Which missed calls of a replayed group share a round of tickets (``first_round``):
plain data, no database."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.calls.ingest import first_round


class FirstRoundTests(SynchronousTestCase):
    def test_calls_of_different_numbers_share_a_round(self) -> None:
        self.assertEqual(first_round(["+301", "+302", "+303"]), 3)

    def test_a_round_stops_before_a_number_it_holds(self) -> None:
        """The second call of a number must see the first one's ticket: it and every
        call after it wait for the next round, in order."""
        self.assertEqual(first_round(["+301", "+302", "+301", "+303"]), 2)

    def test_withheld_callers_never_stop_a_round(self) -> None:
        self.assertEqual(first_round([None, "+301", None, "+302"]), 4)

    def test_a_round_takes_at_least_one_call(self) -> None:
        self.assertEqual(first_round(["+301", "+301"]), 1)
        self.assertEqual(first_round([]), 0)
