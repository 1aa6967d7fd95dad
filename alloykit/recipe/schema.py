"""The recipe schema (pydantic) and its loader.

An alloykit recipe::

    method: ties
    preset: paper            # optional; each method lists its presets (alloykit methods)
    base_model: ./base
    models:
      - model: ./ft-math
        parameters: {weight: 1.0, density: 0.2}
        statistics: ./ft-math.stats.safetensors   # methods that read data (esm, regmean, fisher)
      - model: ./ft-code
    parameters: {lambda: 1.0}  # global values; per-model ones here apply to every model
    dtype: float32           # compute dtype ("auto": the inputs' own)
    out_dtype: bfloat16      # written dtype (default: the inputs')
    seed: 0
    keys: strict             # strict | union | intersection
    exclude: ["lm_head"]     # regexes: matching tensors are copied from the base, not merged
    output: {shard_size: 5GB, copy_files_from: ./base}
    device: cuda             # where tensors are merged (default cpu; --device overrides)
    executor: ray            # merge jobs (and an alignment's statistics pass) as Ray tasks
    ray_address: head:6379   # a running Ray cluster (default: a local one)
    tokenizer: {source: union}  # vocabularies that differ: base | union | a model folder

Models trained separately (``method: activation_matching``, ``zipit``, ``mudsc_zip``, ...) add::

    alignment:
      model: mypackage.models:make_resnet   # a factory returning the nn.Module
      data: ./batches.safetensors           # or mypackage.data:batches, or digits/fashion/glyphs
      post: bn_reset                        # none | bn_reset | repair
      exclude_groups: []                    # groups left unaligned
      groups: ./groups.json                 # optional: a group table instead of tracing
      group_batches: 1                      # batches per Ray task of the statistics pass

A parameter value may be a scalar, a gradient over layer depth (a list of numbers) or a list of
``{filter: ..., value: ...}`` conditions (see :func:`alloykit.methods.base.evaluate_setting`).
A file with ``merge_method:`` is read as a mergekit recipe (:mod:`alloykit.recipe.mergekit`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alloykit.errors import RecipeError


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    # calibration statistics of this model (``alloykit calibrate``), for ESM, RegMean, Fisher
    statistics: str | None = None


class OutputOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shard_size: str | int = "5GB"
    copy_files_from: str | None = None
    # dense (a model folder) or lora (the merge minus the base as a PEFT adapter, CLI merge)
    format: Literal["dense", "lora"] = "dense"
    lora_rank: int | None = Field(default=None, ge=1)  # lora: rank of every module (default 16)
    lora_energy: float | None = Field(default=None, gt=0, le=1)  # lora: else this share of ‖Δ‖²


class AlignmentOptions(BaseModel):
    """Models trained separately (weight_matching, activation_matching, zipit, mudsc_*, ...)."""

    model_config = ConfigDict(extra="forbid")
    # the architecture: "package.module:factory" (a callable returning the nn.Module)
    model: str
    # inputs for statistics and post-steps: "package.module:callable", a .safetensors file of
    # batches, or a benchmark dataset name (digits, fashion, glyphs)
    data: str | None = None
    samples: int = Field(default=1000, ge=1)  # images taken from a benchmark dataset
    batch_size: int = Field(default=250, ge=1)
    # batches per Ray task of the statistics pass (executor: ray); sums are folded in batch order
    group_batches: int = Field(default=1, ge=1)
    groups: str | None = None  # a group table (JSON) to use instead of tracing
    exclude_groups: list[str] = Field(default_factory=list)
    self_check: bool = True
    post: Literal["none", "bn_reset", "repair"] = "none"


class TokenizerOptions(BaseModel):
    """Models whose vocabularies differ (mergekit's ``tokenizer_source`` / ``tokenizer:``): the
    output tokenizer (``base``, ``union`` or a model folder) and, per token, where its embedding and
    head rows come from (:mod:`alloykit.io.vocabulary`)."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, Any] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, ge=1)
    # the model whose tokenizer is the base when the recipe's base model is one more input
    # (mergekit's linear with base_model); set by the mergekit translation
    base: str | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    models: list[ModelEntry] = Field(min_length=1)
    base_model: str | None = None
    preset: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str = "float32"
    out_dtype: str | None = None
    seed: int = 0
    keys: Literal["strict", "union", "intersection"] = "strict"
    include: list[str] | None = None
    exclude: list[str] | None = None
    output: OutputOptions = Field(default_factory=OutputOptions)
    alignment: AlignmentOptions | None = None
    # where merged tensors are computed: cpu, cuda, cuda:N, "cuda:0,cuda:1", auto
    device: str | None = None
    # thread (default) or ray; ray_address: a running cluster (default: a local one). With ray the
    # merge jobs and an alignment's statistics pass (a task per batch) run as Ray tasks.
    executor: Literal["thread", "ray"] = "thread"
    ray_address: str | None = None
    # Where the recipe came from ("alloykit" or "mergekit"); set by the loader.
    source_format: str = "alloykit"
    # A mergekit slices: recipe read as models: covered this many layers (checked on loading).
    slice_layers: int | None = None
    # mergekit slices: that stack layers: per model position its (model, start, stop) per slice,
    # and the base's (alloykit.recipe.mergekit_slices); the models are then layer stacks.
    layer_stack: dict[str, Any] | None = None
    # The output's chat template: auto, a name (chatml, llama3, alpaca, mistral) or Jinja.
    chat_template: str | None = None
    # One vocabulary for models whose tokenizers differ (base, union or a model folder).
    tokenizer: TokenizerOptions | None = None
    # Warnings from reading the recipe (e.g. mergekit parameters the method does not use).
    notes: list[str] = Field(default_factory=list)

    def merge_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`alloykit.merge` (besides output and run options)."""
        aligned = {}
        if self.alignment is not None:
            from alloykit.alignment.pipeline import batches_of

            a = self.alignment
            aligned = dict(
                model=a.model,
                data=(lambda: batches_of(a.data, a.samples, a.batch_size)) if a.data else None,
                groups=a.groups,
                exclude_groups=a.exclude_groups,
                self_check=a.self_check,
                post=a.post,
                group_batches=a.group_batches,
            )
        models: list[Any] = [m.model for m in self.models]
        base: Any = self.base_model
        if self.layer_stack is not None:
            from alloykit.recipe.mergekit_slices import open_stacks

            models, stacked_base = open_stacks(self.layer_stack, self.base_model)
            base = stacked_base if stacked_base is not None else base
        return dict(
            **aligned,
            device=self.device,
            executor=self.executor,
            ray_address=self.ray_address,
            models=models,
            statistics=[m.statistics for m in self.models]
            if any(m.statistics for m in self.models)
            else None,
            base_model=base,
            method=self.method,
            preset=self.preset,
            parameters=self.parameters,
            model_parameters=[m.parameters for m in self.models],
            dtype=self.dtype,
            out_dtype=self.out_dtype,
            seed=self.seed,
            keys=self.keys,
            include=self.include,
            exclude=self.exclude,
            shard_size=self.output.shard_size,
            copy_files_from=self.output.copy_files_from,
            notes=list(self.notes),
            chat_template=self.chat_template,
            tokenizer=self.tokenizer.model_dump() if self.tokenizer is not None else None,
        )


def _drop_unused_parameters(data: dict[str, Any]) -> list[str]:
    """mergekit ignores parameters its method does not read (shared recipes often carry e.g.
    ``density`` on ``linear``): drop them from a translated mergekit recipe with a warning each.
    alloykit's own recipes stay strict (an unknown parameter is an error there)."""
    from alloykit.methods import REGISTRY

    method = REGISTRY.get(data.get("method"))
    if method is None:
        return []  # the unknown method is reported by the translation or the merge
    used = {p.name for p in method.params}
    notes = []
    settings = [("parameters", data.get("parameters"))]
    settings += [
        (f"models[{i}].parameters", m.get("parameters")) for i, m in enumerate(data.get("models") or [])
    ]
    for where, params in settings:
        for key in sorted(set(params or {}) - used):
            del params[key]
            notes.append(
                f"mergekit recipe: {where}: {key!r} is not a parameter of {method.name}; "
                "ignored, as mergekit does"
            )
    return notes


def _format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def _resolve_path(p: str | None, folder: Path | None) -> str | None:
    """Paths in a recipe: as given if they exist from the working folder (mergekit's rule),
    else relative to the recipe's own folder."""
    if p is None or folder is None or Path(p).is_absolute() or Path(p).exists():
        return p
    if "+" in p:  # model+adapter (mergekit): each part on its own
        on, adapter = p.rsplit("+", 1)
        return f"{_resolve_path(on, folder)}+{_resolve_path(adapter, folder)}"
    candidate = folder / p
    return str(candidate) if candidate.exists() else p


def recipe_from_dict(data: Any, folder: Path | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping at the top level, got {type(data).__name__}")
    if "merge_method" in data:
        from alloykit.recipe.mergekit import translate_mergekit

        data = translate_mergekit(data)
        data["notes"] = [*data.get("notes", []), *_drop_unused_parameters(data)]
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError("invalid recipe:\n" + _format_errors(e)) from None
    recipe.base_model = _resolve_path(recipe.base_model, folder)
    for m in recipe.models:
        m.model = _resolve_path(m.model, folder)
        m.statistics = _resolve_path(m.statistics, folder)
    recipe.output.copy_files_from = _resolve_path(recipe.output.copy_files_from, folder)
    if recipe.tokenizer is not None:
        tok = recipe.tokenizer
        if tok.source not in ("base", "union"):
            tok.source = _resolve_path(tok.source, folder)
        tok.base = _resolve_path(tok.base, folder)
        for entry in tok.tokens.values():
            src = (entry or {}).get("source")
            if isinstance(src, str):
                entry["source"] = _resolve_path(src, folder)
            elif isinstance(src, dict) and isinstance(src.get("model"), str):
                src["model"] = _resolve_path(src["model"], folder)
    if recipe.layer_stack is not None:
        stack = recipe.layer_stack
        for rows in [*stack["positions"], stack["base"] or []]:
            for row in rows:
                row[0] = _resolve_path(row[0], folder)
    if recipe.slice_layers is not None:
        # slices over whole models are a plain merge; over part of them, a layer stack
        mismatch = _slice_mismatch(recipe)
        if mismatch is None:
            recipe.layer_stack = None
        elif recipe.layer_stack is None:
            raise RecipeError(mismatch)
    if recipe.alignment is not None:
        recipe.alignment.groups = _resolve_path(recipe.alignment.groups, folder)
        data = recipe.alignment.data
        if data is not None and data.endswith(".safetensors"):
            recipe.alignment.data = _resolve_path(data, folder)
    return recipe


def _slice_mismatch(recipe: Recipe) -> str | None:
    """None when every checkpoint of a slices: recipe has the layers its slices cover (adapters:
    their base), else what differs."""
    from alloykit.io.lora import is_adapter
    from alloykit.io.readers import open_checkpoint
    from alloykit.recipe.mergekit_slices import layer_mismatch

    found = []
    for path in [m.model for m in recipe.models] + ([recipe.base_model] if recipe.base_model else []):
        on = path.rsplit("+", 1)[0] if "+" in path and not Path(path).exists() else path
        if is_adapter(on):
            continue
        found.append((on, open_checkpoint(on, on).keys()))
    return layer_mismatch(found, recipe.slice_layers)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} not found") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe {path} is a folder; give the recipe's YAML file") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not a text file (YAML expected)") from None
    except OSError as e:
        from alloykit.io.paths import describe_os_error

        raise RecipeError(f"recipe: {describe_os_error(e, path)}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    return recipe_from_dict(data, path.parent)
