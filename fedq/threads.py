"""Chunk-level threads for the CPU-heavy loops: a sender's encode, an aggregator's fold.

torch releases the GIL inside its kernels, so Python threads that each run one chunk's ops use several cores.
Where a chunk's ops are small and the cores are shared (with a broker, a training loop), this beats torch's
intra-op threads, which synchronise on every op and spin against each other there.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def spare_cores(limit: int = 4) -> int:
    """The cores torch's intra-op threads leave idle, at least 1 and at most ``limit``: with torch at one
    thread per op, chunk-level threads use the other cores; with torch on every core, there is one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(limit, cores // torch.get_num_threads()))


def ordered_map(f: Callable[[T], R], items: Iterable[T], workers: int, name: str = "fedq") -> Iterator[R]:
    """``map(f, items)`` with up to ``workers`` calls at once, each in its own thread. Results come in order
    and at most ``workers`` are computed ahead of the consumer, so memory stays bounded; an exception is
    raised where its result would have come, after the calls already started have finished."""
    if workers <= 1:
        yield from map(f, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        pending: collections.deque[Future[R]] = collections.deque()
        for item in items:
            pending.append(pool.submit(f, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
