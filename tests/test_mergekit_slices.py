"""mergekit ``slices:`` recipes, merges of whole models and layer stacks (frankenmerges): the
same tensors and number of layers as mergekit 0.1.5, bit for bit; what alloykit cannot stack is
refused with a message."""

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


def _stacks(p: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {
        # layer stacking: all of A, then A's last layer again from B (3 layers from models of 2)
        "passthrough-stack": {
            "merge_method": "passthrough",
            "slices": [{"sources": [_src(p["ft_a"], [0, 2])]}, {"sources": [_src(p["ft_b"], [1, 2])]}],
            "dtype": "bfloat16",
        },
        # one layer of each, averaged: sources that take different layers
        "linear-crossed": {
            "merge_method": "linear",
            "slices": [
                {"sources": [_src(p["ft_a"], [0, 1], weight=0.3), _src(p["ft_b"], [1, 2], weight=0.7)]}
            ],
            "dtype": "float32",
        },
        # a task-vector method over stacks: the base's layers follow the slices too
        "task-arithmetic-stack": {
            "merge_method": "task_arithmetic",
            "base_model": p["base"],
            "slices": [
                {"sources": [_src(p["base"], [0, 2]), _src(p["ft_a"], [0, 2], weight=0.5)]},
                {"sources": [_src(p["base"], [1, 2]), _src(p["ft_b"], [1, 2], weight=0.5)]},
            ],
            "dtype": "float32",
        },
        # the first layer only, of both models
        "slerp-first-layer": {
            "merge_method": "slerp",
            "base_model": p["base"],
            "slices": [{"sources": [_src(p["base"], [0, 1]), _src(p["ft_b"], [0, 1])]}],
            "parameters": {"t": 0.4},
            "dtype": "float32",
        },
    }


@pytest.mark.parametrize(
    "case", ["passthrough-stack", "linear-crossed", "task-arithmetic-stack", "slerp-first-layer"]
)
def test_layer_stacks_give_mergekits_model(case: str, models: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    from transformers import AutoConfig, LlamaForCausalLM

    data = _stacks(models)[case]
    theirs = load_folder(run_mergekit(data, tmp_path / "mergekit"))
    ours = load_folder(run_alloykit(data, tmp_path / "alloykit", workers=1))
    assert_same_tensors(ours, theirs)
    layers = 1 + max(int(k.split(".")[2]) for k in ours if k.startswith("model.layers."))
    expected = {
        "passthrough-stack": 3,
        "linear-crossed": 1,
        "task-arithmetic-stack": 3,
        "slerp-first-layer": 1,
    }
    assert layers == expected[case]
    assert AutoConfig.from_pretrained(tmp_path / "alloykit").num_hidden_layers == layers
    assert AutoConfig.from_pretrained(tmp_path / "mergekit").num_hidden_layers == layers
    LlamaForCausalLM.from_pretrained(tmp_path / "alloykit")  # loads: every tensor in place


def test_slices_that_alloykit_cannot_stack_are_refused(models: dict[str, str]) -> None:  # noqa: F811
    a, b = models["ft_a"], models["ft_b"]
    uneven = {"merge_method": "linear", "slices": [{"sources": [_src(a, [0, 1]), _src(b, [0, 2])]}]}
    with pytest.raises(RecipeError, match=r"all sources of a slice must span the same number of layers"):
        recipe_from_dict(uneven)
    counts = {
        "merge_method": "linear",
        "slices": [{"sources": [_src(a, [0, 1]), _src(b, [0, 1])]}, {"sources": [_src(a, [1, 2])]}],
    }
    _refused(counts, r"every slice needs the same number of sources")
    gradient = {
        "merge_method": "linear",
        "parameters": {"weight": [0.2, 0.8]},
        "slices": [
            {"sources": [_src(a, [0, 1]), _src(b, [0, 1])]},
            {"sources": [_src(a, [1, 2]), _src(b, [1, 2])]},
        ],
    }
    _refused(gradient, r"gradients .* with several slices")
    params = {
        "merge_method": "linear",
        "slices": [
            {"sources": [_src(a, [0, 1], weight=0.2), _src(b, [0, 1], weight=0.8)]},
            {"sources": [_src(a, [1, 2], weight=0.5), _src(b, [1, 2], weight=0.5)]},
        ],
    }
    _refused(params, r"source 0 has different parameters in different slices")
    beyond = {"merge_method": "passthrough", "slices": [{"sources": [_src(a, [1, 3])]}]}
    MergeConfiguration.model_validate(copy.deepcopy(beyond))
    import alloykit

    with pytest.raises(RecipeError, match=r"layer_range \[1, 3\) is out of bounds: .*ft_a has 2 layers"):
        alloykit.merge(**recipe_from_dict(beyond).merge_kwargs(), dry_run=True)
