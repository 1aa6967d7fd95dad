"""From checkpoints, a model definition and data to an :class:`Alignment` the engine merges with:
build the models, trace the groups, self-check, collect statistics, solve. The engine never calls
this: the API does, before planning, for methods that declare an aligner."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from alloykit.alignment.align import (
    Alignment,
    activation_matching,
    dual_space,
    identity,
    timed,
    weight_matching,
)
from alloykit.alignment.check import self_check as run_self_check
from alloykit.alignment.groups import GroupTable
from alloykit.alignment.statistics import collect_activation_statistics
from alloykit.alignment.trace import trace_groups
from alloykit.errors import ParameterError

ModelSource = torch.nn.Module | str | Callable[[], torch.nn.Module]


def resolve_callable(ref: str) -> Callable[..., Any]:
    """``"package.module:name"`` → the object (a model factory, or a function returning batches)."""
    if ":" not in ref:
        raise ParameterError(f"{ref!r}: expected 'package.module:callable'")
    mod_name, attr = ref.split(":", 1)
    try:
        obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ParameterError(f"cannot import {ref!r} ({e})") from None
    if not callable(obj):
        raise ParameterError(f"{ref!r} is not callable")
    return obj


def template_module(model: ModelSource) -> torch.nn.Module:
    """The architecture, as a module: given, or built by a factory (callable or import path)."""
    if isinstance(model, torch.nn.Module):
        return model
    factory = resolve_callable(model) if isinstance(model, str) else model
    built = factory()
    if not isinstance(built, torch.nn.Module):
        raise ParameterError(f"the model factory returned {type(built).__name__}, not an nn.Module")
    return built


def modules_for(
    template: torch.nn.Module, states: Sequence[dict[str, torch.Tensor]]
) -> list[torch.nn.Module]:
    """One copy of the template per checkpoint; a checkpoint that does not fit is an error naming it."""
    out = []
    for i, state in enumerate(states):
        m = copy.deepcopy(template)
        try:
            m.load_state_dict(dict(state))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ParameterError(f"model {i} does not fit the model definition: {first}") from None
        out.append(m.eval())
    return out


def batches_of(data: Any) -> list[Any]:
    if data is None:
        return []
    if isinstance(data, str):
        data = resolve_callable(data)
    if callable(data):
        data = data()
    if isinstance(data, torch.Tensor | Mapping):
        return [data]
    return list(data)


def _example(example: Any, batches: list[Any]) -> tuple[tuple, dict]:
    ex = example if example is not None else (batches[0] if batches else None)
    if ex is None:
        raise ParameterError("tracing needs example inputs: give example_inputs= or data=")
    if isinstance(ex, Mapping):
        return (), dict(ex)
    if isinstance(ex, tuple | list):
        return tuple(ex), {}
    return (ex,), {}


def prepare_alignment(
    aligner: str,
    params: Mapping[str, Any],
    states: Sequence[dict[str, torch.Tensor]],
    *,
    model: ModelSource,
    data: Any = None,
    example_inputs: Any = None,
    table: GroupTable | None = None,
    check: bool = True,
    exclude_groups: Sequence[str] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Alignment, torch.nn.Module, list[Any]]:
    """Trace, self-check, collect statistics and solve; returns the alignment, the template
    module and the batches (for post-steps)."""
    seconds: dict[str, float] = {}
    template = template_module(model)
    modules = modules_for(template, states)
    batches = batches_of(data)
    args, kwargs = _example(example_inputs, batches)
    gm = None
    with timed(seconds, "trace"):
        if table is None:
            traced = trace_groups(modules[0], args, kwargs)
            table, gm = traced.table, traced.graph_module
        if exclude_groups:
            table = table.without(exclude_groups)
    if check:
        with timed(seconds, "self_check"):
            run_self_check(modules[0], table, args, kwargs)
    n = len(states)
    history: list[dict[str, Any]] = []
    if aligner == "identity":
        transforms = identity(table, n)
    elif aligner == "weights":
        with timed(seconds, "solve"):
            transforms = weight_matching(
                table,
                states,
                kind=params.get("similarity", "inner"),
                max_sweeps=params.get("max_sweeps", 100),
                seed=params.get("seed", 0),
                log=history,
            )
    elif aligner == "activations":
        if not batches:
            raise ParameterError("activation matching needs data: give data= (batches of model inputs)")
        with timed(seconds, "statistics"):
            stats = collect_activation_statistics(template, gm, states, table, batches, progress=progress)
        with timed(seconds, "solve"):
            transforms, scores = activation_matching(table, stats.correlation, n)
        history.append({"scores": scores})
    elif aligner in ("zip", "mudsc_align", "mudsc_zip"):
        init = params.get("init", "activations") == "activations"
        needs_data = aligner == "zip" or init or params.get("alpha", 0.5) < 1
        stats = None
        if needs_data:
            if not batches:
                raise ParameterError(f"{aligner} needs data: give data= (batches of model inputs)")
            with timed(seconds, "statistics"):
                stats = collect_activation_statistics(template, gm, states, table, batches, progress=progress)
        width = params.get("width", 1.0)
        zip_options = {
            "a": params.get("zip_a", 0.5),
            "b": params.get("zip_b", 1.0),
            "reduce": 1.0 - width / n,
            "strict": params.get("strict_budget", False),
            "eps": params.get("colsum_eps", 1e-5),
        }
        correlation = stats.correlation if stats is not None else None
        with timed(seconds, "solve"):
            transforms = dual_space(
                table,
                states,
                correlation,
                solver="hungarian" if aligner == "mudsc_align" else "zip",
                alpha=0.0 if aligner == "zip" else params.get("alpha", 0.5),
                kind=params.get("similarity", "pearson"),
                max_sweeps=params.get("max_sweeps", 100),
                patience=params.get("patience", 5),
                seed=params.get("seed", 0),
                init=init,
                zip_options=zip_options,
                log=history,
            )
    else:
        raise ParameterError(f"unknown aligner {aligner!r}")
    return Alignment(table, transforms, n, history, seconds), template, batches
