"""The Ray executor: the jobs of a plan as Ray tasks, on one machine or a cluster.

Each task runs one job (a tensor or a slice) in a Ray worker process: it reads its inputs from
the paths every node sees, computes, and writes its result into the output's shard files at the
planned offsets (or hands it back when the output is in memory). The driver folds results in plan
order (the same bytes as the thread executor), records what was written, and commits the output
atomically as before. A job's planned memory is requested as Ray's ``memory`` resource, so a node
never runs more jobs at once than its memory holds; at most ``workers`` jobs (and ``max_bytes``
of planned memory) are in flight. A task that raises ``OSError`` (an I/O hiccup) or whose worker
dies is retried (``retries`` times); writes at fixed offsets make a retry harmless. Any other
error stops the run: pending tasks are cancelled and the error is raised as the job raised it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from alloykit.engine.memory import ByteBudget
from alloykit.errors import MissingDependencyError

T = TypeVar("T")


def _job(fn: Callable[[Any], Any], item: Any) -> tuple[Any, str, int]:
    """Runs in a Ray worker: the job's result, the node it ran on, the worker's peak RSS."""
    import resource

    import ray

    result = fn(item)
    node = ray.get_runtime_context().get_node_id()
    return result, node, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RayExecutor:
    remote = True

    def __init__(
        self,
        workers: int | None = None,
        max_bytes: int | None = None,
        address: str | None = None,
        retries: int = 2,
    ):
        try:
            import ray
        except ImportError:
            raise MissingDependencyError("the Ray executor needs ray: pip install 'alloykit[ray]'") from None
        if workers is not None and workers < 1:
            raise ValueError(f"workers = {workers} is not allowed; expected at least 1")
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                options["address"] = address
            ray.init(**options)
        self.ray = ray
        resources = ray.cluster_resources()
        self.workers = workers or max(1, int(resources.get("CPU", 1)))
        self.max_bytes = max_bytes
        self.retries = retries
        # a task asks for at most what the smallest node offers, or it could never be placed
        per_node = [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")]
        self.memory_cap = int(0.9 * min(per_node)) if per_node and min(per_node) > 0 else None
        self.nodes: dict[str, int] = {}  # jobs per node
        self.peak_rss: dict[str, int] = {}  # the largest worker peak RSS seen per node

    def run(self, fn: Callable[[T], Any], items: Iterable[tuple[T, int]]) -> Iterator[tuple[int, Any]]:
        ray = self.ray
        task = ray.remote(_job)
        fn_ref = ray.put(fn)  # the plan travels once, not with every task
        budget = ByteBudget(self.max_bytes)
        pending: dict[Any, tuple[int, int]] = {}  # ref: (position, cost)
        try:
            for position, (item, cost) in enumerate(items):
                while len(pending) >= self.workers or (
                    pending and budget.capacity is not None and budget.in_flight + cost > budget.capacity
                ):
                    yield from self._collect(pending, budget)
                budget.acquire(cost)
                memory = min(cost, self.memory_cap) if self.memory_cap else cost
                ref = task.options(
                    max_retries=self.retries, retry_exceptions=[OSError], memory=max(1, memory)
                ).remote(fn_ref, item)
                pending[ref] = (position, cost)
            while pending:
                yield from self._collect(pending, budget)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=False)
            raise

    def _collect(self, pending: dict[Any, tuple[int, int]], budget: ByteBudget) -> Iterator[tuple[int, Any]]:
        ray = self.ray
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            position, cost = pending.pop(ref)
            budget.release(cost)
            try:
                result, node, rss = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, BaseException) else e) from None
            self.nodes[node] = self.nodes.get(node, 0) + 1
            self.peak_rss[node] = max(self.peak_rss.get(node, 0), rss)
            yield position, result


def make_ray_executor(workers: int | None, max_bytes: int | None, address: str | None) -> RayExecutor:
    return RayExecutor(workers, max_bytes, address)
