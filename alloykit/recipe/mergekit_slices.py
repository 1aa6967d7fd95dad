"""mergekit's ``slices:`` recipes: merges of whole models, and layer stacks.

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
norm / head are merged from the same models.

Slices that take part of the models, stack layers or take different layers from different models
(frankenmerges) become *layer stacks*: the k-th source of every slice (the base aside, for
methods that take one) is the k-th model of the merge, whose layers are those of its slices in
turn, renumbered; the base is stacked the same way from its sources (:mod:`alloykit.io.stacked`;
the output's config gets the new number of layers). What cannot be written that way is refused
with a message: a different number of sources per slice, source parameters that change between
slices, and, with several slices, parameters per slice or gradients (mergekit restarts a
gradient in every slice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alloykit.errors import RecipeError
from alloykit.io.stacked import count_layers


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


def slices_to_models(
    data: dict[str, Any], base_is_input: bool = False
) -> tuple[dict[str, Any], int | None, dict[str, Any] | None]:
    """``data`` with its ``slices:`` rewritten as ``models:``; the number of layers the slices
    cover when they merge whole models (to be checked against the models), else None and a
    *layer stack*: {"positions": per model position, its (model, start, stop) in each slice;
    "base": the base's (model, start, stop) in each slice, or None}. The k-th source of every
    slice (the base aside, for methods that take one) is the k-th model of the merge, whose layers
    are those of its slices in turn (:mod:`alloykit.io.stacked`).

    Refused with a message: slices whose sources span different numbers of layers, a different
    number of sources per slice, source parameters that change between slices, and, with several
    slices, parameters per slice or gradients (mergekit restarts a gradient in every slice)."""
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        raise RecipeError("mergekit recipe: 'slices:' must be a non-empty list of {sources: [...]}")
    if data.get("models"):
        raise RecipeError("mergekit recipe: give 'slices:' or 'models:', not both")
    base = data.get("base_model")
    table: list[list[tuple[str, int, int, dict[str, Any]]]] = []
    for k, sl in enumerate(slices):
        where = f"slices[{k}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise RecipeError(f"mergekit recipe: {where} needs 'sources:', a list of {{model, layer_range}}")
        unknown = set(sl) - {"sources", "parameters", "base_model"}
        if unknown:
            raise RecipeError(f"mergekit recipe: {where}: unknown keys {sorted(unknown)}")
        if sl.get("base_model") not in (None, base):
            raise RecipeError(f"mergekit recipe: {where} sets another base_model: not supported yet")
        row = []
        for j, src in enumerate(sl["sources"]):
            if not isinstance(src, dict) or "model" not in src:
                raise RecipeError(f"mergekit recipe: {where}.sources[{j}] needs 'model:' and 'layer_range:'")
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                raise RecipeError(f"mergekit recipe: {where}.sources[{j}]: unknown keys {sorted(extra)}")
            start, stop = _range(src, f"{where}.sources[{j}]")
            row.append((src["model"], start, stop, src.get("parameters") or {}))
        lengths = {stop - start for _, start, stop, _ in row}
        if len(lengths) != 1:
            raise RecipeError(
                f"mergekit recipe: {where}: all sources of a slice must span the same number of layers, "
                f"got ranges {[(a, b) for _, a, b, _ in row]}"
            )
        table.append(row)
    multi = len(slices) > 1
    params = dict(data.get("parameters") or {})
    for k, sl in enumerate(slices):
        if sl.get("parameters"):
            if multi:
                raise RecipeError(
                    f"mergekit recipe: slices[{k}] sets its own parameters; with several slices that "
                    "is not supported yet (merge them into one slice or move them to the top level)"
                )
            params.update(sl["parameters"])  # a slice's parameters override the top-level ones
    out = {key: value for key, value in data.items() if key != "slices"}
    out["parameters"] = params
    first = [(m, a, b, p) for m, a, b, p in table[0]]
    plain = all(len({(a, b) for _, a, b, _ in row}) == 1 for row in table)
    plain = plain and [row[0][1] for row in table] == [0] + [row[0][2] for row in table[:-1]]
    plain = plain and all([(m, p) for m, _, _, p in row] == [(m, p) for m, _, _, p in first] for row in table)
    if multi:
        settings = [params] + [p for row in table for *_, p in row]
        if any(_is_gradient(v) for s in settings for v in s.values()):
            raise RecipeError(
                "mergekit recipe: gradients (lists of values) with several slices: mergekit restarts the "
                "gradient in every slice; not supported yet (use one slice over all layers)"
            )
    if plain:
        out["models"] = [{"model": m, "parameters": p} for m, _, _, p in first]
        try:  # kept in case the models have more layers than the slices take
            _, layer_stack = _stack(table, base, base_is_input)
        except RecipeError:
            layer_stack = None
        return out, table[-1][0][2], layer_stack
    out["models"], layer_stack = _stack(table, base, base_is_input)
    return out, None, layer_stack


def _stack(
    table: list[list[tuple[str, int, int, dict[str, Any]]]], base: str | None, base_is_input: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The models of a layer stack (one per source position) and its description."""
    keyed = []
    base_rows = []
    for k, row in enumerate(table):
        others = [e for e in row if base_is_input or base is None or e[0] != base]
        mine = [e for e in row if not (base_is_input or base is None) and e[0] == base]
        if not base_is_input and base is not None:
            if len(mine) != 1:
                raise RecipeError(
                    f"mergekit recipe: slices[{k}] must list the base model {base} once among its sources "
                    "(its layers there are the base of that slice, as in mergekit)"
                )
            base_rows.append(list(mine[0][:3]))
        keyed.append(others)
    counts = {len(r) for r in keyed}
    if len(counts) != 1 or 0 in counts:
        raise RecipeError(
            "mergekit recipe: every slice needs the same number of sources (besides the base) for alloykit "
            f"to stack them; got {[len(r) for r in keyed]}"
        )
    positions = []
    models = []
    for p in range(len(keyed[0])):
        entries = [row[p] for row in keyed]
        if any(e[3] != entries[0][3] for e in entries):
            raise RecipeError(
                f"mergekit recipe: source {p} has different parameters in different slices; not supported yet"
            )
        positions.append([list(e[:3]) for e in entries])
        models.append({"model": entries[0][0], "parameters": entries[0][3]})
    return models, {"positions": positions, "base": base_rows or None}


def layer_mismatch(models: list[tuple[str, list[str]]], layers: int) -> str | None:
    """The slices covered layers 0 … ``layers``: None when every model has exactly that many (a
    plain merge), else what differs (the recipe is then a layer stack)."""
    for label, keys in models:
        n = count_layers(keys)
        if n != layers:
            name = Path(label).name or label
            return f"mergekit recipe: the slices cover layers 0–{layers} but {name} has {n} layers"
    return None


def open_stacks(layer_stack: dict[str, Any], base: str | None) -> tuple[list[Any], Any]:
    """Readers for a layer stack (:func:`slices_to_models`): one per model position, and the
    base's stack (None when the base is not stacked)."""
    from alloykit.io.readers import open_checkpoint
    from alloykit.io.stacked import stack

    opened: dict[str, Any] = {}

    def reader(path: str) -> Any:
        if path not in opened:
            opened[path] = open_checkpoint(path, path)
        return opened[path]

    def build(label: str, rows: list[list[Any]]) -> Any:
        parts = [(reader(m), int(a), int(b)) for m, a, b in rows]
        return stack(label, parts, parts[0][0], parts[-1][0])

    models = [build(f"stack {p} ({rows[0][0]}, …)", rows) for p, rows in enumerate(layer_stack["positions"])]
    based = build(f"base stack ({base})", layer_stack["base"]) if layer_stack.get("base") else None
    return models, based
