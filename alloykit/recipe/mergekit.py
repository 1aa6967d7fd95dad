"""Reading mergekit's YAML (``merge_method``, ``models``, ``base_model``, ``parameters``,
``dtype``, ``out_dtype``) into an alloykit :class:`~alloykit.recipe.schema.Recipe`.

Each supported mergekit method maps to an alloykit method with its ``mergekit`` preset, which
reproduces mergekit 0.1.5's arithmetic. mergekit computes in ``dtype`` (or the inputs' own
dtype when it is absent) and writes ``out_dtype``, else the method's result as it is: in the
compute dtype, but float32 for ``arcee_fusion`` and ``ramplus_tl`` on half-precision inputs; so
does the translation. Parameters mergekit requires (slerp's and nearswap's ``t``, nuslerp's and
multislerp's ``weight``) are required here too. What is not supported yet is refused with a
message that names it.
"""

from __future__ import annotations

from typing import Any

from alloykit.errors import RecipeError

# mergekit name -> (alloykit method, preset)
METHODS: dict[str, tuple[str, str]] = {
    "linear": ("linear", "mergekit"),
    "task_arithmetic": ("task_arithmetic", "mergekit"),
    "ties": ("ties", "mergekit"),
    "dare_linear": ("dare", "mergekit"),
    "dare_ties": ("dare", "mergekit_ties"),
    "breadcrumbs": ("breadcrumbs", "mergekit"),
    "breadcrumbs_ties": ("breadcrumbs_ties", "mergekit"),
    "della": ("della", "mergekit"),
    "della_linear": ("della_linear", "mergekit"),
    "slerp": ("slerp", "mergekit"),
    "model_stock": ("model_stock", "mergekit"),
    "nuslerp": ("nuslerp", "mergekit"),
    "multislerp": ("multislerp", "mergekit"),
    "karcher": ("karcher", "mergekit"),
    "sce": ("sce", "mergekit"),
    "nearswap": ("nearswap", "mergekit"),
    "arcee_fusion": ("arcee_fusion", "mergekit"),
    "passthrough": ("passthrough", "mergekit"),
    "ram": ("ram", "mergekit"),
    "ramplus_tl": ("ramplus_tl", "mergekit"),
}
# Methods for which mergekit's base_model is one more input (its contract ignores the base): it
# stays where it is listed in models, or comes last when it is not listed.
_BASE_IS_INPUT = {"linear", "karcher", "passthrough"}
# Parameters mergekit requires (no default): per method, the name and whether it is per model.
_REQUIRED = {
    "slerp": ("t", False),
    "nearswap": ("t", False),
    "nuslerp": ("weight", True),
    "multislerp": ("weight", True),
}
# Methods whose result mergekit leaves in float32 for half-precision inputs (a float32 mask or
# coefficient): without out_dtype, mergekit writes those float32 tensors as they are.
_FLOAT32_RESULT = {"arcee_fusion", "ramplus_tl"}
# mergekit parameter -> alloykit parameter, per method (values pass unchanged).
_RENAMED = {"nuslerp": {"nuslerp_flatten": "flatten", "nuslerp_row_wise": "row_wise"}}
# mergekit's default ``normalize`` per method (its GeneralizedTaskArithmeticMerge table).
_NORMALIZE_DEFAULT = {
    "ties": True,
    "dare_ties": False,
    "dare_linear": False,
    "breadcrumbs": False,
    "breadcrumbs_ties": False,
    "della": True,
    "della_linear": False,
}
# Methods whose ``rescale: true/false`` is alloykit's ``rescale: l1/none``.
_RESCALE_L1 = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
_TOP_LEVEL = {
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "slices",
    "modules",
    "name",
}


def _bool_to(value: Any, true: str, false: str, what: str) -> str:
    if not isinstance(value, bool):
        raise RecipeError(
            f"mergekit parameter {what!r} = {value!r}: alloykit reads only a plain "
            "true/false here (no filters or gradients yet)"
        )
    return true if value else false


def _translate_params(params: dict[str, Any], method: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if key == "int8_mask":
            continue  # only changes the mask's dtype in mergekit, not the result
        if key == "normalize" and method in _NORMALIZE_DEFAULT:
            out["aggregate"] = _bool_to(value, "weighted_mean", "sum", key)
        elif key == "rescale" and method in _RESCALE_L1:
            out["rescale"] = _bool_to(value, "l1", "none", key)
        elif key == "filter_wise" and method == "model_stock":
            # mergekit's filter_wise: one ratio per vector along the last axis
            out["granularity"] = _bool_to(value, "last_axis", "tensor", key)
        elif key in _RENAMED.get(method, {}):
            out[_RENAMED[method][key]] = value
        else:
            out[key] = value
    return out


def _local(ref: Any, what: str) -> str:
    if isinstance(ref, dict):
        ref = ref.get("model")
    if not isinstance(ref, str):
        raise RecipeError(f"{what}: expected a model path, got {ref!r}")
    if "@" in ref:
        raise RecipeError(
            f"{what} {ref!r}: revisions are not supported; alloykit reads local "
            "folders only (it never downloads)"
        )
    return ref


def translate_mergekit(data: dict[str, Any]) -> dict[str, Any]:
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise RecipeError(f"mergekit recipe: unknown keys {sorted(unknown)}")
    if "modules" in data:
        raise RecipeError("mergekit recipe: 'modules:' (multi-module merges) is not supported yet")
    slice_layers = layer_stack = None
    if "slices" in data:
        from alloykit.recipe.mergekit_slices import slices_to_models

        name = data.get("merge_method")
        data, slice_layers, layer_stack = slices_to_models(data, base_is_input=name in _BASE_IS_INPUT)
    tokenizer = _tokenizer(data)
    name = data["merge_method"]
    if name not in METHODS:
        raise RecipeError(f"mergekit method {name!r} is not supported yet; supported: {', '.join(METHODS)}")
    method, preset = METHODS[name]
    base = _local(data["base_model"], "base_model") if data.get("base_model") else None
    base_is_input = name in _BASE_IS_INPUT
    models = []
    for entry in data.get("models") or []:
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(f"mergekit recipe: each entry of models needs 'model:', got {entry!r}")
        ref = _local(entry["model"], "models")
        if base is not None and ref == base and not base_is_input:
            continue  # mergekit lists the base among the models; methods that take a base skip it
        models.append({"model": ref, "parameters": _translate_params(entry.get("parameters") or {}, name)})
    listed = [m["model"] for m in models]
    if base_is_input and base is not None and base not in listed and layer_stack is None:
        # mergekit adds a base that is not listed as one more input (the last).
        models.append({"model": base, "parameters": {}})
    _require(name, data.get("parameters") or {}, models)
    dtype = data.get("dtype") or "auto"
    out_dtype = data.get("out_dtype") or (None if dtype == "auto" else dtype)
    wide = str(dtype).removeprefix("torch.") == "float64"
    if name in _FLOAT32_RESULT and not data.get("out_dtype") and not wide:
        # (with dtype absent and float64 inputs mergekit writes float64: a known difference)
        out_dtype = "float32"
    return {
        "method": method,
        "preset": preset,
        "base_model": base if not base_is_input else None,
        "models": models,
        "parameters": _translate_params(data.get("parameters") or {}, name),
        "dtype": dtype,
        "out_dtype": out_dtype,
        "source_format": "mergekit",
        "chat_template": data.get("chat_template"),
        **({"tokenizer": {**tokenizer, "base": base if base_is_input else None}} if tokenizer else {}),
        **({"slice_layers": slice_layers} if slice_layers is not None else {}),
        **({"layer_stack": layer_stack} if layer_stack is not None else {}),
    }


def _tokenizer(data: dict[str, Any]) -> dict[str, Any] | None:
    """mergekit's ``tokenizer_source`` (``base``, ``union`` or a model) or ``tokenizer:`` block
    (``source``, ``tokens``, ``pad_to_multiple_of``; it wins over ``tokenizer_source``, as in
    mergekit) as alloykit's ``tokenizer:`` options."""
    block = data.get("tokenizer")
    if block is not None:
        if not isinstance(block, dict):
            raise RecipeError(f"mergekit recipe: tokenizer: expected a mapping, got {block!r}")
        unknown = set(block) - {"source", "tokens", "pad_to_multiple_of"}
        if unknown:
            raise RecipeError(f"mergekit recipe: tokenizer: unknown keys {sorted(unknown)}")
        out = {"source": block.get("source", "union")}
        tokens = {}
        for token, entry in (block.get("tokens") or {}).items():
            entry = dict(entry or {})
            src = entry.get("source")
            if isinstance(src, dict) and "kind" not in src and "model" in src:
                src = src["model"]  # a model reference written as a mapping
            if isinstance(src, dict) and src.get("kind") == "model_token":
                src = {**src, "model": _local(src.get("model"), f"tokenizer tokens {token!r}")}
            elif src is not None and not isinstance(src, dict):
                src = _local(src, f"tokenizer tokens {token!r}")
            tokens[token] = {"source": src, "force": bool(entry.get("force", False))}
        out["tokens"] = tokens
        if block.get("pad_to_multiple_of") is not None:
            out["pad_to_multiple_of"] = block["pad_to_multiple_of"]
    elif data.get("tokenizer_source") is not None:
        out = {"source": data["tokenizer_source"]}
    else:
        return None
    if out["source"] not in ("base", "union"):
        out["source"] = _local(out["source"], "tokenizer source")
    return out


def _require(name: str, params: dict[str, Any], models: list[dict[str, Any]]) -> None:
    """mergekit refuses a recipe without its required parameters; so does the translation (alloykit's
    own defaults would otherwise merge what mergekit never would)."""
    if name not in _REQUIRED:
        return
    key, per_model = _REQUIRED[name]
    if key in params:
        return
    if not per_model:
        raise RecipeError(
            f"mergekit recipe: {name} needs 'parameters: {{{key}: ...}}' (mergekit requires it)"
        )
    missing = [m["model"] for m in models if key not in m["parameters"]]
    if missing:
        raise RecipeError(
            f"mergekit recipe: {name} needs '{key}' for every model (mergekit requires it), in "
            f"parameters: or in each model's parameters; missing for {', '.join(missing)}"
        )
