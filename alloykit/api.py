"""The one-call Python API: merge paths, state dicts or modules with any registered method."""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from alloykit.dtypes import dtype_name, parse_dtype
from alloykit.engine import DictSink, MergePlan, MergeReport, MergeSpec, plan_merge, run_plan
from alloykit.io import StreamingWriter, open_checkpoint, parse_size
from alloykit.io.readers import CheckpointReader
from alloykit.methods import get_method

Source = str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module


@dataclass
class MergeResult:
    plan: MergePlan
    report: MergeReport | None = None
    output: Path | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def _label(src: Source, i: int) -> str:
    return str(src) if isinstance(src, str | os.PathLike) else f"model_{i}"


def build_spec(
    models: Sequence[Source],
    base_model: Source | None,
    method: str,
    *,
    preset: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    dtype: str | torch.dtype | None = "float32",
    out_dtype: str | torch.dtype | None = None,
    seed: int = 0,
    keys: str = "strict",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    check_finite: bool = True,
    base_check: float | None = 0.5,
    chunk_elements: int = 1 << 20,
) -> MergeSpec:
    m = get_method(method)
    readers: list[CheckpointReader] = [open_checkpoint(s, _label(s, i)) for i, s in enumerate(models)]
    base = None
    if base_model is not None:
        base = open_checkpoint(
            base_model, str(base_model) if isinstance(base_model, str | os.PathLike) else "base"
        )
    return MergeSpec(
        models=readers,
        method=m,
        base=base,
        preset=preset,
        global_params=dict(parameters or {}),
        model_params=[dict(p) for p in model_parameters] if model_parameters else None,
        compute_dtype=parse_dtype(dtype, "dtype"),
        out_dtype=parse_dtype(out_dtype, "out_dtype"),
        keys=keys,
        include=list(include) if include else None,
        exclude=list(exclude) if exclude else None,
        seed=seed,
        check_finite=check_finite,
        base_check=base_check,
        chunk_elements=chunk_elements,
    )


def merge(
    models: Sequence[Source],
    base_model: Source | None = None,
    method: str = "linear",
    output: str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    dtype: str | torch.dtype | None = "float32",
    out_dtype: str | torch.dtype | None = None,
    seed: int = 0,
    keys: str = "strict",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    workers: int | None = None,
    max_memory: str | int | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
    copy_files_from: str | os.PathLike | None = None,
    check_finite: bool = True,
    base_check: float | None = 0.5,
    chunk_elements: int = 1 << 20,
    recipe: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    progress: Any = None,
) -> MergeResult:
    """Merge ``models`` (paths, state dicts or modules) with ``method``.

    With ``output`` the result is written as a sharded safetensors folder (atomically, with the
    base's config and tokenizer files, ``alloykit_recipe.yml`` and ``alloykit_provenance.json``);
    without it the merged state dict is returned in ``MergeResult.state_dict``.
    ``dry_run`` plans and validates everything without reading tensor data.
    ``chunk_elements``: elementwise merges stream each tensor in slices of this many elements.
    """
    spec = build_spec(
        models,
        base_model,
        method,
        preset=preset,
        parameters=parameters,
        model_parameters=model_parameters,
        dtype=dtype,
        out_dtype=out_dtype,
        seed=seed,
        keys=keys,
        include=include,
        exclude=exclude,
        check_finite=check_finite,
        base_check=base_check,
        chunk_elements=chunk_elements,
    )
    plan = plan_merge(spec)
    result = MergeResult(plan=plan)
    if dry_run:
        return result
    max_bytes = parse_size(max_memory) if max_memory is not None else None
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    if output is None:
        sink = DictSink(plan.outputs)
        result.report = run_plan(plan, sink, workers=workers, max_bytes=max_bytes, progress=progress)
        result.state_dict = sink.tensors
        result.provenance = provenance(plan, result.report, started, recipe)
        return result
    with StreamingWriter(output, plan.outputs, parse_size(shard_size), force=force) as writer:
        result.report = run_plan(plan, writer, workers=workers, max_bytes=max_bytes, progress=progress)
        companion = (spec.base if spec.base is not None else spec.models[0]).folder
        if copy_files_from is not None:
            companion = Path(copy_files_from)
            companion = companion.parent if companion.is_file() else companion
        writer.copy_companions(companion, spec.out_dtype)
        result.provenance = provenance(plan, result.report, started, recipe)
        writer.write_text(
            "alloykit_provenance.json", json.dumps(result.provenance, indent=2, default=str) + "\n"
        )
        writer.write_text(
            "alloykit_recipe.yml",
            yaml.safe_dump(recipe if recipe is not None else result.provenance["recipe"], sort_keys=False),
        )
        result.output = writer.commit()
    return result


def merge_state_dicts(
    models: Sequence[Mapping[str, torch.Tensor] | torch.nn.Module],
    base_model: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    method: str = "linear",
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """In-memory convenience: returns the merged state dict."""
    kwargs.setdefault("workers", 1)
    out = merge(models, base_model, method, None, **kwargs).state_dict
    assert out is not None
    return out


def provenance(
    plan: MergePlan, report: MergeReport, started: str, recipe: Mapping[str, Any] | None
) -> dict[str, Any]:
    from alloykit import __version__

    spec = plan.spec

    def digest(i: int) -> dict[str, Any]:
        return report.digests[i] if i < len(report.digests) else {}

    generated = {
        "method": spec.method.name,
        "preset": spec.preset or spec.method.default_preset,
        "base_model": spec.base.label if spec.base is not None else None,
        "models": [
            {"model": m.label, "parameters": p}
            for m, p in zip(spec.models, spec.model_params or [{}] * len(spec.models), strict=True)
        ],
        "parameters": spec.global_params,
        "dtype": dtype_name(spec.compute_dtype),
        "out_dtype": dtype_name(spec.out_dtype),
        "seed": spec.seed,
        "keys": spec.keys,
    }
    return {
        "alloykit_version": __version__,
        "torch_version": torch.__version__,
        "started": started,
        "recipe": dict(recipe) if recipe is not None else generated,
        # The values each merged tensor got (by tensor where conditions or gradients vary them).
        "resolved_parameters": plan.parameters_used(),
        "inputs": {m.label: {**m.fingerprint(), **digest(i)} for i, m in enumerate(spec.models)},
        "base": (
            {spec.base.label: {**spec.base.fingerprint(), **digest(len(spec.models))}}
            if spec.base is not None
            else None
        ),
        "report": report.as_dict(),
        "warnings": plan.warnings,
    }
