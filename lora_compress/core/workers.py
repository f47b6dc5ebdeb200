"""Several layers factored at once: a small layer's SVD cannot keep every thread busy.

A randomized SVD of a 576×576 weight is a chain of small products, a Cholesky, a QR and a
144×144 eigh: LAPACK runs the small calls on one thread, so a second torch thread gains ~10%.
Two layers at once, each on one torch thread, run 1.6× faster on two cores (benchmarks/speed.md).

    for result in ordered_map(factor, layers, workers):  # results in input order
        ...

Each layer's factors do not depend on which thread computes them; they depend on the number of
torch threads per worker (BLAS blocking), which is the CPU's threads split between the workers.
"""
from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import torch

SMALL_LAYER = 1 << 22  # weights per layer (2048²) below which auto runs one layer per torch thread

Item, Result = TypeVar("Item"), TypeVar("Result")


def layer_workers(requested: int, shapes: Iterable[tuple[int, int]], device: str) -> int:
    """Layers to factor at once: ``requested`` when positive, else (auto) one per torch thread on a
    CPU where every layer is small, and 1 on a GPU or where a layer is large enough to use the
    threads itself (its working set, times the workers, would also add to the peak memory)."""
    if requested > 0:
        return requested
    if device != "cpu" or max((math.prod(s) for s in shapes), default=0) > SMALL_LAYER:
        return 1
    return torch.get_num_threads()


@contextmanager
def thread_share(workers: int):
    """Split torch's intra-op threads between ``workers`` (at least one each), restored on exit; yields
    the share. Each worker thread must set it too: OpenMP and MKL keep a thread count per thread."""
    threads = torch.get_num_threads()
    share = max(1, threads // workers)
    torch.set_num_threads(share)
    try:
        yield share
    finally:
        torch.set_num_threads(threads)


def ordered_map(fn: Callable[[Item], Result], items: Iterable[Item], workers: int) -> Iterator[Result]:
    """``map(fn, items)`` on ``workers`` threads, yielded in input order.

    At most ``workers + 1`` items are in flight (memory stays bounded when each holds a weight);
    an exception from ``fn`` is raised when its result is reached, and the queued items are dropped.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with thread_share(workers) as share, ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                                            initargs=(share,)) as pool:
        pending = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
