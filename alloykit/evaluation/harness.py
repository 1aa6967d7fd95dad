"""Run merge methods against a suite of tasks: select on validation, report on test.

A :class:`Suite` is what any benchmark (or user) supplies: the base state dict, one fine-tuned
state dict per task, the tasks, and an ``evaluate(state_dict, split, task_names)`` function that
returns each named task's accuracy for a backbone (each task with its own head), and optionally a
``statistics(kind)`` provider that gives each task's calibration statistics (``activations`` or
``fisher``, aligned with the tasks) for methods that declare they read them. The harness knows
nothing of models or data beyond that, and nothing of any method beyond the registry: a method
registered later is run without changes here.

For each method: its declared search space (``MergeMethod.search``) is searched by
:func:`alloykit.evaluation.search.select` on the mean *validation* accuracy with every task's test
split sealed (reading it raises); then the chosen parameters are merged once more (timed) and
evaluated on the test splits. When the only searched parameter declares ``scales_update`` (or
``affine``: the search merges at 0 and 1 and interpolates), the
search merges once and rescales the update for each trial (the final model is still merged with
the method itself).

``executor="ray"``: each trial (a merge, or a rescale, and a validation pass) is a Ray task; the
suite (its state dicts and ``evaluate``) travels once through Ray's object store, so it must be
picklable (cloudpickle: closures are), and statistics files must be on storage every node sees.
Trials run with the test splits sealed in the task as well, and their scores are taken in the
sequential search's order: the same trials, the same choice, the same row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from alloykit.errors import AlloykitError
from alloykit.evaluation.metrics import mean, normalized
from alloykit.evaluation.search import Scored, SearchResult, Trial, select
from alloykit.evaluation.tasks import Task
from alloykit.methods.base import Continuous, MergeMethod, SearchSpace, get_method

StateDict = Mapping[str, torch.Tensor]
Evaluate = Callable[[StateDict, str, Sequence[str]], dict[str, float]]


@dataclass
class Suite:
    tasks: list[Task]
    base: StateDict
    finetuned: dict[str, StateDict]  # task name -> fine-tuned state dict
    evaluate: Evaluate
    # kind ("activations" | "fisher") -> per task (in ``tasks`` order) its statistics
    statistics: Callable[[str], Sequence[Any]] | None = None

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        if sorted(names) != sorted(self.finetuned):
            raise ValueError(f"fine-tuned models {sorted(self.finetuned)} do not match tasks {sorted(names)}")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @contextmanager
    def test_sealed(self) -> Iterator[None]:
        with ExitStack() as stack:
            for t in self.tasks:
                stack.enter_context(t.sealed())
            yield


@dataclass
class Row:
    """One line of the results table: a reference model or a merge method."""

    name: str
    kind: str  # "reference" | "method"
    status: str = "ok"  # "ok" | "n/a" | "error"
    reason: str = ""
    preset: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    search: str = ""
    trials: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    normalized: dict[str, float] = field(default_factory=dict)
    merge_seconds: float | None = None
    total_seconds: float | None = None

    @property
    def mean_test(self) -> float | None:
        return mean(self.test) if self.test else None

    @property
    def mean_normalized(self) -> float | None:
        return mean(self.normalized) if self.normalized else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_test"] = self.mean_test
        d["mean_normalized"] = self.mean_normalized
        return d


def reference_rows(suite: Suite) -> tuple[Row, Row]:
    """The base model on every task, and each fine-tuned model on its own task."""
    t0 = time.perf_counter()
    base = Row("base (pre-trained)", "reference")
    base.validation = suite.evaluate(suite.base, "validation", suite.names)
    base.test = suite.evaluate(suite.base, "test", suite.names)
    base.total_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    ind = Row("individual (fine-tuned)", "reference")
    for name in suite.names:
        ind.validation.update(suite.evaluate(suite.finetuned[name], "validation", [name]))
        ind.test.update(suite.evaluate(suite.finetuned[name], "test", [name]))
    ind.total_seconds = time.perf_counter() - t0
    base.normalized = normalized(base.test, ind.test)
    ind.normalized = normalized(ind.test, ind.test)
    return base, ind


def _statistics(suite: Suite, method: MergeMethod) -> list[Any] | None:
    if method.statistics is None:
        return None
    if suite.statistics is None:
        raise AlloykitError(f"{method.name} needs calibration statistics; this suite provides none")
    return list(suite.statistics(method.statistics))


def _merge(
    suite: Suite,
    method: MergeMethod,
    preset: str | None,
    params: Mapping[str, Any],
    workers: int | None,
    stats: list[Any] | None = None,
):
    from alloykit.api import merge

    models = [suite.finetuned[n] for n in suite.names]
    base = suite.base if method.needs_base else None
    if stats is None:
        stats = _statistics(suite, method)
    result = merge(
        models, base, method.name, preset=preset, parameters=dict(params), workers=workers, statistics=stats
    )
    assert result.state_dict is not None
    return result.state_dict


def _rescaled(base: StateDict, merged: StateDict, value: float) -> dict[str, torch.Tensor]:
    out = {}
    for k, m in merged.items():
        b = base[k]
        out[k] = (b.float() + value * (m.float() - b.float())).to(m.dtype) if m.is_floating_point() else m
    return out


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


@dataclass
class _TrialRun:
    """One trial of a search: merge (or rescale a merge made once) and evaluate on validation,
    with every test split sealed. Picklable, so that a trial may run as a Ray task."""

    suite: Suite
    method: str
    preset: str | None
    workers: int | None
    statistics: list[Any] | None
    key: str | None = None  # the one searched parameter that scales the update, if any
    at_zero: StateDict | None = None
    at_one: StateDict | None = None

    def __call__(self, params: dict[str, Any]) -> Scored:
        with self.suite.test_sealed():
            if self.key is not None:
                state = _rescaled(self.at_zero, self.at_one, params[self.key])
            else:
                method = get_method(self.method)
                state = _merge(self.suite, method, self.preset, params, self.workers, self.statistics)
            acc = self.suite.evaluate(state, "validation", self.suite.names)
        return Scored(mean(acc), acc)


def run_method(
    suite: Suite,
    name: str,
    individual: Mapping[str, float],
    *,
    preset: str | None = None,
    fixed: Mapping[str, Any] | None = None,
    budget: int = 8,
    workers: int | None = None,
    on_trial: Callable[[str, dict[str, Any], float], None] | None = None,
    space: SearchSpace | None = None,
    label: str | None = None,
    executor: str = "thread",
    ray_address: str | None = None,
) -> Row:
    """Select ``name``'s declared parameters on validation, then merge and evaluate on test.

    ``fixed`` parameters are set, not searched; ``space`` replaces the method's declared search
    space (a variant, reported as ``label``). ``executor="ray"``: each trial is a Ray task (on a
    local Ray or the cluster at ``ray_address``); the row is the same.
    """
    from alloykit.engine.ray_passes import check_executor

    check_executor(executor, ray_address)
    method = get_method(name)
    row = Row(label or name, "method", preset=preset)
    t_start = time.perf_counter()
    n = len(suite.tasks)
    if method.alignment is not None:
        row.status, row.reason = (
            "n/a",
            "aligns models trained separately (alloykit bench align); these share a base",
        )
        return row
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        most = "any number" if method.max_models is None else f"at most {method.max_models}"
        row.status, row.reason = "n/a", f"takes {most} model(s) (min {method.min_models}); this suite has {n}"
        return row
    declared = method.search if space is None else space
    space = {k: v for k, v in declared.items() if k not in (fixed or {})}
    single = next(iter(space.values())) if len(space) == 1 else None
    scaled = isinstance(single, Continuous) and (single.scales_update or single.affine)
    validations: dict[str, dict[str, float]] = {}

    def record(trial: Trial) -> None:
        validations[_key(trial.params)] = trial.detail
        if on_trial is not None:
            on_trial(row.name, trial.params, trial.score)

    try:
        with suite.test_sealed():
            stats = _statistics(suite, method)
            if executor == "ray":  # what travels: files by path, no statistics provider
                from alloykit.calibration.statistics import StatisticsFile

                stats = [str(s.path) if isinstance(s, StatisticsFile) else s for s in stats or []] or None
                trial_suite = replace(suite, statistics=None)
            else:
                trial_suite = suite
            trial = _TrialRun(trial_suite, method.name, preset, workers, stats)
            if scaled:  # merged once (twice: affine), rescaled for each trial
                (key,) = space
                trial.key = key
                trial.at_one = dict(
                    _merge(suite, method, preset, {**(fixed or {}), key: 1.0}, workers, stats)
                )
                trial.at_zero = (
                    suite.base
                    if single.scales_update
                    else _merge(suite, method, preset, {**(fixed or {}), key: 0.0}, workers, stats)
                )
            result: SearchResult = select(space, trial, budget=budget, fixed=fixed, on_trial=record,
                                          executor=executor, ray_address=ray_address)  # fmt: skip
        del trial
        t0 = time.perf_counter()
        merged = _merge(suite, method, preset, result.params, workers, stats)
        row.merge_seconds = time.perf_counter() - t0
        row.test = suite.evaluate(merged, "test", suite.names)
    except Exception as e:  # one failing method must not end a long benchmark run
        row.status = "error"
        row.reason = str(e) if isinstance(e, AlloykitError) else f"{type(e).__name__}: {e}"
        row.total_seconds = time.perf_counter() - t_start
        return row
    row.params = result.params
    row.search = result.describe()
    row.trials = [{"params": t.params, "score": t.score} for t in result.trials]
    row.validation = validations[_key(result.params)]
    row.normalized = normalized(row.test, individual)
    row.total_seconds = time.perf_counter() - t_start
    return row


def all_methods() -> list[str]:
    import alloykit.methods  # noqa: F401  (registers the built-in methods)
    from alloykit.methods.base import REGISTRY

    return sorted(REGISTRY)
