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
from alloykit.engine.executor import DEFAULT_THREADS
from alloykit.errors import CheckpointError, ParameterError
from alloykit.io import StreamingWriter, open_checkpoint, parse_size
from alloykit.io.paths import check_output_location, resolved
from alloykit.io.readers import CheckpointReader
from alloykit.io.writer import validate_companions
from alloykit.methods import get_method

Source = str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module


@dataclass
class MergeResult:
    plan: MergePlan
    report: MergeReport | None = None
    output: Path | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    # models whose vocabularies differ: the output tokenizer's source, tokens, rows and the
    # token-indexed tensors read in its order
    vocabulary: dict[str, Any] | None = None


def _label(src: Source, i: int) -> str:
    return str(src) if isinstance(src, str | os.PathLike) else f"model_{i}"


def _identity(src: Source) -> Any:
    """What makes two inputs the same input: the resolved path, or the very same object."""
    return ("path", resolved(src)) if isinstance(src, str | os.PathLike) else ("object", id(src))


def check_distinct_inputs(models: Sequence[Source], base_model: Source | None) -> list[str]:
    """The same model listed twice would silently count double; the base listed as a model adds
    a zero task vector that dilutes every mean. For paths both are refused; for in-memory
    objects (tests and notebooks build such merges on purpose) they are returned as warnings."""
    warnings: list[str] = []

    def problem(message: str, is_path: bool) -> None:
        if is_path:
            raise ParameterError(message)
        warnings.append(message)

    seen: dict[Any, int] = {}
    for i, m in enumerate(models):
        key = _identity(m)
        if key in seen:
            problem(
                f"model {_label(m, i)} is listed twice (models {seen[key]} and {i}); list it once "
                "and give it a larger weight if it should count more",
                key[0] == "path",
            )
        seen.setdefault(key, i)
    if base_model is not None and _identity(base_model) in seen:
        i = seen[_identity(base_model)]
        problem(
            f"the base model {_label(base_model, i)} is also listed as model {i}: its task vector "
            "is zero and dilutes the merge; list only the fine-tuned models (mergekit recipes "
            "that list the base are translated without it)",
            _identity(base_model)[0] == "path",
        )
    return warnings


def _input_paths(models: Sequence[Source], base_model: Source | None) -> list[tuple[str, Path, bool]]:
    out = []
    for what, src in [*(("model", m) for m in models), ("base model", base_model)]:
        if isinstance(src, str | os.PathLike):
            p = Path(src)
            out.append((what, p, p.is_dir()))
    return out


def _same_content_warnings(spec: MergeSpec, report: MergeReport) -> list[str]:
    """Inputs whose tensor bytes are identical (different paths, same weights)."""
    if not report.digests:
        return []
    readers = [*spec.models, *([spec.base] if spec.base is not None else [])]
    first: dict[str, str] = {}
    warnings = []
    for r, d in zip(readers, report.digests, strict=False):
        if not d.get("tensors"):
            continue
        if d["digest"] in first:
            warnings.append(
                f"{r.label} has the same weights as {first[d['digest']]} (identical tensor bytes): "
                "is one listed by mistake?"
            )
        else:
            first[d["digest"]] = r.label
    return warnings


def _open_model(source: Source, label: str, base: CheckpointReader | None) -> CheckpointReader:
    """A model: a checkpoint, a PEFT LoRA adapter folder (on the base model), or
    ``"model+adapter"`` (mergekit's notation: the adapter on that model)."""
    from alloykit.io.lora import LoraReader, is_adapter

    if isinstance(source, str | os.PathLike):
        text = str(source)
        if "+" in text and not Path(text).exists():
            on, adapter = text.rsplit("+", 1)
            if not is_adapter(adapter):
                raise CheckpointError(
                    f"{text}: read as model+adapter, but {adapter} is not a local PEFT adapter folder "
                    "(no adapter_config.json); alloykit reads local folders only"
                )
            return LoraReader(adapter, open_checkpoint(on, on), label)
        if is_adapter(text):
            if base is None:
                raise ParameterError(
                    f"{text} is a LoRA adapter: give its base model (base_model=, --base or recipe "
                    "base_model), or write 'base_path+adapter_path'"
                )
            return LoraReader(text, base, label)
    return open_checkpoint(source, label)


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
    statistics: Sequence[Any] | None = None,
) -> MergeSpec:
    m = get_method(method)
    stats = None
    if statistics is not None:
        from alloykit.calibration.statistics import open_statistics

        if len(statistics) != len(models):
            raise ParameterError(f"{len(statistics)} statistics for {len(models)} models; give one per model")
        stats = [
            None if s is None else open_statistics(s, _label(models[i], i)) for i, s in enumerate(statistics)
        ]
    base = None
    if base_model is not None:
        base = open_checkpoint(
            base_model, str(base_model) if isinstance(base_model, str | os.PathLike) else "base"
        )
    readers: list[CheckpointReader] = [_open_model(s, _label(s, i), base) for i, s in enumerate(models)]
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
        statistics=stats,
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
    threads: int = DEFAULT_THREADS,
    digest: bool = True,
    protect: Sequence[str | os.PathLike] = (),
    statistics: Sequence[Any] | None = None,
    model: Any = None,
    data: Any = None,
    example_inputs: Any = None,
    groups: Any = None,
    exclude_groups: Sequence[str] = (),
    self_check: bool = True,
    post: str = "none",
    alignment: Any = None,
    device: Any = None,
    device_fallback: bool = False,
    executor: str = "thread",
    ray_address: str | None = None,
    notes: Sequence[str] = (),
    chat_template: str | None = None,
    tokenizer: str | Mapping[str, Any] | None = None,
    group_batches: int = 1,
) -> MergeResult:
    """Merge ``models`` (paths, state dicts or modules) with ``method``.

    With ``output`` the result is written as a sharded safetensors folder (atomically, with the
    base's config and tokenizer files, ``alloykit_recipe.yml`` and ``alloykit_provenance.json``);
    without it the merged state dict is returned in ``MergeResult.state_dict``.
    ``dry_run`` plans and validates everything without reading tensor data.
    ``chunk_elements``: elementwise merges stream each tensor in slices of this many elements.
    ``threads``: intra-op threads per job; the bytes written depend on it, not on ``workers``.
    ``digest``: record a content digest of every input's tensor bytes in the provenance.
    ``protect``: more paths the output must not overwrite or contain (the recipe file).
    ``notes``: warnings from reading the recipe, reported with the plan's.
    ``chat_template``: the output's chat template: ``auto`` (the one most input models carry), a
    name (chatml, llama3, alpaca, mistral) or a Jinja template (:mod:`alloykit.io.chat_template`).
    ``tokenizer``: for models whose vocabularies differ, the output tokenizer: ``base``, ``union``
    or a model folder (or a mapping ``{source, tokens, pad_to_multiple_of}``, mergekit's
    ``tokenizer:``); embedding and head rows are then read in its token order
    (:mod:`alloykit.io.vocabulary`), and it is written with the output.
    ``statistics``: per model, its calibration statistics (a file from ``alloykit calibrate``,
    a :class:`~alloykit.calibration.Statistics`, or a dict ``{tensor: {"gram": G, "tokens": N}}``
    / ``{tensor: X}`` of raw layer inputs), for methods that read them (ESM, RegMean, Fisher).

    Models trained separately (methods with an aligner: ``weight_average``,
    ``weight_matching``, ``activation_matching``, …): ``model`` is the architecture (an
    ``nn.Module``, a factory, or ``"package.module:factory"``), ``data`` batches of inputs (or a
    callable returning them; activation methods, post-steps), ``example_inputs`` an input for
    tracing (default: the first batch), ``groups`` a :class:`~alloykit.alignment.groups.GroupTable`
    to use instead of tracing, ``exclude_groups`` groups to leave alone, ``self_check`` the
    permutation-invariance check before merging, ``post`` ``none``, ``bn_reset`` or ``repair``;
    ``alignment`` a precomputed :class:`~alloykit.alignment.align.Alignment`.

    ``device``: where merged tensors are computed: ``cpu`` (default), ``cuda``, ``cuda:N``, several
    (``"cuda:0,cuda:1"``, jobs round-robin) or ``auto``; inputs are read and outputs written on the
    host. Alignment statistics and post-steps run on the first device. ``device_fallback``: a job
    that runs out of device memory is merged on the host instead of failing.

    ``executor``: ``thread`` (default: jobs in this process) or ``ray`` (jobs as Ray tasks on a
    local or running cluster, ``ray_address``; inputs and the output folder must be on storage
    every node sees). The bytes written are the same. An aligner's statistics pass runs as Ray
    tasks too (one per ``group_batches`` batches, summed on the driver in batch order: the same
    bytes for any executor and number of workers; the grouping itself changes the last bits).

    Everything is checked before the first tensor is read: inputs (headers, companion JSON
    files), parameters, the memory budget and the output location; the output never is,
    contains or lies inside an input folder, with or without ``force``.
    """
    if threads < 1:
        raise ParameterError(f"threads = {threads} is not allowed; expected at least 1")
    if workers is not None and workers < 1:
        raise ParameterError(f"workers = {workers} is not allowed; expected at least 1")
    if executor not in ("thread", "ray"):
        raise ParameterError(f"executor = {executor!r} is not allowed; expected thread or ray")
    from alloykit.engine.devices import resolve_devices

    devices = resolve_devices(device)
    input_warnings = check_distinct_inputs(models, base_model)
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
        statistics=statistics,
    )
    if post not in ("none", "bn_reset", "repair"):
        raise ParameterError(f"post = {post!r} is not allowed; expected none, bn_reset or repair")
    vocabulary = None
    if tokenizer is not None:
        vocabulary = _map_vocabularies(spec, tokenizer)
    chat = None
    if chat_template is not None:
        from alloykit.io.chat_template import resolve_chat_template

        inputs = ([spec.base] if spec.base is not None else []) + list(spec.models)
        chat = resolve_chat_template(chat_template, [r.folder for r in inputs])
    template, batches = None, []
    if spec.method.alignment is not None and alignment is None and not dry_run:
        alignment, template, batches = _align(
            spec,
            model,
            data,
            example_inputs,
            groups,
            exclude_groups,
            self_check,
            parameters,
            model_parameters,
            preset,
            progress,
            devices[0],
            executor,
            ray_address,
            workers,
            group_batches,
        )
    elif post != "none" or alignment is not None:
        from alloykit.alignment.pipeline import batches_of, template_module

        template = template_module(model) if model is not None else None
        batches = batches_of(data)
    if spec.method.alignment is not None and dry_run and alignment is None:
        alignment = _Unaligned(len(spec.models))
    spec.alignment = alignment
    plan = plan_merge(spec)
    plan.warnings[:0] = [*notes, *input_warnings]  # notes: from reading the recipe
    result = MergeResult(plan=plan, vocabulary=vocabulary.summary() if vocabulary is not None else None)
    max_bytes = parse_size(max_memory) if max_memory is not None else None
    check_memory_budget(plan, max_bytes)
    companion = (spec.base if spec.base is not None else spec.models[0]).folder
    if copy_files_from is not None:
        companion = Path(copy_files_from)
        companion = companion.parent if companion.is_file() else companion
    if output is not None:
        protected = _input_paths(models, base_model)
        protected += [("recipe", Path(p), Path(p).is_dir()) for p in protect]
        if copy_files_from is not None:
            protected.append(("copy_files_from folder", companion, True))
        for s in statistics or []:
            if isinstance(s, str | os.PathLike):
                protected.append(("statistics file", Path(s), False))
        check_output_location(output, protected)
        validate_companions(companion)
    if dry_run:
        return result
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    run = dict(
        workers=workers,
        max_bytes=max_bytes,
        progress=progress,
        threads=threads,
        digest=digest,
        devices=devices,
        device_fallback=device_fallback,
        executor=executor,
        ray_address=ray_address,
    )
    if post != "none":
        return _merge_then_repair(
            result,
            plan,
            spec,
            run,
            output,
            post,
            template,
            batches,
            alignment,
            started,
            recipe,
            shard_size,
            force,
            companion,
        )
    if output is None:
        sink = DictSink(plan.outputs)
        result.report = run_plan(plan, sink, **run)
        result.report.warnings += _same_content_warnings(spec, result.report)
        result.state_dict = sink.tensors
        result.provenance = provenance(plan, result.report, started, recipe)
        return result
    with StreamingWriter(output, plan.outputs, parse_size(shard_size), force=force) as writer:
        result.report = run_plan(plan, writer, **run)
        result.report.warnings += _same_content_warnings(spec, result.report)
        result.provenance = provenance(plan, result.report, started, recipe)
        _write_records(writer, result, spec, recipe, companion, chat, vocabulary)
        result.output = writer.commit()
    return result


def _map_vocabularies(spec: MergeSpec, tokenizer: str | Mapping[str, Any]) -> Any:
    """Wrap the spec's readers so that their embedding and head rows follow one vocabulary."""
    from alloykit.io.vocabulary import TokenizerSpec, align_vocabularies

    options = {"source": tokenizer} if isinstance(tokenizer, str | os.PathLike) else dict(tokenizer)
    unknown = set(options) - {"source", "tokens", "pad_to_multiple_of", "base"}
    if unknown:
        raise ParameterError(
            f"tokenizer: unknown keys {sorted(unknown)}; expected source, tokens, pad_to_multiple_of"
        )
    options["source"] = str(options.get("source") or "union")
    spec.models, spec.base, vocabulary = align_vocabularies(
        TokenizerSpec(**options), spec.models, spec.base, spec.compute_dtype
    )
    return vocabulary


def _write_records(
    writer: StreamingWriter,
    result: MergeResult,
    spec: MergeSpec,
    recipe,
    companion,
    chat: str | None = None,
    vocabulary: Any = None,
) -> None:
    """Beside the tensors: the base's config and tokenizer files (or the tokenizer built for
    models whose vocabularies differ), the provenance, the recipe and a model card (README.md)
    that says how the model was made."""
    from alloykit.io.model_card import model_card

    copied = writer.copy_companions(companion, spec.out_dtype, tokenizer=vocabulary is None)
    layout = getattr(spec.base if spec.base is not None else spec.models[0], "config_updates", None)
    if layout and "config.json" in copied:  # a layer stack: its number of layers
        writer.update_json("config.json", layout)
    if vocabulary is not None:
        from alloykit.io.vocabulary import save_vocabulary

        save_vocabulary(vocabulary, writer, "config.json" in copied)
    if chat is not None:
        from alloykit.io.chat_template import write_chat_template

        write_chat_template(writer.tmp_dir, chat)
    writer.write_text("alloykit_provenance.json", json.dumps(result.provenance, indent=2, default=str) + "\n")
    used = recipe if recipe is not None else result.provenance["recipe"]
    writer.write_text("alloykit_recipe.yml", yaml.safe_dump(used, sort_keys=False))
    card = model_card(
        method=spec.method.name,
        method_doc=spec.method.fn.__doc__ or "",
        models=[m.label for m in spec.models],
        base=spec.base.label if spec.base is not None else None,
        base_folder=Path(companion) if companion is not None else None,
        recipe=used,
        has_config="config.json" in copied,
    )
    writer.write_text("README.md", card)


class _Unaligned:
    """Stands in for an alignment in a dry run (no data is read): shapes stay as they are."""

    def __init__(self, n: int):
        self.n_models = n

    def params(self) -> set[str]:
        return set()

    def merged_shape(self, name: str, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape)

    def entries(self, name: str) -> tuple:
        return ()


def _align(
    spec: MergeSpec,
    model: Any,
    data: Any,
    example: Any,
    groups: Any,
    exclude_groups: Sequence[str],
    check: bool,
    parameters: Any,
    model_parameters: Any,
    preset: str | None,
    progress: Any,
    device: torch.device,
    executor: str = "thread",
    ray_address: str | None = None,
    workers: int | None = None,
    group_batches: int = 1,
):
    """Run the method's aligner on the models (read whole: these are models one can run); with
    ``executor="ray"`` its statistics pass runs as Ray tasks too (one per ``group_batches``)."""
    from alloykit.alignment.pipeline import prepare_alignment

    if model is None:
        raise ParameterError(
            f"{spec.method.name} aligns models trained separately: give the model definition (model=, an "
            "nn.Module, a factory or 'package.module:factory')"
        )
    n = len(spec.models)
    resolved = spec.method.resolve(
        n, preset, dict(parameters or {}), [dict(p) for p in model_parameters or []]
    )
    states = [{k: r.read(k) for k in r.keys()} for r in spec.models]
    return prepare_alignment(
        spec.method.alignment,
        resolved,
        states,
        model=model,
        data=data,
        example_inputs=example,
        table=groups,
        check=check,
        exclude_groups=exclude_groups,
        progress=progress,
        device=device,
        executor=executor,
        ray_address=ray_address,
        workers=workers,
        group_batches=group_batches,
    )


def _merge_then_repair(
    result,
    plan,
    spec,
    run,
    output,
    post,
    template,
    batches,
    alignment,
    started,
    recipe,
    shard_size,
    force,
    companion,
):
    """Merge in memory, re-estimate BatchNorm statistics or apply REPAIR on data, then write."""
    import copy

    from alloykit.alignment.pipeline import modules_for
    from alloykit.alignment.post import bn_reset, repair

    if template is None or not batches:
        raise ParameterError(f"post = {post!r} needs the model definition (model=) and data= (batches)")
    from alloykit.engine.devices import to_device

    sink = DictSink(plan.outputs)
    result.report = run_plan(plan, sink, **run)
    merged = copy.deepcopy(template)
    try:
        merged.load_state_dict(sink.tensors)
    except RuntimeError as e:
        raise ParameterError(
            f"post = {post!r}: the merged model no longer fits the model definition ({e})"
        ) from None
    device = run["devices"][0]
    merged.to(device)
    batches = to_device(list(batches), device)
    if post == "bn_reset":
        count = bn_reset(merged, batches)
        if count == 0:
            result.report.warnings.append("post bn_reset: the model has no BatchNorm (use post: repair)")
    else:
        if alignment is None:
            raise ParameterError("post = 'repair' needs an alignment method (its transforms)")
        states = [{k: r.read(k) for k in r.keys()} for r in spec.models]
        endpoints = [m.to(device) for m in modules_for(template, states)]
        count = repair(merged, endpoints, alignment, batches)
    result.report.warnings.append(f"post {post}: {count} layers re-estimated on {len(batches)} batches")
    state = {
        k: v.detach().to("cpu", sink.tensors[k].dtype)
        for k, v in merged.state_dict().items()
        if k in sink.tensors
    }
    result.provenance = provenance(plan, result.report, started, recipe)
    result.provenance["post"] = post
    if output is None:
        result.state_dict = state
        return result
    with StreamingWriter(output, plan.outputs, parse_size(shard_size), force=force) as writer:
        for name, t in state.items():
            writer.write(name, t.contiguous())
        _write_records(writer, result, spec, recipe, companion)
        result.output = writer.commit()
    return result


def check_memory_budget(plan: MergePlan, max_bytes: int | None) -> None:
    """A budget below the largest job cannot be met: say so, and what the smallest one is."""
    if max_bytes is None or not plan.jobs:
        return
    largest = max(plan.jobs, key=lambda j: j.cost)
    if largest.cost > max_bytes:
        raise ParameterError(
            f"max_memory = {max_bytes:,} bytes is below what one job needs: tensor {largest.name!r} "
            f"needs {largest.cost:,} bytes ({largest.cost / 2**20:.1f} MiB). The smallest budget "
            f"that works is {largest.cost:,} bytes; give at least that (--max-memory)."
        )


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
        "warnings": plan.warnings + report.warnings,
    }
