"""Hyperparameter selection over a method's declared search space, for any objective.

``select(space, objective)`` maximises ``objective(params) -> float`` (e.g. mean validation
accuracy of the merged model) over ``space`` (``{name: Continuous | Grid}``, as methods declare in
``MergeMethod.search``):

* one :class:`Continuous` parameter alone: golden-section search on ``[low, high]`` with a fixed
  budget of evaluations (the objective is assumed unimodal, as accuracy against a task-vector scale
  is in practice; the best point *seen* is returned, never an unevaluated midpoint);
* anything else: the full grid (``Grid.values`` × ``Continuous.grid``), best point returned,
  the first one on ties;
* an empty space: one evaluation at ``fixed`` (so the report still has a validation score).

Every evaluation is recorded as a :class:`Trial`, so a report can say what was searched and how
many evaluations it took. The objective decides what data it looks at; the harness gives it only
validation splits.

With ``executor="ray"`` each evaluation is a Ray task (the objective travels once through Ray's
object store; it must be picklable, with cloudpickle: closures are). Points that do not depend on
each other's scores run at once: the whole grid, the first two golden-section points; every later
golden-section point depends on the previous score and runs alone. Scores are taken in the order
the sequential search takes them, so the trials, their order, the tie-breaking and the chosen
parameters are the same as in this process.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from alloykit.methods.base import Continuous, Grid, SearchSpace

INV_PHI = (math.sqrt(5) - 1) / 2  # 0.618…


@dataclass(frozen=True)
class Scored:
    """What an objective may return instead of a bare score: the score and anything it wants
    recorded with the trial (e.g. each task's accuracy), which comes back from a Ray task too."""

    score: float
    detail: Any = None


@dataclass(frozen=True)
class Trial:
    params: dict[str, Any]
    score: float
    detail: Any = field(default=None, compare=False, repr=False)


@dataclass
class SearchResult:
    params: dict[str, Any]
    score: float
    strategy: str
    trials: list[Trial] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return len(self.trials)

    def describe(self) -> str:
        return f"{self.strategy}, {self.evaluations} evaluation{'s' * (self.evaluations != 1)}"


def golden_section(
    f: Callable[[float], float], low: float, high: float, evaluations: int
) -> tuple[float, float, list[tuple[float, float]]]:
    """Maximise a unimodal ``f`` on [low, high] with exactly ``evaluations`` calls (>= 2).

    Returns ``(x, f(x), history)`` for the best point evaluated. After n calls the bracket is
    ``(high − low) · 0.618^(n−1)`` wide.
    """
    return _golden(lambda xs: [f(x) for x in xs], low, high, evaluations)


def _golden(
    f_many: Callable[[list[float]], list[float]], low: float, high: float, evaluations: int
) -> tuple[float, float, list[tuple[float, float]]]:
    """:func:`golden_section` with the objective taken a list of points at a time (the first two
    points together), so that independent points may be evaluated at once."""
    if evaluations < 2:
        raise ValueError("golden-section search needs at least 2 evaluations")
    if not low < high:
        raise ValueError(f"need low < high, got [{low}, {high}]")
    history: list[tuple[float, float]] = []

    def calls(xs: list[float]) -> list[float]:
        ys = [float(y) for y in f_many(xs)]
        for x, y in zip(xs, ys, strict=True):
            if math.isnan(y):
                raise ValueError(f"objective returned NaN at {x}")
            history.append((x, y))
        return ys

    def call(x: float) -> float:
        return calls([x])[0]

    a, b = low, high
    c, d = b - INV_PHI * (b - a), a + INV_PHI * (b - a)
    fc, fd = calls([c, d])
    while len(history) < evaluations:
        if fc >= fd:  # the maximum lies in [a, d]
            b, d, fd = d, c, fc
            c = b - INV_PHI * (b - a)
            fc = call(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + INV_PHI * (b - a)
            fd = call(d)
    x, y = max(history, key=lambda h: h[1])  # first best on ties
    return x, y, history


def _grid_values(name: str, spec: Continuous | Grid) -> tuple[Any, ...]:
    if isinstance(spec, Grid):
        return spec.values
    if spec.grid:
        return spec.grid
    return tuple(spec.low + (spec.high - spec.low) * i / 4 for i in range(5))


def _evaluate(objective: Callable[[dict[str, Any]], Any], params: dict[str, Any]) -> Any:
    return objective(params)


def select(
    space: SearchSpace,
    objective: Callable[[dict[str, Any]], float | Scored],
    *,
    budget: int = 8,
    fixed: Mapping[str, Any] | None = None,
    on_trial: Callable[[Trial], None] | None = None,
    executor: str = "thread",
    ray_address: str | None = None,
    workers: int | None = None,
) -> SearchResult:
    """Pick the parameters in ``space`` that maximise ``objective`` (see the module docstring).

    ``fixed`` parameters are passed with every call and never searched; ``budget`` is the number
    of evaluations a golden-section search may spend (grids are evaluated whole). ``objective``
    returns a score, or a :class:`Scored` (kept as the trial's ``detail``); ``on_trial(trial)``
    is called in this process for each trial, in the order of the sequential search.
    ``executor="ray"``: every evaluation is a Ray task (``ray_address``: a running cluster;
    ``workers``: tasks in flight, default the cluster's CPUs); the result is the same.
    """
    from alloykit.engine.ray_passes import TaskPool

    fixed = dict(fixed or {})
    overlap = set(fixed) & set(space)
    if overlap:
        raise ValueError(f"parameter(s) {sorted(overlap)} are both fixed and searched")
    trials: list[Trial] = []
    pool = TaskPool(_evaluate, objective, executor=executor, ray_address=ray_address, workers=workers)

    def run_many(points: list[dict[str, Any]]) -> list[float]:
        full = [{**fixed, **p} for p in points]
        scores = []
        for params, value in zip(full, pool.map(full), strict=True):
            scored = value if isinstance(value, Scored) else Scored(value)
            trial = Trial(params, float(scored.score), scored.detail)
            trials.append(trial)
            if on_trial is not None:
                on_trial(trial)
            scores.append(trial.score)
        return scores

    with pool:
        if not space:
            (score,) = run_many([{}])
            return SearchResult(dict(fixed), score, "no search (nothing declared)", trials)
        if len(space) == 1:
            ((name, spec),) = space.items()
            if isinstance(spec, Continuous):
                x, y, _ = _golden(lambda xs: run_many([{name: v} for v in xs]), spec.low, spec.high, budget)
                return SearchResult(
                    {**fixed, name: x}, y, f"golden-section on {name} ∈ [{spec.low}, {spec.high}]", trials
                )
        names = list(space)
        combos = itertools.product(*(_grid_values(n, space[n]) for n in names))
        run_many([dict(zip(names, combo, strict=True)) for combo in combos])
    best = max(trials, key=lambda t: t.score)
    what = " × ".join(f"{n} ∈ {list(_grid_values(n, space[n]))}" for n in names)
    return SearchResult(dict(best.params), best.score, f"grid {what}", trials)
