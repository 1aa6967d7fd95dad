"""Executors run the jobs of a plan. The interface is one method so that process pools or a
cluster can be added later without touching the engine.

Results come back tagged with the job's position in the plan, and the engine folds them in plan
order (:func:`in_plan_order`): a floating-point sum depends on the order of its terms, so
folding in completion order would make the bytes depend on timing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from alloykit.engine.memory import ByteBudget

T = TypeVar("T")

# Intra-op threads of every job. Fixed, not derived from the number of workers: torch's
# reductions and LAPACK routines split their work by thread count, so their float results
# change with it (measured: a 4M-element sum and an SVD differ in the last bits between 1 and
# 2 threads). One thread per job, parallelism across jobs, gives the same bytes for any
# number of workers.
DEFAULT_THREADS = 1


class Executor(Protocol):
    def run(self, fn: Callable[[T], Any], items: Iterable[tuple[T, int]]) -> Iterator[tuple[int, Any]]:
        """Apply ``fn`` to each item (given with its memory cost in bytes); yield ``(position,
        result)`` in completion order. The first exception stops the run, cancels what has not
        started, and is raised without waiting for the jobs still running."""
        ...


# How far past the first waiting job a free worker may look for one that fits the budget. Results
# are folded in plan order, so the outcomes of jobs started early wait for the slower one: they
# are small (a merged tensor is written by its job), and the window bounds how many wait.
LOOKAHEAD = 256


def _released(fn: Callable[[T], Any], item: T, budget: ByteBudget, cost: int) -> Any:
    """``fn(item)``, its bytes returned to the budget before its result is (a done-callback would
    run after the waiting scheduler wakes, which would then see them still in flight)."""
    try:
        return fn(item)
    finally:
        budget.release(cost)


class ThreadExecutor:
    """A thread pool whose jobs in flight stay under a byte budget. torch releases the GIL in
    its kernels and reads/writes are ``pread``/``pwrite``, so threads overlap I/O and compute.
    Jobs run off the main thread even with one worker, so that the main thread stays free to
    take a signal at once."""

    def __init__(self, workers: int | None = None, max_bytes: int | None = None):
        if workers is not None and workers < 1:
            raise ValueError(f"workers = {workers} is not allowed; expected at least 1")
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.max_bytes = max_bytes

    def run(self, fn: Callable[[T], Any], items: Iterable[tuple[T, int]]) -> Iterator[tuple[int, Any]]:
        budget = ByteBudget(self.max_bytes)
        queue = list(items)
        started = [False] * len(queue)
        head = 0  # the first job not started yet
        pending: dict[Future, int] = {}
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="alloykit")
        try:
            while head < len(queue) or pending:
                while len(pending) < self.workers:
                    position = self._next(queue, started, head, budget, bool(pending))
                    if position is None:
                        break
                    item, cost = queue[position]
                    started[position] = True
                    budget.acquire(cost)
                    pending[pool.submit(_released, fn, item, budget, cost)] = position
                    while head < len(queue) and started[head]:
                        head += 1
                if pending:
                    yield from self._collect(pending)
        except BaseException:
            # Do not wait for running jobs (an SVD can take minutes): the caller cleans up and
            # leaves; the threads finish in the background and their results are dropped.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    @staticmethod
    def _next(
        queue: list[tuple[Any, int]], started: list[bool], head: int, budget: ByteBudget, busy: bool
    ) -> int | None:
        """The next job to start: the first in plan order when it fits the budget (or nothing
        runs); else a later one that fits, within ``LOOKAHEAD`` positions, so that a worker does
        not idle while an outsized job waits for another to finish (an embedding-sized SVD job
        waiting for the LM head's); else None (wait for a job to finish)."""
        if head >= len(queue):
            return None
        if not busy or budget.capacity is None:
            return head
        room = budget.capacity - budget.in_flight
        for position in range(head, min(len(queue), head + LOOKAHEAD)):
            if not started[position] and queue[position][1] <= room:
                return position
        return None

    @staticmethod
    def _collect(pending: dict[Future, int]) -> Iterator[tuple[int, Any]]:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            position = pending.pop(f)
            yield position, f.result()


def in_plan_order(results: Iterable[tuple[int, Any]]) -> Iterator[Any]:
    """Re-order ``(position, result)`` pairs into plan order, holding only the results that
    finished ahead of a slower one (at most about the number of workers)."""
    waiting: dict[int, Any] = {}
    next_position = 0
    for position, result in results:
        waiting[position] = result
        while next_position in waiting:
            yield waiting.pop(next_position)
            next_position += 1
    if waiting:  # pragma: no cover - an executor that skipped a position
        raise RuntimeError(f"executor returned positions {sorted(waiting)} but not {next_position}")


@contextmanager
def intra_op_threads(threads: int = DEFAULT_THREADS) -> Iterator[None]:
    """Run the jobs with ``threads`` intra-op threads each (see ``DEFAULT_THREADS``), in torch and
    in the BLAS libraries numpy and scipy bring (the SVD methods' float64 Grams and
    eigendecompositions run there; left alone, each worker's call would start one thread per core
    and the workers would oversubscribe the CPUs); the previous settings are restored on exit."""
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        with threadpool_limits(max(1, threads), user_api="blas"):
            yield
    finally:
        torch.set_num_threads(previous)


def make_executor(
    workers: int | None, max_bytes: int | None, kind: str = "thread", address: str | None = None
) -> Executor:
    """``thread`` (this process) or ``ray`` (Ray tasks, :mod:`alloykit.engine.ray_executor`)."""
    if kind == "ray":
        from alloykit.engine.ray_executor import RayExecutor

        return RayExecutor(workers, max_bytes, address)
    if kind != "thread":
        from alloykit.errors import ParameterError

        raise ParameterError(f"executor = {kind!r} is not allowed; expected thread or ray")
    if address is not None:
        from alloykit.errors import ParameterError

        raise ParameterError("ray_address is given but the executor is 'thread'; add executor='ray'")
    return ThreadExecutor(workers, max_bytes)
