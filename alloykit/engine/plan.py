"""Planning a merge: one job per output tensor, checked before any data is read.

The plan knows which models hold each tensor, its output shape and dtype, the parameters the
method gets for it (resolved and validated up front), and what it will cost in bytes read,
written and held. It knows the method only through the :class:`MergeMethod` contract.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from alloykit.errors import MismatchError, ParameterError
from alloykit.io.readers import CheckpointReader, TensorMeta
from alloykit.methods.base import MergeMethod

KeyPolicy = Literal["strict", "union", "intersection"]
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


@dataclass
class MergeSpec:
    """Everything the engine needs; built by :mod:`alloykit.api` from paths or a recipe."""

    models: list[CheckpointReader]
    method: MergeMethod
    base: CheckpointReader | None = None
    preset: str | None = None
    global_params: dict[str, Any] = field(default_factory=dict)
    model_params: list[dict[str, Any]] | None = None
    # None ("auto"): the promoted dtype of a tensor's inputs, as mergekit does without ``dtype``.
    compute_dtype: torch.dtype | None = torch.float32
    # None: the promoted dtype of a tensor's inputs (their own dtype when they agree).
    out_dtype: torch.dtype | None = None
    keys: KeyPolicy = "strict"
    include: list[str] | None = None  # regexes; tensors not matched are copied, not merged
    exclude: list[str] | None = None
    seed: int = 0
    check_finite: bool = True
    # max ‖θ_t − θ_0‖ / ‖θ_0‖, measured on the first slice (chunk_elements) of every tensor
    base_check: float | None = 0.5
    # Elementwise merges run on slices of this many elements (a fixed constant: DARE's random
    # masks are drawn per slice, so the slicing is part of the result).
    chunk_elements: int = 1 << 20
    # Calibration statistics per model (methods that declare ``statistics``), aligned with models.
    statistics: list[Any] | None = None
    # For methods that declare an aligner: per group transforms (alloykit.alignment.Alignment).
    alignment: Any = None


@dataclass
class TensorJob:
    name: str
    out: TensorMeta
    sources: list[int]  # indices into spec.models holding this tensor
    merge: bool  # False: copied from ``copy_from``
    copy_from: int  # reader index (len(models) = the base) to copy from when not merged
    params: dict[str, Any]
    read_bytes: int
    cost: int  # bytes held while the job runs (planning estimate, statistics included)
    compute_dtype: torch.dtype | None = None  # inputs are cast to this before the method
    # A slice of the flattened tensor (elementwise methods are streamed in chunks so that no
    # job holds a whole embedding); ``length=None`` means the whole tensor.
    start: int = 0
    length: int | None = None
    # For a slice of whole rows of a row-wise method: the shape the method sees,
    # (rows, *shape[1:]); ``None``: the whole tensor, or a flat slice.
    view: tuple[int, ...] | None = None


@dataclass
class MergePlan:
    spec: MergeSpec
    jobs: list[TensorJob]
    reduction_passes: int
    global_params: dict[str, Any]
    warnings: list[str]
    # tensors some input holds that the output does not (keys union/intersection; always warned)
    skipped: list[str] = field(default_factory=list)

    @property
    def outputs(self) -> list[TensorMeta]:
        """The output tensors, once each, in plan order."""
        return list({j.name: j.out for j in self.jobs}.values())

    @property
    def merged_names(self) -> set[str]:
        return {j.name for j in self.jobs if j.merge}

    @property
    def write_bytes(self) -> int:
        return sum(m.nbytes for m in self.outputs)

    @property
    def read_bytes(self) -> int:
        merged = sum(j.read_bytes for j in self.jobs if j.merge)
        return sum(j.read_bytes for j in self.jobs) + self.reduction_passes * merged

    def parameters_used(self) -> dict[str, Any]:
        """The values the method receives: one value for a parameter that is the same for every
        merged tensor, else ``{"by_tensor": {name: value}}`` (conditions and gradients)."""
        by_tensor: dict[str, dict[str, Any]] = {}
        for j in self.jobs:
            if j.merge and j.name not in by_tensor:
                by_tensor[j.name] = j.params
        declared = {p.py_name: p.name for p in self.spec.method.params}  # lambda_ -> lambda
        out: dict[str, Any] = {}
        for key, default in self.global_params.items():
            values = {name: p[key] for name, p in by_tensor.items()}
            distinct = {repr(v) for v in values.values()}
            name = declared.get(key, key)
            if len(distinct) > 1:
                out[name] = {"by_tensor": values}
            else:
                out[name] = next(iter(values.values())) if values else default
        return out

    def default_budget(self, workers: int) -> int:
        """The bytes in flight allowed when the user sets no bound: the largest job plus the
        next-largest tier for the other workers. Equal-sized jobs (streamed slices) are not
        held back; two of a few outsized jobs (an embedding and an LM head under an SVD
        method) do not run at once, so the peak stays near the largest job."""
        costs = sorted((j.cost for j in self.jobs), reverse=True)
        if not costs:
            return 0
        tier = costs[min(workers, len(costs) - 1)]
        return costs[0] + max(0, workers - 1) * tier

    def peak_estimate(self, workers: int, max_bytes: int | None) -> int:
        costs = sorted((j.cost for j in self.jobs), reverse=True)
        if not costs:
            return 0
        top = sum(costs[:workers])
        bound = max_bytes if max_bytes else self.default_budget(workers)
        return min(top, max(bound, costs[0]))


def _layer_position(names: list[str]) -> dict[str, float]:
    """Depth t ∈ [0, 1] of each tensor for gradient parameters (mergekit: layer / (L − 1);
    tensors outside the numbered layers get 0)."""
    idx = {n: int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    n_layers = max(idx.values()) + 1 if idx else 0
    out = {}
    for n in names:
        if n in idx:
            out[n] = idx[n] / (n_layers - 1) if n_layers > 1 else 1.0
        else:
            out[n] = 0.0
    return out


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _describe_missing(
    readers: list[CheckpointReader], key_sets: list[set[str]], reference: set[str], ref_label: str
) -> str:
    lines = []
    for r, ks in zip(readers, key_sets, strict=True):
        missing, extra = sorted(reference - ks), sorted(ks - reference)
        parts = [
            f"{len(v)} {what} (e.g. {v[:3]})" for v, what in ((missing, "missing"), (extra, "extra")) if v
        ]
        if parts:
            lines.append(f"  {r.label}: {', '.join(parts)} compared with {ref_label}")
    return "\n".join(lines)


_VOCABULARY = re.compile(r"embed|lm_head|wte|word_embeddings|(^|\.)output\.weight$")


def _different_shapes(name: str, metas: dict[int, TensorMeta], readers: list[CheckpointReader]) -> str:
    listing = ", ".join(f"{readers[i].label}: {list(m.shape)}" for i, m in metas.items())
    message = f"tensor {name!r} has different shapes across models ({listing})"
    rows = {m.shape[0] for m in metas.values() if m.shape}
    rest = {m.shape[1:] for m in metas.values()}
    if _VOCABULARY.search(name) and len(rows) > 1 and len(rest) == 1:
        message += (
            f": the models' vocabularies differ ({' vs '.join(str(r) for r in sorted(rows))} tokens). "
            "give the output's tokenizer to map their rows into one vocabulary: recipe tokenizer: "
            "{source: union} (or base, or a model folder; mergekit recipes: tokenizer_source), "
            "--tokenizer-source union, or tokenizer='union' in the API; or exclude the embedding and "
            "head (exclude: [embed, lm_head]) to take them from the base, whose tokenizer is copied"
        )
    return message


def plan_merge(spec: MergeSpec) -> MergePlan:
    method = spec.method
    n = len(spec.models)
    if n == 0:
        raise ParameterError("no models to merge: give at least one model")
    if n < method.min_models:
        raise ParameterError(f"{method.name} needs at least {method.min_models} models, got {n}")
    if method.max_models is not None and n > method.max_models:
        raise ParameterError(f"{method.name} takes at most {method.max_models} models, got {n}")
    if method.needs_base and spec.base is None:
        raise ParameterError(
            f"{method.name} needs a base model (the model the others were fine-tuned from): give base_model"
        )
    model_params = spec.model_params or [{} for _ in range(n)]
    if len(model_params) != n:
        raise ParameterError(f"{len(model_params)} per-model parameter sets for {n} models")

    readers = list(spec.models) + ([spec.base] if spec.base is not None else [])
    key_sets = [set(r.keys()) for r in readers]
    reference = key_sets[-1] if spec.base is not None else key_sets[0]
    ref_label = readers[-1].label if spec.base is not None else readers[0].label
    warnings: list[str] = []
    if spec.keys == "strict":
        if any(ks != reference for ks in key_sets):
            raise MismatchError(
                "models do not hold the same tensors:\n"
                + _describe_missing(readers, key_sets, reference, ref_label)
                + "\nPass keys='union' (--keys union) to merge what each has, or "
                "keys='intersection' to keep only the tensors all have."
            )
        names = set(reference)
    elif spec.keys == "intersection":
        names = set.intersection(*key_sets)
        dropped = set.union(*key_sets) - names
        if dropped:
            warnings.append(
                f"{len(dropped)} tensors not held by every model are left out, e.g. {sorted(dropped)[:3]}"
            )
    elif spec.keys == "union":
        # The output keeps the architecture of the reference (the base, else the first model):
        # a tensor some models lack is merged from those that have it; a tensor the reference
        # lacks (an adapter's lora_A, a head of another task) is left out, never written.
        names = set(reference)
        dropped = set.union(*key_sets) - names
        if dropped:
            holders = sorted({r.label for r, ks in zip(readers, key_sets, strict=True) if ks - names})
            warnings.append(
                f"{len(dropped)} tensors that {ref_label} does not have are left out (held by "
                f"{', '.join(holders)}), e.g. {sorted(dropped)[:3]}"
            )
    else:
        raise ParameterError(f"keys={spec.keys!r} is not allowed; expected strict, union or intersection")
    skipped = sorted(set.union(*key_sets) - names, key=_natural_key)
    ordered = sorted(names, key=_natural_key)
    depth = _layer_position(ordered)

    check_statistics(spec, readers, key_sets)
    if method.alignment is not None and spec.alignment is None:
        raise ParameterError(
            f"{method.name} aligns models trained separately: give the model definition (model=, a module or "
            "'package.module:factory') and, for activation-based methods, data= (batches of inputs)"
        )
    if spec.alignment is not None:
        if method.alignment is None:
            raise ParameterError(f"{method.name} does not use an alignment; remove it")
        if spec.alignment.n_models != n:
            raise ParameterError(f"the alignment is for {spec.alignment.n_models} models, {n} are given")
    include = [re.compile(p) for p in spec.include or []]
    exclude = [re.compile(p) for p in spec.exclude or []]
    global_resolved = method.resolve(n, spec.preset, spec.global_params, model_params)

    jobs: list[TensorJob] = []
    base_index = n if spec.base is not None else None
    for name in ordered:
        holders = [i for i in range(len(readers)) if name in key_sets[i]]
        metas = {i: readers[i].meta(name) for i in holders}
        shapes = {m.shape for m in metas.values()}
        wanted = (not include or any(p.search(name) for p in include)) and not any(
            p.search(name) for p in exclude
        )
        if len(shapes) > 1:
            if wanted:
                raise MismatchError(_different_shapes(name, metas, readers))
            # excluded: taken from the reference (the base, else the first model) alone
            ref = base_index if base_index in metas else holders[0]
            warnings.append(
                f"{name}: shapes differ between models; excluded, so copied from {readers[ref].label}"
            )
            holders, metas = [ref], {ref: metas[ref]}
        sources = [i for i in holders if i != base_index]
        src_meta = metas[base_index] if base_index in metas else metas[holders[0]]
        floating = all(m.dtype.is_floating_point for m in metas.values())
        merge = floating and wanted and bool(sources) and (not method.needs_base or base_index in metas)
        if floating and wanted and sources and not merge:
            warnings.append(f"{name}: not in the base model, copied from {readers[sources[0]].label}")
        promoted = src_meta.dtype
        if floating:
            for m in metas.values():
                promoted = torch.promote_types(promoted, m.dtype)
        out_dtype = spec.out_dtype if (spec.out_dtype is not None and floating) else promoted
        out_shape = src_meta.shape
        aligned = spec.alignment is not None and name in spec.alignment.params()
        if aligned:
            out_shape = spec.alignment.merged_shape(name, src_meta.shape)
        out = TensorMeta(name, out_shape, out_dtype)
        compute = spec.compute_dtype or promoted
        copy_from = base_index if base_index in metas else holders[0]
        numel = src_meta.numel
        if merge:
            params = method.resolve(
                len(sources),
                spec.preset,
                spec.global_params,
                [model_params[i] for i in sources],
                name,
                depth[name],
            )
            readers_used = len(holders)
            k = len(sources)
            split = method.is_elementwise(params) and not aligned
        else:
            params = {}
            readers_used = len(holders)  # every copy is read: digests, non-float agreement
            split = True  # a copy is elementwise
        stat_bytes = 0
        if merge and spec.statistics is not None:
            stat_bytes = sum(spec.statistics[i].nbytes(name) for i in sources)
            split = split and stat_bytes == 0  # statistics belong to the whole tensor
        per_elem, working = 0.0, 0  # the method's own bytes: per element, or for the whole tensor
        if merge and method.working_bytes is not None:
            working = method.working_bytes(params, tuple(src_meta.shape), k, stat_bytes > 0)
        elif merge:
            factor = method.memory_factor
            factor = factor(params) if callable(factor) else factor
            per_elem = (k + 1) * compute.itemsize * (1 + factor)
        per_elem += readers_used * src_meta.dtype.itemsize + out_dtype.itemsize
        step = spec.chunk_elements if split and spec.chunk_elements else max(numel, 1)
        row = 0  # elements per row when the tensor is streamed in slices of whole rows
        if (
            merge
            and not split
            and not aligned
            and stat_bytes == 0
            and spec.chunk_elements
            and numel
            and len(src_meta.shape) >= 2
            and method.is_rowwise(params)
        ):
            row = numel // src_meta.shape[0]
            step = max(1, spec.chunk_elements // row) * row
        for start in range(0, max(numel, 1), step):
            length = min(step, numel - start) if numel else 0
            whole = length == numel
            view = (length // row, *src_meta.shape[1:]) if row and not whole else None
            jobs.append(
                TensorJob(
                    name,
                    out,
                    sources,
                    merge,
                    copy_from,
                    params,
                    read_bytes=readers_used * length * src_meta.dtype.itemsize + stat_bytes,
                    cost=int(per_elem * length + working * length / max(numel, 1)) + 3 * stat_bytes,
                    compute_dtype=compute,
                    start=start,
                    length=None if whole else length,
                    view=view,
                )
            )
    if method.check is not None:
        checked: set[str] = set()
        for job in jobs:
            if job.merge and job.name not in checked:
                checked.add(job.name)
                method.check(job.params, f" (tensor {job.name!r})")
    passes = method.reduction.passes(global_resolved) if method.reduction else 0
    if passes:
        _refuse_per_tensor_values(method, global_resolved, jobs)
    for p in method.params:
        if p.noop_at is None:
            continue
        value = global_resolved[p.py_name]
        if p.per_model:
            hits = [i for i, v in enumerate(value) if v == p.noop_at]
            if hits:
                who = ", ".join(readers[i].label for i in hits)
                warnings.append(
                    f"{method.name}: {p.name} = {p.noop_at:g} for {who}: that model's part is dropped"
                )
        elif value == p.noop_at:
            warnings.append(f"{method.name}: {p.name} = {p.noop_at:g}: every model's part is dropped")
    if method.ignores is not None:
        given = set(spec.global_params).union(*(set(p) for p in model_params))
        for pname, why in method.ignores(global_resolved).items():
            if pname in given:
                warnings.append(f"{method.name}: parameter {pname!r} has no effect: {why}")
    return MergePlan(spec, jobs, passes, global_resolved, warnings, skipped)


def check_statistics(spec: MergeSpec, readers: list[CheckpointReader], key_sets: list[set[str]]) -> None:
    """Statistics are checked before any tensor is read: one source per model when the method
    reads them, every entry naming a tensor of that model, with a matching input width (or
    shape), and the tokenizer they were computed with matching the model's own."""
    method = spec.method
    n = len(spec.models)
    if method.statistics is None:
        if spec.statistics is not None and any(s is not None for s in spec.statistics):
            raise ParameterError(f"{method.name} does not use calibration statistics; remove them")
        return
    if spec.statistics is None or len(spec.statistics) != n or any(s is None for s in spec.statistics):
        given = 0 if spec.statistics is None else sum(s is not None for s in spec.statistics)
        raise ParameterError(
            f"{method.name} needs calibration statistics ({method.statistics}) for each of the {n} models, "
            f"got {given}: run `alloykit calibrate MODEL --data FILE -o stats.safetensors` for each "
            "fine-tuned model and give it as the model's `statistics:` in the recipe (statistics= in the API)"
        )
    from alloykit.calibration.data import tokenizer_fingerprint
    from alloykit.calibration.statistics import statistics_label

    for i, source in enumerate(spec.statistics):
        reader = readers[i]
        where = statistics_label(source, reader.label)
        kind = (getattr(source, "meta", {}) or {}).get("kind")
        if kind is not None and kind != method.statistics:
            raise MismatchError(f"{where}: hold {kind} statistics; {method.name} needs {method.statistics}")
        stored = ((getattr(source, "meta", {}) or {}).get("model") or {}).get("tokenizer")
        own = tokenizer_fingerprint(reader.folder) if stored else None
        if stored and own and stored != own:
            raise MismatchError(
                f"{where}: computed with another tokenizer than the one in {reader.folder}; calibrate this "
                "model with its own tokenizer"
            )
        names = source.names()
        if not names:
            raise MismatchError(f"{where}: holds no statistics")
        for name in names:
            if name not in key_sets[i]:
                raise MismatchError(
                    f"{where}: has statistics for tensor {name!r}, which {reader.label} does not hold: "
                    "statistics of another model?"
                )
            info = source.info(name)
            shape = reader.meta(name).shape
            if "fisher" in info:
                if tuple(info["fisher"]) != tuple(shape):
                    raise MismatchError(
                        f"{where}: Fisher of {name!r} has shape {list(info['fisher'])}, "
                        f"the tensor {list(shape)}"
                    )
                continue
            d_in = info["gram"][0] if "gram" in info else info["inputs"][1]
            if len(shape) != 2 or d_in != shape[0 if info.get("transposed") else 1]:
                raise MismatchError(
                    f"{where}: input statistics of {name!r} are {d_in} wide, the tensor's input side is "
                    f"{list(shape)}: statistics of another model?"
                )


def _refuse_per_tensor_values(
    method: MergeMethod, global_resolved: dict[str, Any], jobs: list[TensorJob]
) -> None:
    """A parameter a whole-model statistic reads once cannot take a per-tensor value (a
    condition or a gradient): the statistic would silently use the model-wide one."""
    model_wide = getattr(method.reduction, "model_wide", None)
    wide = model_wide(global_resolved) if model_wide is not None else {}
    for pname, hint in wide.items():
        key = method.param(pname).py_name
        for job in jobs:
            if job.merge and job.params[key] != global_resolved[key]:
                raise ParameterError(
                    f"{method.name}: parameter {pname!r} is {job.params[key]} for tensor {job.name!r} "
                    f"but {global_resolved[key]} for the model as a whole: {hint}"
                )
