"""From checkpoints, a model definition and data to an :class:`Alignment` the engine merges with:
build the models, trace the groups, self-check, collect statistics, solve. The engine never calls
this: the API does, before planning, for methods that declare an aligner."""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
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
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            detail = " ".join(lines[1:2] or lines)  # torch's first line only names the class
            if len(detail) > 300:
                detail = detail[:300] + " …"
            raise ParameterError(
                f"model {i} does not fit the model definition ({type(template).__name__}): {detail}"
            ) from None
        out.append(m.eval())
    return out


BENCHMARK_DATA = ("digits", "fashion", "glyphs")  # images of ``alloykit bench align``, (N, 1, 28, 28)


def batches_of(data: Any, samples: int = 1000, batch_size: int = 250) -> list[Any]:
    """Batches of model inputs from: an iterable of batches, one batch (tensor or mapping), a
    callable (or ``"package.module:callable"``) returning either, a ``.safetensors`` file (its
    tensors in name order, each a batch), or a benchmark dataset name (``digits``, ``fashion``,
    ``glyphs``: the first ``samples`` training images, unlabeled, in batches of ``batch_size``)."""
    if data is None:
        return []
    if isinstance(data, str) and data in BENCHMARK_DATA:
        from alloykit.bench.align import DATASETS

        images = DATASETS[data]().x_train[:samples]
        return list(images.split(batch_size))
    if isinstance(data, str | os.PathLike) and str(data).endswith(".safetensors"):
        from alloykit.io.readers import open_checkpoint

        reader = open_checkpoint(Path(data), label="data")
        names = sorted(reader.keys())
        if not names:
            raise ParameterError(f"{data}: the data file holds no tensors")
        return [reader.read(k) for k in names]
    if isinstance(data, str):
        data = resolve_callable(data)
    if callable(data):
        data = data()
    if isinstance(data, torch.Tensor | Mapping):
        return [data]
    return list(data)


def load_groups(groups: Any) -> GroupTable | None:
    """A :class:`GroupTable` given, or read from a JSON file (``GroupTable.to_json``)."""
    if groups is None or isinstance(groups, GroupTable):
        return groups
    path = Path(groups)
    try:
        return GroupTable.from_json(path.read_text())
    except OSError as e:
        raise ParameterError(f"groups file {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ParameterError(f"groups file {path} is not a group table ({type(e).__name__}: {e})") from None


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
    device: torch.device | str = "cpu",
    executor: str = "thread",
    ray_address: str | None = None,
    workers: int | None = None,
    group_batches: int = 1,
) -> tuple[Alignment, torch.nn.Module, list[Any]]:
    """Trace, self-check, collect statistics and solve; returns the alignment, the template
    module and the batches (for post-steps). ``device``: where the statistics pass runs (tracing
    and the self-check run on the host, the solvers on small matrices on the host too).
    ``executor="ray"``: the statistics pass runs as Ray tasks, one per ``group_batches`` batches,
    their sums added in batch order (the same bytes as in this process; see
    :func:`~alloykit.alignment.statistics.collect_activation_statistics`)."""
    seconds: dict[str, float] = {}
    template = template_module(model)
    modules = modules_for(template, states)
    batches = batches_of(data)
    args, kwargs = _example(example_inputs, batches)
    gm = None
    table = load_groups(table)
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
    cache: list[Any] = []

    def correlation() -> Any:
        if not cache:
            if not batches:
                what = "activation matching" if aligner == "activations" else aligner
                raise ParameterError(f"{what} needs data: give data= (batches of model inputs)")
            with timed(seconds, "statistics"):
                stats = collect_activation_statistics(
                    template,
                    gm,
                    states,
                    table,
                    batches,
                    progress=progress,
                    device=device,
                    group_batches=group_batches,
                    executor=executor,
                    ray_address=ray_address,
                    workers=workers,
                    example=(args, kwargs),
                )
            cache.append(stats.correlation)
        return cache[0]

    if aligner in ("activations", "zip", "mudsc_align", "mudsc_zip") and needs_statistics(aligner, params):
        correlation()  # statistics are timed apart from the solve
    with timed(seconds, "solve"):
        transforms = solve_alignment(aligner, params, table, states, correlation, history)
    return Alignment(table, transforms, n, history, seconds), template, batches


def needs_statistics(aligner: str, params: Mapping[str, Any]) -> bool:
    """Whether the aligner reads activation statistics with these parameters (MuDSC at α = 1 started
    from weights does not)."""
    if aligner in ("identity", "weights"):
        return False
    if aligner in ("activations", "zip"):
        return True
    return params.get("init", "activations") == "activations" or params.get("alpha", 0.5) < 1


def solve_alignment(
    aligner: str,
    params: Mapping[str, Any],
    table: GroupTable,
    states: Sequence[dict[str, torch.Tensor]],
    correlation: Callable[[], Any],
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """The transforms of each group for one aligner and its parameters; ``correlation()`` supplies
    the activation statistics when the aligner needs them (computed once by the caller)."""
    n = len(states)
    if aligner == "identity":
        return identity(table, n)
    if aligner == "weights":
        return weight_matching(
            table,
            states,
            kind=params.get("similarity", "inner"),
            max_sweeps=params.get("max_sweeps", 100),
            seed=params.get("seed", 0),
            log=history,
        )
    if aligner == "activations":
        transforms, scores = activation_matching(table, correlation(), n)
        history.append({"scores": scores})
        return transforms
    if aligner in ("zip", "mudsc_align", "mudsc_zip"):
        zip_options = {
            "a": params.get("zip_a", 0.5),
            "b": params.get("zip_b", 1.0),
            "reduce": 1.0 - params.get("width", 1.0) / n,
            "strict": params.get("strict_budget", False),
            "eps": params.get("colsum_eps", 1e-5),
        }
        return dual_space(
            table,
            states,
            correlation() if needs_statistics(aligner, params) else None,
            solver="hungarian" if aligner == "mudsc_align" else "zip",
            alpha=0.0 if aligner == "zip" else params.get("alpha", 0.5),
            kind=params.get("similarity", "pearson"),
            max_sweeps=params.get("max_sweeps", 100),
            patience=params.get("patience", 5),
            seed=params.get("seed", 0),
            init=params.get("init", "activations") == "activations",
            zip_options=zip_options,
            log=history,
        )
    raise ParameterError(f"unknown aligner {aligner!r}")
