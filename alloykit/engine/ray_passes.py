"""Passes over data, and searches, split into tasks: in this process or as Ray tasks.

A :class:`TaskPool` applies ``fn(context, item)`` to items and yields the results **in item
order**, whatever order the tasks finish in. ``executor="thread"`` runs them one after another in
this process; ``executor="ray"`` runs each as a Ray task (on a local Ray, or the cluster at
``ray_address``) through :class:`~alloykit.engine.ray_executor.RayExecutor`: at most ``workers``
in flight, a task that raises ``OSError`` or whose worker dies retried, any other error raised on
the driver as the task raised it, pending tasks cancelled.

The ``context`` (a model, the data a pass shares) travels once through Ray's object store; each
worker process keeps the last context it read, so the tasks of one pool that land on one worker
deserialize it once. Every task runs with ``threads`` intra-op threads (by default the driver's
``torch.get_num_threads()`` when the pool is made): torch's reductions split their work by thread
count, so a task computes the same float bytes as the same code run in this process.

Callers fold the results in item order: a float sum depends on the order of its terms, so the
bytes of a folded statistic depend on the grouping of the items only, never on the number of
workers or on which task finished first. This module knows nothing of what the tasks compute.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from alloykit.errors import MissingDependencyError, ParameterError

EXECUTORS = ("thread", "ray")

# In a Ray worker process: (key, context) of the last pool whose context this worker read.
_CONTEXT: dict[str, Any] = {}


def check_executor(executor: str, ray_address: str | None = None) -> None:
    """``executor`` must be ``thread`` or ``ray``; a Ray address needs the Ray executor."""
    if executor not in EXECUTORS:
        raise ParameterError(f"executor = {executor!r} is not allowed; expected thread or ray")
    if ray_address is not None and executor != "ray":
        raise ParameterError("ray_address is given but the executor is 'thread'; add executor='ray'")


def groups_of(items: list[Any], size: int) -> list[list[Any]]:
    """Contiguous groups of ``size`` items (the last one shorter): the fixed grouping that a
    statistics pass sums over, the same for every executor and number of workers."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ParameterError(f"group_batches = {size!r} is not allowed; expected a whole number ≥ 1")
    return [items[i : i + size] for i in range(0, len(items), size)]


class _Task:
    """What each Ray task runs: the context from this worker's cache (else the object store), then
    ``fn(context, item)`` with the driver's intra-op thread count."""

    def __init__(self, fn: Callable[[Any, Any], Any], key: str, context_ref: list[Any], threads: int):
        self.fn = fn
        self.key = key
        self.context_ref = context_ref  # in a list: Ray does not resolve a nested reference itself
        self.threads = threads

    def context(self) -> Any:
        if self.key not in _CONTEXT:
            import ray

            _CONTEXT.clear()  # one context at a time: a worker does not hoard models
            _CONTEXT[self.key] = ray.get(self.context_ref[0])
        return _CONTEXT[self.key]

    def __call__(self, item: Any) -> Any:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.fn(self.context(), item)
        finally:
            torch.set_num_threads(previous)


class TaskPool:
    """``fn(context, item)`` over items, in this process or as Ray tasks (module docstring)."""

    def __init__(
        self,
        fn: Callable[[Any, Any], Any],
        context: Any = None,
        *,
        executor: str = "thread",
        ray_address: str | None = None,
        workers: int | None = None,
        threads: int | None = None,
    ):
        check_executor(executor, ray_address)
        self.fn = fn
        self.context = context
        self.executor = executor
        self.remote = None
        self.task: _Task | None = None
        if executor == "ray":
            import torch

            from alloykit.engine.ray_executor import RayExecutor

            try:
                self.remote = RayExecutor(workers, None, ray_address)
            except MissingDependencyError:
                raise MissingDependencyError(
                    "executor='ray' needs ray, which is not installed: pip install 'alloykit[ray]'"
                ) from None
            ref = self.remote.ray.put(context)
            self.task = _Task(fn, uuid.uuid4().hex, [ref], threads or torch.get_num_threads())
        elif workers is not None and workers < 1:
            raise ParameterError(f"workers = {workers} is not allowed; expected at least 1")

    def map(self, items: Iterable[Any], cost: Callable[[Any], int] | None = None) -> Iterator[Any]:
        """The results of every item, in item order. ``cost(item)``: the task's memory in bytes
        (Ray's ``memory`` resource, so that a node runs no more tasks than it can hold)."""
        if self.remote is None:
            for item in items:
                yield self.fn(self.context, item)
            return
        from alloykit.engine.executor import in_plan_order

        costed = ((item, int(cost(item)) if cost else 0) for item in items)
        yield from in_plan_order(self.remote.run(self.task, costed))

    def close(self) -> None:
        """Drop the context from the object store (workers keep their copy until the next pool)."""
        self.task = None
        self.context = None

    def __enter__(self) -> TaskPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def ordered_map(
    fn: Callable[[Any, Any], Any],
    items: Iterable[Any],
    context: Any = None,
    *,
    executor: str = "thread",
    ray_address: str | None = None,
    workers: int | None = None,
    cost: Callable[[Any], int] | None = None,
) -> Iterator[Any]:
    """``fn(context, item)`` for each item, results in item order (one :class:`TaskPool`)."""
    with TaskPool(fn, context, executor=executor, ray_address=ray_address, workers=workers) as pool:
        yield from pool.map(items, cost)
