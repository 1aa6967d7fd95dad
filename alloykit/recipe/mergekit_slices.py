"""mergekit's ``slices:`` recipes that are a plain merge of whole models.

Most published mergekit recipes (nearly every SLERP recipe) write their models as one slice
covering every layer::

    slices:
      - sources:
          - {model: A, layer_range: [0, 32]}
          - {model: B, layer_range: [0, 32]}
    merge_method: slerp
    base_model: A
    parameters: {t: [0, 0.5, 1]}

mergekit itself turns ``models:`` into exactly this (one slice, every source over all its layers),
so such a recipe is the ``models:`` recipe with the same entries: gradients run over the layers
of the slice (t = layer / (layers − 1)) as they do over the model, and the embeddings and final
norm / head are merged from the same models. This module rewrites such recipes; recipes that
stack or drop layers (frankenmerges) are refused with a message saying so.

A slice whose layer range does not cover the whole model is not a merge of whole models; the
range is checked against the checkpoints once their paths are known (:func:`check_layer_ranges`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alloykit.errors import RecipeError

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def _is_gradient(value: Any) -> bool:
    if isinstance(value, list):
        if value and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return len(value) > 1
        return any(_is_gradient(c.get("value")) for c in value if isinstance(c, dict))
    if isinstance(value, dict):
        return _is_gradient(value.get("value"))
    return False


def _range(source: dict[str, Any], where: str) -> tuple[int, int]:
    rng = source.get("layer_range")
    if (
        not isinstance(rng, list | tuple)
        or len(rng) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)
        or not 0 <= rng[0] < rng[1]
    ):
        raise RecipeError(
            f"mergekit recipe: {where}: layer_range must be [start, end) with 0 ≤ start < end, got {rng!r}"
        )
    return int(rng[0]), int(rng[1])


def slices_to_models(data: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """``data`` with its ``slices:`` rewritten as ``models:``, and the number of layers the slices
    cover (to be checked against the models). Raises :class:`RecipeError` for slices that do
    something a ``models:`` recipe cannot: stack, drop or reorder layers, or change parameters or
    the base model between slices."""
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        raise RecipeError("mergekit recipe: 'slices:' must be a non-empty list of {sources: [...]}")
    if data.get("models"):
        raise RecipeError("mergekit recipe: give 'slices:' or 'models:', not both")
    frankenmerge = (
        "stacking, dropping or reordering layers (a 'frankenmerge') is not supported yet; alloykit "
        "reads slices: only when they merge whole models"
    )
    models: list[dict[str, Any]] | None = None
    end = 0
    for k, sl in enumerate(slices):
        where = f"slices[{k}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise RecipeError(f"mergekit recipe: {where} needs 'sources:', a list of {{model, layer_range}}")
        unknown = set(sl) - {"sources", "parameters", "base_model"}
        if unknown:
            raise RecipeError(f"mergekit recipe: {where}: unknown keys {sorted(unknown)}")
        ranges = []
        for j, src in enumerate(sl["sources"]):
            if not isinstance(src, dict) or "model" not in src:
                raise RecipeError(f"mergekit recipe: {where}.sources[{j}] needs 'model:' and 'layer_range:'")
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                raise RecipeError(f"mergekit recipe: {where}.sources[{j}]: unknown keys {sorted(extra)}")
            ranges.append(_range(src, f"{where}.sources[{j}]"))
        if len(set(ranges)) != 1:
            lengths = {r[1] - r[0] for r in ranges}
            if len(lengths) != 1:
                raise RecipeError(
                    f"mergekit recipe: {where}: all sources of a slice must span the same number of layers, "
                    f"got ranges {ranges}"
                )
            raise RecipeError(
                f"mergekit recipe: {where}: sources take different layers {ranges}: {frankenmerge}"
            )
        start, stop = ranges[0]
        if start != end:
            raise RecipeError(
                f"mergekit recipe: {where} starts at layer {start}, the previous slice ended at {end}: "
                + frankenmerge
            )
        end = stop
        entries = [{"model": s["model"], "parameters": s.get("parameters") or {}} for s in sl["sources"]]
        if models is None:
            models = entries
        elif entries != models:
            raise RecipeError(
                f"mergekit recipe: {where} uses other models or source parameters than slices[0]: "
                + frankenmerge
            )
    multi = len(slices) > 1
    out = {key: value for key, value in data.items() if key != "slices"}
    params = dict(data.get("parameters") or {})
    for k, sl in enumerate(slices):
        if sl.get("base_model") not in (None, data.get("base_model")):
            raise RecipeError(f"mergekit recipe: slices[{k}] sets another base_model: not supported yet")
        if sl.get("parameters"):
            if multi:
                raise RecipeError(
                    f"mergekit recipe: slices[{k}] sets its own parameters; with several slices that "
                    "is not supported yet (merge them into one slice or move them to the top level)"
                )
            params.update(sl["parameters"])  # a slice's parameters override the top-level ones
    if multi:
        # mergekit interpolates gradients within each slice (t = layer in slice / (n − 1)).
        settings = [params] + [m["parameters"] for m in models or []]
        if any(_is_gradient(v) for s in settings for v in s.values()):
            raise RecipeError(
                "mergekit recipe: gradients (lists of values) with several slices: mergekit restarts the "
                "gradient in every slice; not supported yet (use one slice over all layers)"
            )
    out["parameters"] = params
    out["models"] = models
    return out, end


def count_layers(keys: list[str]) -> int:
    """Number of layers of a checkpoint: 1 + the largest layer index in its tensor names."""
    found = [int(m.group(1)) for k in keys if (m := _LAYER.search(k))]
    return max(found) + 1 if found else 0


def check_layer_ranges(models: list[tuple[str, list[str]]], layers: int) -> None:
    """The slices covered layers 0 … ``layers``: every model must have exactly that many, else the
    recipe would drop layers (mergekit writes a shorter model; alloykit refuses)."""
    for label, keys in models:
        n = count_layers(keys)
        if n != layers:
            raise RecipeError(
                f"mergekit recipe: the slices cover layers 0–{layers} but {Path(label).name or label} "
                f"has {n} layers; keeping only part of a model (a 'frankenmerge') is not supported yet"
            )
