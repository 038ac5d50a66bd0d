"""``fedq.threads``: the ordered, bounded parallel map behind a sender's encoders and an aggregator's fold."""

from __future__ import annotations

import threading
import time

import pytest

from fedq.threads import ordered_map, spare_cores


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_results_come_in_order_whatever_finishes_first(workers: int) -> None:
    def slow_for_small(i: int) -> int:
        time.sleep(0.002 * (10 - i % 10))
        return i * i

    assert list(ordered_map(slow_for_small, range(40), workers)) == [i * i for i in range(40)]


def test_calls_run_at_once_and_never_more_than_workers_ahead() -> None:
    lock = threading.Lock()
    running, most, pulled = 0, 0, 0

    def items() -> object:
        nonlocal pulled
        for i in range(30):
            pulled += 1
            yield i

    def f(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01)
        with lock:
            running -= 1
        return i

    for consumed, got in enumerate(ordered_map(f, items(), 3), start=1):
        assert got == consumed - 1
        assert pulled - consumed <= 3  # bounded look-ahead: memory stays bounded
    assert most == 3


def test_an_exception_comes_out_where_its_result_would() -> None:
    def f(i: int) -> int:
        if i == 7:
            raise ValueError("seven")
        return i

    got = []
    with pytest.raises(ValueError, match="seven"):
        for x in ordered_map(f, range(20), 3):
            got.append(x)
    assert got == list(range(7))


def test_spare_cores_is_at_least_one_and_at_most_the_limit() -> None:
    assert 1 <= spare_cores() <= 4
    assert spare_cores(limit=1) == 1
