"""How fedq uses a process's cores: one torch thread per job, and as many jobs at once as the user allows.

A library runs inside the user's process with the user's settings. torch's intra-op threads (OpenMP) meet at
a barrier after every op and spin while they wait; on a busy machine (a training loop, a broker, other
processes) one descheduled thread stalls the others, and a codec's dozen small ops per cache-sized step fell
~100x (measured on 2 cores under 4 busy processes: nf4 encode 769 -> 10 M elem/s at 2 torch threads, 84 at
one). So every fedq kernel runs at one torch thread (``one_torch_thread``), and fedq spreads independent work
(a codec's steps, a sender's chunks, an aggregator's fold windows) over Python threads instead: torch releases
the GIL inside its kernels, and a thread that is descheduled delays only its own step. The user's torch
thread count stays the bound on how many cores fedq uses at once (``cpu_workers``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")
P = ParamSpec("P")

MAX_WORKERS = 4  # beyond this a 4 MiB step's work is too short to gain from more threads (and memory grows)


@functools.cache
def _cores() -> int:
    """The cores this process may run on, read once (a system call; codecs ask on every call)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_scope = threading.local()


def cpu_workers(limit: int = MAX_WORKERS) -> int:
    """Threads fedq may run CPU work on at once from the calling thread: the caller's torch thread count (the
    user's bound on the cores a library may use; inside ``one_torch_thread``, the count its scope allows), at
    most the cores this process may run on and ``limit``."""
    allowed = getattr(_scope, "workers", None)
    threads = torch.get_num_threads() if allowed is None else allowed
    return max(1, min(limit, _cores(), threads))


@contextlib.contextmanager
def one_torch_thread(workers: int | None = None) -> Iterator[None]:
    """Run the scope's torch ops at one intra-op thread, with ``cpu_workers()`` inside it bounded by
    ``workers`` (default: what it is outside the scope); restore both after.

    With torch's OpenMP backend the thread count is the calling thread's own (other threads keep theirs); a
    thread first started while the scope is open inherits it, which is why a scope spans one kernel or job.
    """
    outer = getattr(_scope, "workers", None)
    _scope.workers = cpu_workers() if workers is None else workers
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)
        _scope.workers = outer


def kernel(f: Callable[P, R]) -> Callable[P, R]:
    """``f`` (a codec's entry point) run in ``one_torch_thread``: its ops at one torch thread, its steps
    spread over as many threads as the caller's setting allows (``for_each_step``)."""

    @functools.wraps(f)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with one_torch_thread():
            return f(*args, **kwargs)

    return run


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _shared_pool() -> ThreadPoolExecutor:
    """One pool for every codec call in the process, so that a call does not pay for starting threads."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(MAX_WORKERS - 1, thread_name_prefix="fedq-kernel")
        return _pool


class _Steps:
    """[lo, hi) ranges handed out one at a time to whichever thread asks first; none after a failure."""

    def __init__(self, count: int, size: int) -> None:
        self._next, self._count, self._size = 0, count, size
        self._lock = threading.Lock()
        self.failed = False

    def take(self) -> tuple[int, int] | None:
        with self._lock:
            if self.failed or self._next >= self._count:
                return None
            lo = self._next
            self._next = min(lo + self._size, self._count)
            return lo, self._next


def for_each_step(
    step: Callable[[S, int, int], None],
    scratch: Callable[[], S],
    count: int,
    size: int,
    device: torch.device,
) -> None:
    """``step(s, lo, hi)`` for every [lo, hi) of at most ``size`` covering ``count``, each at one torch thread
    (call it from a ``kernel``, so that the ops around the steps run at one torch thread too).

    On the CPU up to ``cpu_workers()`` threads (the caller among them) take steps as they free up, each with
    its own ``scratch()``; steps must write disjoint outputs, and then the result does not depend on the
    number of threads. Elsewhere (a GPU queues kernels on one stream) the caller runs every step. The first
    exception is raised after every running step has finished.
    """
    steps = _Steps(count, size)
    workers = min(cpu_workers(), -(-count // size)) if device.type == "cpu" else 1

    def work() -> None:
        taken = steps.take()
        if taken is None:
            return
        s = scratch()
        with one_torch_thread(1):
            while taken is not None:
                try:
                    step(s, *taken)
                except BaseException:
                    steps.failed = True
                    raise
                taken = steps.take()

    helpers = [_shared_pool().submit(work) for _ in range(workers - 1)]
    try:
        work()
    finally:  # a helper not yet started is cancelled; the others are waited for
        errors = [h.exception() for h in helpers if not h.cancel()]
    for e in errors:
        if e is not None:
            raise e


def ordered_map(
    f: Callable[[T], R], items: Iterable[T], workers: int, name: str = "fedq"
) -> Generator[R, None, None]:
    """``map(f, items)`` with up to ``workers`` calls at once, each in its own thread at one torch thread.
    Results come in order and at most ``workers`` are computed ahead of the consumer, so memory stays
    bounded; an exception is raised where its result would have come, after the calls already started have
    finished."""

    def one(item: T) -> R:
        with one_torch_thread(1):
            return f(item)

    if workers <= 1:
        yield from map(one, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        pending: collections.deque[Future[R]] = collections.deque()
        for item in items:
            pending.append(pool.submit(one, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
