"""A mergekit recipe may carry parameters its method does not read (shared recipes often set
``density`` on ``linear``): mergekit ignores them, so alloykit runs it too, with a warning that
names each; alloykit's own recipes stay strict."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mergekit")
pytest.importorskip("transformers")

import alloykit  # noqa: E402
from alloykit.errors import ParameterError  # noqa: E402
from alloykit.recipe.schema import recipe_from_dict  # noqa: E402
from tests.test_mergekit_parity import (  # noqa: E402, F401  (fixtures are used by name)
    _offline,
    assert_same_tensors,
    load_folder,
    models,
    run_mergekit,
)


def test_unused_mergekit_parameters_are_ignored_with_a_warning(
    models: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    data = {
        "merge_method": "linear",
        "models": [
            {"model": models["ft_a"], "parameters": {"weight": 0.4, "density": 0.5}},
            {"model": models["ft_b"], "parameters": {"weight": 0.6}},
        ],
        "parameters": {"density": 0.3, "epsilon": 0.1},
        "dtype": "float32",
    }
    theirs = load_folder(run_mergekit(data, tmp_path / "mergekit"))
    recipe = recipe_from_dict(data)
    result = alloykit.merge(**recipe.merge_kwargs(), output=tmp_path / "alloykit", workers=1)
    assert_same_tensors(load_folder(tmp_path / "alloykit"), theirs)
    ignored = [w for w in result.plan.warnings if "ignored, as mergekit does" in w]
    assert len(ignored) == 3
    assert any("parameters: 'density' is not a parameter of linear" in w for w in ignored)
    assert any("parameters: 'epsilon'" in w for w in ignored)
    assert any("models[0].parameters: 'density'" in w for w in ignored)


def test_alloykit_recipes_stay_strict(models: dict[str, str]) -> None:  # noqa: F811
    data = {
        "method": "linear",
        "models": [{"model": models["ft_a"]}, {"model": models["ft_b"]}],
        "parameters": {"density": 0.3},
    }
    with pytest.raises(ParameterError, match="density"):
        alloykit.merge(**recipe_from_dict(data).merge_kwargs(), dry_run=True)
