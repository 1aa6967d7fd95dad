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
class Trial:
    params: dict[str, Any]
    score: float


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
    if evaluations < 2:
        raise ValueError("golden-section search needs at least 2 evaluations")
    if not low < high:
        raise ValueError(f"need low < high, got [{low}, {high}]")
    history: list[tuple[float, float]] = []

    def call(x: float) -> float:
        y = float(f(x))
        if math.isnan(y):
            raise ValueError(f"objective returned NaN at {x}")
        history.append((x, y))
        return y

    a, b = low, high
    c, d = b - INV_PHI * (b - a), a + INV_PHI * (b - a)
    fc, fd = call(c), call(d)
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


def select(
    space: SearchSpace,
    objective: Callable[[dict[str, Any]], float],
    *,
    budget: int = 8,
    fixed: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Pick the parameters in ``space`` that maximise ``objective`` (see the module docstring).

    ``fixed`` parameters are passed with every call and never searched; ``budget`` is the number
    of evaluations a golden-section search may spend (grids are evaluated whole).
    """
    fixed = dict(fixed or {})
    overlap = set(fixed) & set(space)
    if overlap:
        raise ValueError(f"parameter(s) {sorted(overlap)} are both fixed and searched")
    trials: list[Trial] = []

    def run(params: dict[str, Any]) -> float:
        full = {**fixed, **params}
        score = float(objective(full))
        trials.append(Trial(full, score))
        return score

    if not space:
        score = run({})
        return SearchResult(dict(fixed), score, "no search (nothing declared)", trials)
    if len(space) == 1:
        ((name, spec),) = space.items()
        if isinstance(spec, Continuous):
            x, y, _ = golden_section(lambda v: run({name: v}), spec.low, spec.high, budget)
            return SearchResult(
                {**fixed, name: x}, y, f"golden-section on {name} ∈ [{spec.low}, {spec.high}]", trials
            )
    names = list(space)
    for combo in itertools.product(*(_grid_values(n, space[n]) for n in names)):
        run(dict(zip(names, combo, strict=True)))
    best = max(trials, key=lambda t: t.score)
    what = " × ".join(f"{n} ∈ {list(_grid_values(n, space[n]))}" for n in names)
    return SearchResult(dict(best.params), best.score, f"grid {what}", trials)
