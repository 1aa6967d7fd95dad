"""mergekit ``slices:`` recipes that merge whole models: the same tensors as mergekit 0.1.5, bit
for bit; slices that stack, drop or reorder layers are refused with a message."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mergekit")
pytest.importorskip("transformers")

from mergekit.config import MergeConfiguration  # noqa: E402

from alloykit.errors import RecipeError  # noqa: E402
from alloykit.recipe.schema import recipe_from_dict  # noqa: E402
from tests.test_mergekit_parity import (  # noqa: E402, F401  (fixtures are used by name)
    _offline,
    assert_same_tensors,
    load_folder,
    models,
    run_alloykit,
    run_mergekit,
)


def _src(path: str, rng: list[int], **parameters: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": path, "layer_range": rng}
    if parameters:
        out["parameters"] = parameters
    return out


def _cases(p: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {
        # the usual published SLERP recipe: one slice over all layers, t a gradient with filters
        "slerp-one-slice": {
            "merge_method": "slerp",
            "base_model": p["base"],
            "slices": [{"sources": [_src(p["base"], [0, 2]), _src(p["ft_b"], [0, 2])]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]},
            "dtype": "float32",
        },
        # TIES with the base among the sources, per-source parameters and the slice's own
        # parameters overriding the top level
        "ties-one-slice": {
            "merge_method": "ties",
            "base_model": p["base"],
            "slices": [
                {
                    "sources": [
                        _src(p["base"], [0, 2]),
                        _src(p["ft_a"], [0, 2], weight=0.7, density=0.5),
                        _src(p["ft_b"], [0, 2], weight=1.3, density=0.3),
                    ],
                    "parameters": {"normalize": False},
                }
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        # two slices over the same models, scalar parameters: a plain merge in two parts
        "task-arithmetic-two-slices": {
            "merge_method": "task_arithmetic",
            "base_model": p["base"],
            "slices": [
                {
                    "sources": [
                        _src(p["base"], [0, 1]),
                        _src(p["ft_a"], [0, 1], weight=0.6),
                        _src(p["ft_b"], [0, 1], weight=0.9),
                    ]
                },
                {
                    "sources": [
                        _src(p["base"], [1, 2]),
                        _src(p["ft_a"], [1, 2], weight=0.6),
                        _src(p["ft_b"], [1, 2], weight=0.9),
                    ]
                },
            ],
            "dtype": "bfloat16",
        },
    }


@pytest.mark.parametrize("case", ["slerp-one-slice", "ties-one-slice", "task-arithmetic-two-slices"])
def test_slices_recipe_gives_mergekits_tensors(case: str, models: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    data = _cases(models)[case]
    theirs = load_folder(run_mergekit(data, tmp_path / "mergekit"))
    ours = load_folder(run_alloykit(data, tmp_path / "alloykit", workers=1))
    assert_same_tensors(ours, theirs)


def _refused(data: dict[str, Any], match: str) -> None:
    MergeConfiguration.model_validate(copy.deepcopy(data))  # mergekit runs it
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(data)


def test_slices_that_are_not_a_plain_merge_are_refused(models: dict[str, str]) -> None:  # noqa: F811
    a, b = models["ft_a"], models["ft_b"]
    stack = {
        "merge_method": "passthrough",
        "slices": [{"sources": [_src(a, [0, 2])]}, {"sources": [_src(b, [0, 2])]}],
    }
    stack["merge_method"] = "linear"
    _refused(stack, r"slices\[1\] starts at layer 0, the previous slice ended at 2: stacking")
    crossed = {"merge_method": "linear", "slices": [{"sources": [_src(a, [0, 1]), _src(b, [1, 2])]}]}
    _refused(crossed, r"sources take different layers \[\(0, 1\), \(1, 2\)\]")
    swapped = {
        "merge_method": "linear",
        "slices": [{"sources": [_src(a, [0, 1])]}, {"sources": [_src(b, [1, 2])]}],
    }
    _refused(swapped, r"slices\[1\] uses other models")
    gradient = {
        "merge_method": "linear",
        "parameters": {"weight": [0.2, 0.8]},
        "slices": [
            {"sources": [_src(a, [0, 1]), _src(b, [0, 1])]},
            {"sources": [_src(a, [1, 2]), _src(b, [1, 2])]},
        ],
    }
    _refused(gradient, r"gradients .* with several slices")
    # a slice that keeps only the first layer: the models have two
    part = {
        "merge_method": "linear",
        "slices": [{"sources": [_src(a, [0, 1], weight=0.5), _src(b, [0, 1], weight=0.5)]}],
    }
    _refused(part, r"the slices cover layers 0–1 but ft_a has 2 layers")
