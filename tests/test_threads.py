"""``fedq.threads``: one torch thread per job, the steps of a codec spread over threads, and the ordered,
bounded parallel map behind a sender's encoders and an aggregator's fold."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fedq.threads import cpu_workers, for_each_step, one_torch_thread, ordered_map


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


def test_cpu_workers_follow_the_callers_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu_workers() == 1
        torch.set_num_threads(8)
        assert 1 <= cpu_workers() <= 4
        assert cpu_workers(limit=1) == 1
        with one_torch_thread(workers=1):
            assert cpu_workers() == 1
    finally:
        torch.set_num_threads(before)


def test_one_torch_thread_is_the_calling_threads_own_and_is_restored() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    inside, done = threading.Event(), threading.Event()

    def other() -> None:
        torch.get_num_threads()  # this thread's count is set up before the scope opens
        inside.wait()
        seen.append(torch.get_num_threads())
        done.set()

    t = threading.Thread(target=other)
    t.start()
    try:
        time.sleep(0.05)
        with one_torch_thread():
            assert torch.get_num_threads() == 1
            assert cpu_workers() == min(2, cpu_workers(limit=2))  # the caller's allowance, not 1
            inside.set()
            done.wait(5)
        assert torch.get_num_threads() == 2
        assert seen == [2]
    finally:
        t.join()
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_every_step_runs_once_each_on_its_own_scratch(threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    # The bound as the steps see it: other tests leave this process at one torch thread, restored below.
    bound = min(threads, cpu_workers(limit=threads))
    done: list[tuple[int, int]] = []
    scratches: list[list[int]] = []

    def scratch() -> list[int]:
        scratches.append([])
        return scratches[-1]

    def step(s: list[int], lo: int, hi: int) -> None:
        assert torch.get_num_threads() == 1
        s.append(lo)
        done.append((lo, hi))
        time.sleep(0.001)

    try:
        for_each_step(step, scratch, 1001, 10, torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    assert sorted(done) == [(lo, min(lo + 10, 1001)) for lo in range(0, 1001, 10)]
    assert len(scratches) <= bound
    assert sorted(lo for s in scratches for lo in s) == list(range(0, 1001, 10))


def test_a_failing_step_stops_the_others_and_raises() -> None:
    done: list[int] = []

    def step(_: None, lo: int, hi: int) -> None:
        if lo == 50:
            raise ValueError("fifty")
        done.append(lo)
        time.sleep(0.001)

    with pytest.raises(ValueError, match="fifty"):
        for_each_step(step, lambda: None, 10_000, 10, torch.device("cpu"))
    assert len(done) < 100


def test_off_the_cpu_the_caller_runs_every_step() -> None:
    threads: set[int] = set()
    for_each_step(
        lambda _, lo, hi: threads.add(threading.get_ident()), lambda: None, 100, 10, torch.device("meta")
    )
    assert threads == {threading.get_ident()}
