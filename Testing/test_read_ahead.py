"""The read-ahead thread (read_ahead.py) that inflates a .nii.gz while the image is filled."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from MedSegUNetLib.imageio.read_ahead import ReadAhead


def test_pieces_come_in_order_and_all_of_them():
    pieces = [bytes([n]) * (n + 1) for n in range(200)]
    with ReadAhead(iter(pieces), limit=50) as ahead:
        assert list(ahead) == pieces


def test_the_source_never_runs_more_than_the_limit_ahead():
    """The producer holds at most ``limit`` bytes beyond the piece the consumer is on (plus the one it
    is making): with 10-byte pieces and a limit of 30, never more than 5 pieces past the consumer."""
    made = []
    gaps = []

    def source():
        for n in range(100):
            made.append(n)
            yield bytes(10)

    with ReadAhead(source(), limit=30) as ahead:
        for taken, _ in enumerate(ahead, start=1):
            time.sleep(0.002)  # a slow consumer: the producer runs into the limit
            gaps.append(len(made) - taken)
    assert len(gaps) == 100
    assert max(gaps) <= 5
    assert max(gaps) >= 2  # it did run ahead


def test_a_limit_of_zero_still_moves_one_piece_at_a_time():
    with ReadAhead(iter([b"a", b"bc", b"def"]), limit=0) as ahead:
        assert list(ahead) == [b"a", b"bc", b"def"]


def test_the_source_error_is_raised_where_the_consumer_reads_after_the_pieces_before_it():
    def source():
        yield b"first"
        yield b"second"
        raise ValueError("corrupt stream")

    got = []
    with ReadAhead(source(), limit=1 << 20) as ahead:
        with pytest.raises(ValueError, match="corrupt stream"):
            for piece in ahead:
                got.append(piece)
    assert got == [b"first", b"second"]


def test_close_stops_an_endless_source_that_waits_on_the_limit():
    """A consumer that stops early (a header it does not accept) closes: the thread ends at once
    instead of inflating the rest, and nothing is left running."""
    before = threading.active_count()
    ahead = ReadAhead((bytes(1000) for _ in itertools.count()), limit=4000)
    assert next(iter(ahead)) == bytes(1000)
    ahead.close()
    assert threading.active_count() == before
