"""Group commit (``dpvoip.calls.grouping``) with plain data: which items share a
transaction, when each is answered, and what a failed group does to its members."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from dpvoip.calls.grouping import CommitGroups


class Bad(Exception):
    pass


class Transactions:
    """The far side: records each transaction's items and finishes it when told."""

    def __init__(self) -> None:
        self.open: list[tuple[list[str], Deferred[Sequence[str]]]] = []
        self.seen: list[list[str]] = []

    def commit(self, items: Sequence[str]) -> Deferred[Sequence[str]]:
        done: Deferred[Sequence[str]] = Deferred()
        self.open.append((list(items), done))
        self.seen.append(list(items))
        return done

    def finish(self, n: int = 0) -> list[str]:
        """Commit the ``n``-th open transaction; each item's result is its name, upper."""
        items, done = self.open.pop(n)
        if any(item.startswith("bad") for item in items):
            done.errback(Bad(",".join(items)))
        else:
            done.callback([item.upper() for item in items])
        return items


def key(item: str) -> str:
    return item.split(":")[0]  # "s1:a" and "s1:b" share the signed string s1


class CommitGroupsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = Transactions()
        self.groups: CommitGroups[str, str] = CommitGroups(self.db.commit, key, most=3,
                                                           in_flight=1)
        self.answers: dict[str, list[object]] = {}

    def join(self, *items: str) -> None:
        for item in items:
            got: list[object] = []
            self.groups.join(item).addBoth(got.append)
            self.answers[item] = got

    def test_a_quiet_daemon_sends_each_event_at_once_alone(self) -> None:
        self.join("a")
        self.assertEqual(self.db.seen, [["a"]])
        self.assertEqual(self.answers["a"], [])  # not before its commit
        self.db.finish()
        self.assertEqual(self.answers["a"], ["A"])
        self.assertEqual((self.groups.in_flight, self.groups.waiting), (0, 0))

    def test_what_arrives_during_a_transaction_shares_the_next(self) -> None:
        self.join("a", "b", "c")
        self.assertEqual(self.db.seen, [["a"]])
        self.assertEqual(self.groups.waiting, 2)
        self.db.finish()
        self.assertEqual(self.db.seen, [["a"], ["b", "c"]])
        self.assertEqual((self.answers["a"], self.answers["b"]), (["A"], []))
        self.db.finish()
        self.assertEqual((self.answers["b"], self.answers["c"]), (["B"], ["C"]))
        self.assertEqual((self.groups.groups, self.groups.items), (2, 3))

    def test_a_group_holds_at_most_so_many(self) -> None:
        self.join("a", "b", "c", "d", "e")
        self.db.finish()
        self.assertEqual(self.db.seen[1], ["b", "c", "d"])
        self.db.finish()
        self.assertEqual(self.db.seen[2], ["e"])

    def test_two_uses_of_one_key_go_in_successive_groups_in_their_order(self) -> None:
        self.join("x", "s1:a", "s2:b", "s1:c", "s1:d", "s3:e")
        self.db.finish()
        self.assertEqual(self.db.seen[1], ["s1:a", "s2:b", "s3:e"])
        self.db.finish()
        self.assertEqual(self.db.seen[2], ["s1:c"])
        self.db.finish()
        self.assertEqual(self.db.seen[3], ["s1:d"])

    def test_several_transactions_at_once_up_to_the_limit(self) -> None:
        groups: CommitGroups[str, str] = CommitGroups(self.db.commit, key, in_flight=2)
        for item in "abcd":
            groups.join(item)
        self.assertEqual(self.db.seen, [["a"], ["b"]])
        self.db.finish(1)  # the second ends first: the waiting go at once, together
        self.assertEqual(self.db.seen[2], ["c", "d"])
        self.assertEqual(groups.in_flight, 2)

    def test_a_failed_group_is_tried_again_one_by_one(self) -> None:
        self.join("a", "b", "bad", "c")
        self.db.finish()
        self.db.finish()  # b, bad, c fail together
        self.assertEqual(self.db.seen[2:], [["b"]])  # then each alone, in order
        self.db.finish()
        self.assertEqual(self.answers["b"], ["B"])
        self.db.finish()
        [failure] = self.answers["bad"]
        self.assertIsInstance(failure.value, Bad)  # type: ignore[attr-defined]
        self.assertEqual(str(failure.value), "bad")  # type: ignore[attr-defined]
        self.db.finish()
        self.assertEqual(self.answers["c"], ["C"])
        self.assertEqual(self.db.seen[2:], [["b"], ["bad"], ["c"]])

    def test_what_arrives_while_a_failed_group_is_tried_again_waits_behind_it(self) -> None:
        self.join("a", "b", "bad")
        self.db.finish()
        self.db.finish()
        self.join("late")
        self.assertEqual(self.db.seen[2:], [["b"]])
        self.db.finish()
        self.db.finish()
        self.assertEqual(self.db.seen[2:], [["b"], ["bad"], ["late"]])

    def test_a_waiter_that_gives_up_does_not_stop_the_others(self) -> None:
        self.join("a")
        waiting = self.groups.join("b")
        waiting.addErrback(lambda _: None)
        waiting.cancel()  # the client hung up: its event is still committed
        self.join("c", "d")
        self.db.finish()
        self.assertEqual(self.db.seen[1], ["b", "c", "d"])
        self.db.finish()
        self.assertEqual((self.answers["c"], self.answers["d"]), (["C"], ["D"]))
        self.assertEqual((self.groups.in_flight, self.groups.waiting), (0, 0))
