"""Records replayed beyond the mark's prefix stay replayed: in this run and after a restart.

The replay applies records on several connections at once. When the database goes away
again, one lane's transaction may commit while another's fails: the committed records lie
beyond the first one that is not through. The mark keeps them (``replayed(up_to, ahead)``)
so that the next start does not apply them again (issue 14, point 5: "the next start does
not replay what was applied").
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from dpvoip.spool.journal import (
    MARK_NAME,
    MAX_AHEAD,
    Spool,
    SpoolCorrupt,
    decode_mark,
    encode_mark,
)
from test.test_spool import opened


def seqs(spool: Spool, limit: int | None = None) -> list[int]:
    return [seq for seq, _ in spool.pending(limit)]


def test_records_ahead_are_not_pending_in_this_run_nor_after_a_restart(
        tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"r%d" % i for i in range(1, 11)])
        spool.replayed(2, [4, 5, 8])
        assert seqs(spool) == [3, 6, 7, 9, 10]
        assert spool.state().pending == 5
    with opened(tmp_path) as spool:
        assert seqs(spool) == [3, 6, 7, 9, 10]
        assert spool.state().pending == 5
        assert spool.pending()[0] == (3, b"r3")


def test_filling_the_gap_moves_the_mark_over_the_records_ahead(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"r"] * 10)
        spool.replayed(2, [4, 5, 8])
        spool.replayed(3)
        assert seqs(spool) == [6, 7, 9, 10]
    mark = decode_mark((tmp_path / MARK_NAME).read_bytes())
    assert mark == (5, 11, frozenset({8}))
    with opened(tmp_path) as spool:
        spool.replayed(0, [6, 7])  # behind the mark, with new records ahead
        assert seqs(spool) == [9, 10]
        spool.replayed(10)
        assert seqs(spool) == []
        assert list(tmp_path.glob("*.seg")) == []  # all replayed: compacted
    # Nothing ahead any more: the short mark every earlier version reads.
    assert len((tmp_path / MARK_NAME).read_bytes()) == 24


def test_a_mark_with_only_records_ahead_left_compacts(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"r"] * 4)
        spool.replayed(0, [2, 3, 4])
        assert seqs(spool) == [1]
        spool.replayed(1)
        assert seqs(spool) == [] and spool.state().pending == 0
        assert list(tmp_path.glob("*.seg")) == []
        assert spool.append_many([b"next"]) == [5]


def test_a_limited_read_skips_records_ahead_rather_than_ending_early(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"r"] * 20)
        spool.replayed(0, list(range(1, 9)))  # the first eight are through, not the ninth
        assert seqs(spool, 4) == [9, 10, 11, 12]
        assert seqs(spool, 100) == list(range(9, 21))


def test_a_mark_from_before_records_ahead_is_still_read(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"r"] * 5)
    body = struct.pack(">4sQQ", b"DPSM", 2, 6)
    (tmp_path / MARK_NAME).write_bytes(body + struct.pack(">I", zlib.crc32(body)))
    with opened(tmp_path) as spool:
        assert seqs(spool) == [3, 4, 5]


@pytest.mark.parametrize("ahead, why", [
    ((2,), "a seq ahead at or behind the mark"),
    ((4, 4), "a seq twice"),
    ((5, 4), "out of order"),
    ((9,), "a seq ahead past the next seq"),
])
def test_a_mark_whose_records_ahead_contradict_it_is_refused(
        tmp_path: Path, ahead: tuple[int, ...], why: str) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"r"] * 5)
    body = struct.pack(f">4sQQI{len(ahead)}Q", b"DPSA", 2, 6, len(ahead), *ahead)
    (tmp_path / MARK_NAME).write_bytes(body + struct.pack(">I", zlib.crc32(body)))
    with pytest.raises(SpoolCorrupt, match="mark"):
        opened(tmp_path).__enter__()


def test_a_torn_mark_with_records_ahead_is_refused(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"r"] * 5)
        spool.replayed(1, [3])
    data = (tmp_path / MARK_NAME).read_bytes()
    (tmp_path / MARK_NAME).write_bytes(data[:-1])
    with pytest.raises(SpoolCorrupt, match="mark"):
        opened(tmp_path).__enter__()


def test_the_mark_stays_small_under_many_records_ahead(tmp_path: Path) -> None:
    """Beyond ``MAX_AHEAD`` the records are simply returned again (the ingest is
    idempotent): the mark never grows without bound."""
    total = MAX_AHEAD + 100
    with opened(tmp_path) as spool:
        spool.append_many([b"r"] * (total + 2))
        spool.replayed(0, list(range(2, total + 2)))
        assert seqs(spool, 3) == [1, MAX_AHEAD + 2, MAX_AHEAD + 3]
    assert len((tmp_path / MARK_NAME).read_bytes()) == 28 + 8 * MAX_AHEAD


def test_records_ahead_refused_past_what_was_appended(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        spool.append_many([b"r"] * 3)
        with pytest.raises(ValueError, match="nothing past 3"):
            spool.replayed(1, [2, 4])
        assert seqs(spool) == [1, 2, 3]


def test_encode_decode_round_trip() -> None:
    assert decode_mark(encode_mark(3, 10, (9, 5))) == (3, 10, frozenset({5, 9}))
    assert decode_mark(encode_mark(3, 10)) == (3, 10, frozenset())
