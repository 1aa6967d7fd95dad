"""Parity with mergekit 0.1.5 for nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion,
passthrough, ram and ramplus_tl: the same mergekit YAML, run by mergekit and by alloykit (through
the recipe loader and through the command line), gives the same tensors bit for bit
(rtol = atol = 0), names and dtypes; plus each method against values computed by hand or by a
second, simpler formula, its properties, and its error messages.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("mergekit")
pytest.importorskip("transformers")

import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from alloykit.cli.main import app  # noqa: E402
from alloykit.errors import ParameterError, RecipeError  # noqa: E402
from alloykit.methods import get_method  # noqa: E402
from alloykit.methods.base import TensorContext  # noqa: E402
from alloykit.recipe import recipe_from_dict  # noqa: E402
from tests.test_mergekit_parity import (  # noqa: E402, F401  (fixtures are used by name)
    Recipe,
    _m,
    _offline,
    assert_same_tensors,
    load_folder,
    models,
    run_alloykit,
    run_mergekit,
)
from tests.test_mergekit_parity_zoo import _one_thread, zoo  # noqa: E402, F401

# ----------------------------------------------------------------------------- recipes


def _recipe(
    method: str,
    names: tuple[str, ...],
    params: dict[str, Any] | None = None,
    model_params: tuple[dict[str, Any], ...] | None = None,
    base: str | None = None,
    **top: Any,
) -> Recipe:
    """``names`` are listed in ``models`` (the base too, when named there); ``base`` is base_model."""

    def build(p: dict[str, str]) -> dict[str, Any]:
        mps = model_params or tuple({} for _ in names)
        data: dict[str, Any] = {
            "merge_method": method,
            "models": [_m(p[n], **mp) for n, mp in zip(names, mps, strict=True)],
        }
        if base is not None:
            data["base_model"] = p[base]
        if params is not None:
            data["parameters"] = params
        data.update(top)
        return data

    return build


W2 = ({"weight": 0.3}, {"weight": 0.9})
W3 = ({"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3})
AB = ("ft_a", "ft_b")
ABC = ("ft_a", "ft_b", "ft_c")
BF16 = ("ft_a_bf16", "ft_b_bf16")
MLP_FIRST = [{"filter": "mlp", "value": False}, {"value": True}]

CASES: dict[str, Recipe] = {
    # nuslerp: the whole tensor (default), rows, last-axis vectors; with and without a base
    "nuslerp-no-base": _recipe("nuslerp", AB, None, W2),
    "nuslerp-base": _recipe("nuslerp", AB, None, W2, base="base"),
    "nuslerp-base-listed": _recipe("nuslerp", ("base", *AB), None, ({}, *W2), base="base"),
    "nuslerp-far": _recipe("nuslerp", ("far_a", "far_b"), None, W2, base="base"),
    "nuslerp-row-wise": _recipe(
        "nuslerp", AB, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, W2, "base"
    ),
    "nuslerp-last-axis": _recipe("nuslerp", AB, {"nuslerp_flatten": False}, W2, base="base"),
    "nuslerp-row-wise-no-base": _recipe(
        "nuslerp", AB, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, W2
    ),
    "nuslerp-flatten-filter": _recipe("nuslerp", AB, {"nuslerp_flatten": MLP_FIRST}, W2, base="base"),
    "nuslerp-weights-cancel": _recipe("nuslerp", AB, None, ({"weight": 1.0}, {"weight": -1.0}), base="base"),
    "nuslerp-global-weight": _recipe("nuslerp", AB, {"weight": 0.4}, base="base"),
    "nuslerp-weight-gradient": _recipe(
        "nuslerp", AB, None, ({"weight": [0.2, 1.0]}, {"weight": [1.0, 0.3]}), base="base"
    ),
    "nuslerp-extrapolate": _recipe("nuslerp", AB, None, ({"weight": -0.5}, {"weight": 1.5}), base="base"),
    "nuslerp-bf16-models": _recipe("nuslerp", BF16, None, W2, base="base_bf16"),
    "nuslerp-dtype-bf16": _recipe("nuslerp", AB, None, W2, base="base", dtype="bfloat16"),
    "nuslerp-dtype-fp16": _recipe("nuslerp", AB, None, W2, dtype="float16"),
    "nuslerp-out-dtype": _recipe("nuslerp", AB, None, W2, base="base", dtype="float32", out_dtype="bfloat16"),
    # multislerp
    "multislerp-three-base": _recipe("multislerp", ABC, None, W3, base="base"),
    "multislerp-three-no-base": _recipe("multislerp", ABC, None, W3),
    "multislerp-two": _recipe("multislerp", AB, None, W2, base="base"),
    "multislerp-far": _recipe("multislerp", ("far_a", "far_b", "ft_c"), None, W3, base="base"),
    "multislerp-no-normalize": _recipe("multislerp", ABC, {"normalize_weights": False}, W3, base="base"),
    "multislerp-eps": _recipe("multislerp", ABC, {"eps": 1e-3}, W3, base="base"),
    "multislerp-global-weight-listed": _recipe("multislerp", ("base", *ABC), {"weight": 1.0}, base="base"),
    "multislerp-filter-weight": _recipe(
        "multislerp",
        AB,
        None,
        ({"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]}, {"weight": 1.0}),
        base="base",
    ),
    "multislerp-bf16-models": _recipe("multislerp", BF16, None, W2, base="base_bf16"),
    "multislerp-dtype-bf16": _recipe("multislerp", ABC, None, W3, base="base", dtype="bfloat16"),
    "multislerp-mixed-dtypes": _recipe("multislerp", ("ft_a_bf16", "ft_b"), None, W2, base="base"),
    # karcher: every input counts, the base included
    "karcher-three": _recipe("karcher", ABC),
    "karcher-base-appended": _recipe("karcher", AB, base="base"),
    "karcher-base-listed-first": _recipe("karcher", ("base", *AB), base="base"),
    "karcher-far": _recipe("karcher", ("far_a", "far_b", "cor_a")),
    "karcher-max-iter-tol": _recipe("karcher", ("far_a", "far_b", "cor_a"), {"max_iter": 2, "tol": 1e-3}),
    "karcher-max-iter-0": _recipe("karcher", ("far_a", "far_b"), {"max_iter": 0}),
    "karcher-tol-filter": _recipe(
        # mlp matrices (norm ≈ 0.9) are all below tol 5: mergekit's result is 0 for them
        "karcher",
        ("far_a", "far_b"),
        {"tol": [{"filter": "mlp", "value": 5.0}, {"value": 1e-6}]},
    ),
    "karcher-bf16-models": _recipe("karcher", BF16),
    "karcher-dtype-bf16": _recipe("karcher", ABC, dtype="bfloat16"),
    "karcher-dtype-fp16-out-fp32": _recipe("karcher", AB, dtype="float16", out_dtype="float32"),
    # sce
    "sce-defaults": _recipe("sce", ABC, base="base"),
    "sce-select-0.5": _recipe("sce", ABC, {"select_topk": 0.5}, base="base"),
    "sce-select-0.1-int8": _recipe("sce", ABC, {"select_topk": 0.1, "int8_mask": True}, base="base"),
    "sce-select-filter": _recipe(
        "sce", AB, {"select_topk": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}]}, base="base"
    ),
    "sce-select-gradient": _recipe("sce", AB, {"select_topk": [0.2, 0.9]}, base="base"),
    "sce-base-listed": _recipe("sce", ("base", *AB), {"select_topk": 0.6}, base="base"),
    "sce-bf16-models": _recipe("sce", BF16, {"select_topk": 0.5}, base="base_bf16"),
    "sce-dtype-bf16": _recipe("sce", ABC, {"select_topk": 0.5}, base="base", dtype="bfloat16"),
    "sce-one-model": _recipe("sce", ("ft_a",), {"select_topk": 0.5}, base="base"),
    # nearswap
    "nearswap-small-t": _recipe("nearswap", ("ft_a",), {"t": 1e-4}, base="base"),
    "nearswap-t": _recipe("nearswap", ("ft_a",), {"t": 2e-4}, base="base"),
    "nearswap-t-gradient": _recipe("nearswap", ("far_b",), {"t": [0.001, 0.05]}, base="base"),
    "nearswap-base-listed": _recipe("nearswap", ("base", "ft_a"), {"t": 0.001}, base="base"),
    "nearswap-bf16-models": _recipe("nearswap", ("ft_a_bf16",), {"t": 0.002}, base="base_bf16"),
    "nearswap-dtype-fp16": _recipe("nearswap", ("ft_a",), {"t": 0.002}, base="base", dtype="float16"),
    # arcee_fusion: float32 results (float32 mask) whatever the inputs, unless out_dtype
    "arcee_fusion": _recipe("arcee_fusion", ("ft_a",), base="base"),
    "arcee_fusion-far": _recipe("arcee_fusion", ("far_b",), base="base"),
    "arcee_fusion-base-listed": _recipe("arcee_fusion", ("base", "ft_a"), base="base"),
    "arcee_fusion-bf16-models": _recipe("arcee_fusion", ("ft_a_bf16",), base="base_bf16"),
    "arcee_fusion-dtype-bf16": _recipe("arcee_fusion", ("ft_a",), base="base", dtype="bfloat16"),
    "arcee_fusion-out-dtype-bf16": _recipe(
        "arcee_fusion", ("ft_a_bf16",), base="base_bf16", out_dtype="bfloat16"
    ),
    # passthrough: one input, copied or scaled
    "passthrough-scale": _recipe("passthrough", ("ft_a",), {"scale": 0.5}),
    "passthrough-scale-filter": _recipe(
        "passthrough",
        ("ft_a",),
        {"scale": [{"filter": "mlp", "value": 0.0}, {"filter": "attn", "value": 2.0}]},
    ),
    "passthrough-per-model-scale": _recipe("passthrough", ("ft_a",), None, ({"scale": [1.0, 0.25]},)),
    "passthrough-base-only": _recipe("passthrough", ("base",), {"scale": 1.5}, base="base"),
    "passthrough-bf16-dtype-fp32": _recipe("passthrough", ("ft_a_bf16",), {"scale": 0.3}, dtype="float32"),
    # ram / ramplus_tl (|τ| ≈ 2e-4 on the matrices, 1e-2 on the norms: ε 2e-4 mixes the cases)
    "ram-defaults": _recipe("ram", ABC, base="base"),
    "ram-epsilon": _recipe("ram", ABC, {"epsilon": 2e-4}, base="base"),
    "ram-epsilon-filter": _recipe(
        "ram", AB, {"epsilon": [{"filter": "norm", "value": 0.01}, {"value": 3e-4}]}, base="base"
    ),
    "ram-bf16-models": _recipe("ram", BF16, {"epsilon": 2e-4}, base="base_bf16"),
    "ram-dtype-bf16": _recipe("ram", ABC, {"epsilon": 2e-4}, base="base", dtype="bfloat16"),
    "ramplus_tl-defaults": _recipe("ramplus_tl", ABC, base="base"),
    "ramplus_tl-epsilon": _recipe("ramplus_tl", ABC, {"epsilon": 2e-4}, base="base"),
    "ramplus_tl-r-alpha": _recipe("ramplus_tl", ABC, {"epsilon": 3e-4, "r": 0.5, "alpha": 1.5}, base="base"),
    "ramplus_tl-base-listed": _recipe("ramplus_tl", ("base", *AB), {"epsilon": 2e-4}, base="base"),
    "ramplus_tl-bf16-models": _recipe("ramplus_tl", BF16, {"epsilon": 2e-4}, base="base_bf16"),
    "ramplus_tl-dtype-bf16-out-bf16": _recipe(
        "ramplus_tl", ABC, {"epsilon": 2e-4}, base="base", dtype="bfloat16", out_dtype="bfloat16"
    ),
}
# Cases whose output is, by design, one of the inputs (where the sanity check below does not apply).
COPIES = {"sce-one-model"}


def _input_names(data: dict[str, Any]) -> list[str]:
    names = [e["model"] for e in data["models"]]
    return names + ([data["base_model"]] if data.get("base_model") else [])


def _check_merged_something(data: dict[str, Any], theirs: dict[str, torch.Tensor]) -> None:
    for ref in set(_input_names(data)):
        inp = load_folder(Path(ref))
        assert any(not torch.equal(theirs[k].float(), inp[k].float()) for k in theirs), ref


@pytest.mark.parametrize("case", list(CASES))
def test_parity(case: str, zoo: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    data = CASES[case](zoo)
    theirs = load_folder(run_mergekit(data, tmp_path / "mergekit"))
    ours = load_folder(run_alloykit(data, tmp_path / "alloykit", workers=1))
    assert_same_tensors(ours, theirs)
    if case not in COPIES:
        _check_merged_something(data, theirs)


def test_the_cases_exercise_every_branch(zoo: dict[str, str]) -> None:  # noqa: F811
    """The parity cases are only meaningful if the models reach the interesting branches: RAM's
    ε 2e-4 leaves entries changed by none, one and several models; nearswap's t swaps some
    entries and leans to the base on others."""
    base = load_folder(Path(zoo["base"]))
    fts = [load_folder(Path(zoo[n])) for n in ABC]
    k = "model.layers.0.mlp.up_proj.weight"
    changed = torch.stack([(ft[k] - base[k]).abs() > 2e-4 for ft in fts]).sum(dim=0)
    assert {0, 1, 2, 3} <= set(changed.unique().tolist())
    near = ((fts[0][k] - base[k]).abs() <= 2e-4).float().mean()
    assert 0.2 < float(near) < 1.0


# ----------------------------------------------------------------------------- the command line


CLI_RECIPES: dict[str, Recipe] = {
    "nuslerp": CASES["nuslerp-row-wise"],
    "multislerp": CASES["multislerp-three-base"],
    "karcher": CASES["karcher-base-appended"],
    "sce": CASES["sce-select-0.5"],
    "nearswap": CASES["nearswap-t"],
    "arcee_fusion": CASES["arcee_fusion-bf16-models"],
    "passthrough": CASES["passthrough-scale-filter"],
    "ram": CASES["ram-epsilon"],
    "ramplus_tl": CASES["ramplus_tl-bf16-models"],
}


@pytest.mark.parametrize("method", list(CLI_RECIPES))
def test_cli_runs_the_mergekit_yaml(method: str, zoo: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """``alloykit merge recipe.yml`` on a mergekit YAML: the mergekit path, mergekit's tensors."""
    data = CLI_RECIPES[method](zoo)
    assert data["merge_method"] == method
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    theirs = load_folder(run_mergekit(data, tmp_path / "mergekit"))
    assert_same_tensors(load_folder(tmp_path / "out"), theirs)


# ----------------------------------------------------------------------------- translation


def test_mergekit_parameters_are_translated() -> None:
    data = {
        "merge_method": "nuslerp",
        "base_model": "b",
        "models": [{"model": "b"}, {"model": "x", "parameters": {"weight": 0.3}}, {"model": "y"}],
        "parameters": {"weight": 1.0, "nuslerp_flatten": False, "nuslerp_row_wise": True},
    }
    r = recipe_from_dict(data)
    assert (r.method, r.preset, r.base_model) == ("nuslerp", "mergekit", "b")
    assert [m.model for m in r.models] == ["x", "y"]
    assert r.parameters == {"weight": 1.0, "flatten": False, "row_wise": True}
    # karcher and passthrough take the base as one more input, where mergekit puts it
    k = recipe_from_dict(
        {"merge_method": "karcher", "base_model": "b", "models": [{"model": "x"}, {"model": "y"}]}
    )
    assert k.base_model is None and [m.model for m in k.models] == ["x", "y", "b"]
    k = recipe_from_dict(
        {"merge_method": "karcher", "base_model": "b", "models": [{"model": "b"}, {"model": "x"}]}
    )
    assert [m.model for m in k.models] == ["b", "x"]
    p = recipe_from_dict({"merge_method": "passthrough", "base_model": "b", "models": [{"model": "b"}]})
    assert p.base_model is None and [m.model for m in p.models] == ["b"]
    # arcee_fusion and ramplus_tl leave float32 results, which mergekit writes as they are
    for name in ("arcee_fusion", "ramplus_tl"):
        base = {"merge_method": name, "base_model": "b", "models": [{"model": "x"}]}
        assert recipe_from_dict(base).out_dtype == "float32"
        assert recipe_from_dict({**base, "dtype": "bfloat16"}).out_dtype == "float32"
        assert recipe_from_dict({**base, "dtype": "float64"}).out_dtype == "float64"
        assert recipe_from_dict({**base, "out_dtype": "bfloat16"}).out_dtype == "bfloat16"
    assert (
        recipe_from_dict({"merge_method": "ram", "base_model": "b", "models": [{"model": "x"}]}).out_dtype
        is None
    )


@pytest.mark.parametrize(
    "data, match",
    [
        (
            {"merge_method": "nearswap", "base_model": "b", "models": [{"model": "x"}]},
            r"nearswap needs 'parameters: \{t",
        ),
        (
            {
                "merge_method": "nuslerp",
                "models": [{"model": "x", "parameters": {"weight": 1.0}}, {"model": "y"}],
            },
            r"nuslerp needs 'weight' for every model .*missing for y",
        ),
        (
            {"merge_method": "multislerp", "models": [{"model": "x"}]},
            r"multislerp needs 'weight' for every model",
        ),
    ],
)
def test_recipes_missing_what_mergekit_requires_are_refused(data: dict[str, Any], match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(data)


def test_mergekit_refuses_them_too(models: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """The recipes refused above are refused by mergekit itself (so nothing mergekit runs is lost)."""
    no_t = {"merge_method": "nearswap", "base_model": models["base"], "models": [{"model": models["ft_a"]}]}
    with pytest.raises(RuntimeError, match="Missing required parameter t"):
        run_mergekit(no_t, tmp_path / "a")
    no_w = {"merge_method": "nuslerp", "models": [{"model": models["ft_a"]}, {"model": models["ft_b"]}]}
    with pytest.raises(RuntimeError, match="Missing required parameter weight"):
        run_mergekit(no_w, tmp_path / "b")
    two = {"merge_method": "passthrough", "base_model": models["base"], "models": [{"model": models["ft_a"]}]}
    with pytest.raises(ValueError, match="requires exactly 1 inputs"):
        run_mergekit(two, tmp_path / "c")
    with pytest.raises(ParameterError, match="passthrough takes at most 1 models, got 2"):
        run_alloykit(two, tmp_path / "d")


# ----------------------------------------------------------------------------- by hand


def _call(
    name: str, tensors: list[torch.Tensor], base: torch.Tensor | None = None, **params: Any
) -> torch.Tensor:
    """One tensor through a method, per-model values given as lists (one per model)."""
    m = get_method(name)
    per = {k: v for k, v in params.items() if isinstance(v, list)}
    shared = {k: v for k, v in params.items() if not isinstance(v, list)}
    model_params = [{k: v[i] for k, v in per.items()} for i in range(len(tensors))]
    values = m.resolve(len(tensors), global_params=shared, model_params=model_params)
    if m.check is not None:
        m.check(values, "")
    return m.fn(list(tensors), base, TensorContext(name="t"), **values)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _slerp64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Shoemake's formula in float64, for one pair of vectors."""
    a, b = a.double(), b.double()
    cos = (a @ b) / (a.norm() * b.norm())
    om = math.acos(float(cos))
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_weights_pick_the_ends_and_follow_shoemake(with_base: bool) -> None:
    a, b = _randn(6, 5, seed=1), _randn(6, 5, seed=2)
    base = _randn(6, 5, seed=3) if with_base else None
    # t = 0: the first model, t = 1: the second (to rounding: sin θ·v/sin θ, and θ_0 + (θ_1 − θ_0))
    torch.testing.assert_close(_call("nuslerp", [a, b], base, weight=[1.0, 0.0]), a)
    torch.testing.assert_close(_call("nuslerp", [a, b], base, weight=[0.0, 2.0]), b)
    z = base if base is not None else torch.zeros(())
    for w, t in (([0.3, 0.9], 0.75), ([1.0, -1.0], 0.5)):  # weights that cancel: t = 0.5
        got = _call("nuslerp", [a, b], base, weight=w)
        want = z.double() + _slerp64((a - z).reshape(-1), (b - z).reshape(-1), t).reshape(6, 5)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # row_wise: each column (vectors along the first axis) on its own; else each row
    for row_wise in (True, False):
        got = _call("nuslerp", [a, b], base, weight=[0.3, 0.9], flatten=False, row_wise=row_wise)
        for i in range(5 if row_wise else 6):
            pick = (lambda x, i=i: x[:, i]) if row_wise else (lambda x, i=i: x[i])
            want = pick(z.expand(6, 5)).double() + _slerp64(pick(a - z), pick(b - z), 0.75)
            torch.testing.assert_close(pick(got).double(), want, rtol=1e-5, atol=1e-6)


def test_nuslerp_orthogonal_unit_vectors_by_hand() -> None:
    got = _call("nuslerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], weight=[1.0, 1.0])
    torch.testing.assert_close(got, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    # colinear vectors: the linear interpolation
    x = torch.tensor([1.0, 2.0, -3.0])
    torch.testing.assert_close(_call("nuslerp", [x, 4 * x], weight=[1.0, 1.0]), 2.5 * x)


def test_multislerp_of_two_is_the_spherical_midpoint_and_of_one_the_model() -> None:
    a, b, base = _randn(40, seed=1), _randn(40, seed=2), _randn(40, seed=3)
    x = _randn(7, seed=4)
    assert _call("multislerp", [x], weight=[0.3]) is x
    # orthogonal unit vectors, equal weights: the tangent vectors cancel, the mean is the midpoint
    got = _call("multislerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], weight=[1.0, 1.0])
    torch.testing.assert_close(got, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    # two vectors of one norm, equal weights: the slerp midpoint (the barycentre is the geodesic's middle)
    u, v = a / a.norm(), b / b.norm()
    got = _call("multislerp", [u, v], weight=[0.5, 0.5])
    torch.testing.assert_close(got.double(), _slerp64(u, v, 0.5), rtol=1e-5, atol=1e-6)
    # identical task vectors: the model; normalize_weights makes the scale of the weights irrelevant
    same = _call("multislerp", [a, a.clone(), a.clone()], base, weight=[1.0, 2.0, 3.0])
    torch.testing.assert_close(same, a, rtol=1e-5, atol=1e-6)
    one = _call("multislerp", [a, b, base], weight=[1.0, 2.0, 3.0])
    ten = _call("multislerp", [a, b, base], weight=[10.0, 20.0, 30.0])
    torch.testing.assert_close(one, ten, rtol=1e-5, atol=1e-6)


def test_multislerp_unchanged_tensors_give_the_base() -> None:
    """A tensor no fine-tune changed: the base (mergekit raises for three or more models)."""
    base = _randn(5, 3, seed=1)
    out = _call("multislerp", [base.clone(), base.clone(), base.clone()], base, weight=[0.2, 0.5, 0.3])
    assert torch.equal(out, base)


def _karcher64(tensors: list[torch.Tensor], iters: int = 200) -> torch.Tensor:
    """A plain float64 Karcher mean (Riemannian gradient descent to convergence), times the mean norm."""
    xs = [t.double().reshape(-1) for t in tensors]
    us = [x / x.norm() for x in xs]
    mu = sum(us) / len(us)
    mu = mu / mu.norm()
    for _ in range(iters):
        step = torch.zeros_like(mu)
        for u in us:
            c = torch.clamp(mu @ u, -1, 1)
            th = torch.acos(c)
            if th > 1e-12:
                step += (th / torch.sin(th)) * (u - c * mu) / len(us)
        n = step.norm()
        if n < 1e-14:
            break
        mu = torch.cos(n) * mu + torch.sin(n) * step / n
        mu = mu / mu.norm()
    return (sum(x.norm() for x in xs) / len(xs)) * mu


def test_karcher_mean_is_the_riemannian_centre_of_mass() -> None:
    xs = [_randn(8, 6, seed=s) + 0.5 for s in range(3)]
    got = _call("karcher", xs, max_iter=50, tol=1e-7)
    torch.testing.assert_close(got.double().reshape(-1), _karcher64(xs), rtol=1e-5, atol=1e-6)
    # identical models: that model; one model: itself; a base is not used
    x = xs[0]
    torch.testing.assert_close(_call("karcher", [x, x.clone(), x.clone()]), x, rtol=1e-5, atol=1e-6)
    assert _call("karcher", [x]) is x
    assert torch.equal(_call("karcher", xs, xs[1]), _call("karcher", xs))
    # models of norm ≤ tol leave the direction alone but count in the scale; all of them: zero
    tiny = torch.zeros_like(x)
    got = _call("karcher", [x, tiny])
    torch.testing.assert_close(got, x / 2, rtol=1e-6, atol=1e-7)
    assert torch.equal(_call("karcher", [tiny, tiny]), tiny)


def test_sce_by_hand() -> None:
    base = torch.zeros(4)
    t1 = torch.tensor([0.4, -0.2, 0.1, 0.0])
    t2 = torch.tensor([0.2, 0.2, -0.4, 0.0])
    # η ∝ mean(τ²): 0.21/4 and 0.24/4, normalised; majority sign(Σ τ) = [+, + (0 → +), −, +];
    # entry 1 keeps τ2 only, entry 2 τ2 only, entry 3 (zeros never agree) nothing
    e1, e2 = 0.21 / 0.45, 0.24 / 0.45
    want = torch.tensor([(e1 * 0.4 + e2 * 0.2) / (e1 + e2), 0.2, -0.4, 0.0])
    torch.testing.assert_close(_call("sce", [t1, t2], base), want)
    # select_topk 0.5: int(3 non-zero variances · 0.5) = 1 entry kept, the largest variance
    # (entry 2: 0.0625; entries 0 and 1: 0.01 and 0.04); then τ2 wins its sign election
    got = _call("sce", [t1, t2], base, select_topk=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.4, 0.0]))
    assert torch.equal(_call("sce", [t1, t2], base, select_topk=0.0), base)
    # identical task vectors: the task vector itself
    torch.testing.assert_close(_call("sce", [t1, t1.clone()], base), t1)


def test_ram_and_ramplus_by_hand() -> None:
    base = torch.full((5,), 1.0)
    t1 = torch.tensor([0.4, 0.0, 0.2, 1e-6, -0.3])
    t2 = torch.tensor([0.2, 0.0, 0.0, 0.0, 0.5])
    # entry 0: both change it → mean 0.3; 2: only model 1 → 0.2; 3: below ε → unchanged; 4: mean 0.1
    want = base + torch.tensor([0.3, 0.0, 0.2, 0.0, 0.1])
    torch.testing.assert_close(_call("ram", [base + t1, base + t2], base), want)
    # RAM+: model 1 changes 2 shared and 1 unique entries: ρ = 2, λ = 1 + 0.1·min(2, 0.2) = 1.02
    want_plus = base + torch.tensor([0.3, 0.0, 0.2 * 1.02, 0.0, 0.1])
    torch.testing.assert_close(_call("ramplus_tl", [base + t1, base + t2], base), want_plus)
    plus = _call("ramplus_tl", [base + t1, base + t2], base, r=0.5, alpha=3.0)
    torch.testing.assert_close(plus, base + torch.tensor([0.3, 0.0, 0.2 * 2.0, 0.0, 0.1]))
    # one model: its task vector (above ε) unchanged
    torch.testing.assert_close(_call("ram", [base + t1], base), base + t1 * (t1.abs() > 1e-5))


def test_nearswap_by_hand() -> None:
    base = torch.zeros(4)
    x = torch.tensor([1e-5, 0.5, -2.0, 0.0])
    # w = clamp(t / max(|x|, 1e-6), 0, 1) = [1, 0.2, 0.05, 1]
    torch.testing.assert_close(_call("nearswap", [x], base, t=0.1), torch.tensor([1e-5, 0.1, -0.1, 0.0]))
    assert torch.equal(_call("nearswap", [x], base, t=0.0), base)
    assert torch.equal(_call("nearswap", [x], base, t=10.0), x)


def test_arcee_fusion_keeps_the_outlying_changes() -> None:
    base = _randn(64, 32, seed=1)
    x = base.clone()
    x[3, 5] += 4.0  # one large change
    x += 1e-3 * _randn(64, 32, seed=2)  # and small ones everywhere
    out = _call("arcee_fusion", [x], base)
    kept = out != base  # θ_0 + (θ_1 − θ_0) where kept (θ_1 to rounding), θ_0 exactly elsewhere
    assert kept[3, 5] and 0 < int(kept.sum()) < kept.numel() // 2
    torch.testing.assert_close(out[kept], x[kept])
    # the threshold by hand: median + 1.5 IQR of the importance, quantiles at ⌊q·(n − 1)⌋
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    scores = (x - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    s = scores.reshape(-1).sort().values
    n = s.numel() - 1
    fence = s[int(0.5 * n)] + 1.5 * (s[int(0.75 * n)] - s[int(0.25 * n)])
    assert torch.equal(kept, scores >= fence)


def test_arcee_fusion_samples_large_tensors_by_the_seed() -> None:
    """Above 1M entries the quantiles come from 1M entries drawn by the tensor's generator."""
    base = _randn(1100, 1000, seed=1)
    x = base + 0.01 * _randn(1100, 1000, seed=2)
    m = get_method("arcee_fusion")
    one = m.fn([x], base, TensorContext(name="w", seed=0))
    again = m.fn([x], base, TensorContext(name="w", seed=0))
    other = m.fn([x], base, TensorContext(name="w", seed=1))
    assert torch.equal(one, again) and not torch.equal(one, other)


def test_passthrough_copies_or_scales() -> None:
    x = _randn(3, 4)
    assert _call("passthrough", [x]) is x
    torch.testing.assert_close(_call("passthrough", [x], scale=[0.5]), x * 0.5, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name, n, params",
    [
        ("nuslerp", 2, {"weight": [0.3, 0.9]}),
        ("multislerp", 3, {"weight": [0.2, 0.5, 0.3]}),
        ("karcher", 3, {}),
        ("sce", 3, {"select_topk": 0.5}),
        ("nearswap", 1, {"t": 0.01}),
        ("arcee_fusion", 1, {}),
        ("passthrough", 1, {"scale": [0.5]}),
        ("ram", 3, {"epsilon": 0.01}),
        ("ramplus_tl", 3, {"epsilon": 0.01}),
    ],
)
def test_half_precision_inputs_are_close_to_float32(
    name: str, n: int, params: dict, dtype: torch.dtype
) -> None:
    base = _randn(16, 8, seed=0)
    fts = [base + 0.1 * _randn(16, 8, seed=i + 1) for i in range(n)]
    full = _call(name, fts, base, **params)
    half = _call(name, [f.to(dtype) for f in fts], base.to(dtype), **params)
    assert torch.isfinite(half).all()
    close = (half.float() - full).abs() <= 0.05 * full.abs().max()
    assert close.float().mean() > (0.9 if name in ("sce", "arcee_fusion", "ram", "ramplus_tl") else 0.999)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name, n, params, match",
    [
        ("nuslerp", 3, {}, r"nuslerp takes at most 2 models, got 3"),
        (
            "nuslerp",
            2,
            {"flatten": "yes"},
            r"nuslerp: parameter 'flatten' = 'yes' is not allowed; expected a bool",
        ),
        (
            "multislerp",
            2,
            {"eps": 0.0},
            r"multislerp: parameter 'eps' = 0.0 is not allowed; expected a float > 0",
        ),
        ("karcher", 2, {"tol": 0.0}, r"karcher: parameter 'tol' = 0.0 is not allowed; expected a float > 0"),
        (
            "karcher",
            2,
            {"max_iter": 2.5},
            r"karcher: parameter 'max_iter' = 2.5 is not allowed; expected a int",
        ),
        (
            "sce",
            2,
            {"select_topk": 1.5},
            r"sce: parameter 'select_topk' = 1.5 .*expected a float >= 0.0 and <= 1.0",
        ),
        ("nearswap", 1, {"t": -0.1}, r"nearswap: parameter 't' = -0.1 is not allowed; expected a float >= 0"),
        ("nearswap", 2, {"t": 0.1}, r"nearswap takes at most 1 models, got 2"),
        ("arcee_fusion", 1, {"weight": 1.0}, r"arcee_fusion: unknown parameter 'weight'"),
        ("passthrough", 1, {"scale": "half"}, r"passthrough.*parameter 'scale' = 'half' is not allowed"),
        (
            "ram",
            2,
            {"epsilon": -1e-5},
            r"ram: parameter 'epsilon' = -1e-05 is not allowed; expected a float >= 0",
        ),
        ("ramplus_tl", 2, {"epsilon": 0.0}, r"ramplus_tl: parameter 'epsilon' = 0.0 is not allowed; .*> 0"),
        (
            "ramplus_tl",
            2,
            {"alpha": -1},
            r"ramplus_tl: parameter 'alpha' = -1 is not allowed; expected a float >= 0",
        ),
    ],
)
def test_bad_parameters_are_named(name: str, n: int, params: dict, match: str) -> None:
    import alloykit

    base = {"w": _randn(4, 3, seed=0)}
    fts = [{"w": _randn(4, 3, seed=i + 1)} for i in range(n)]
    with pytest.raises(ParameterError, match=match):
        alloykit.merge_state_dicts(fts, base, name, parameters=params)


def test_multislerp_weights_that_cancel_are_refused() -> None:
    a, b, c, base = _randn(6, seed=1), _randn(6, seed=2), _randn(6, seed=3), torch.zeros(6)
    with pytest.raises(ParameterError, match=r"multislerp: the weights \[1.0, -1.0\] sum to 0"):
        _call("multislerp", [a, b], base, weight=[1.0, -1.0])
    # antipodal task vectors with equal weights: no spherical mean (mergekit: ValueError too)
    with pytest.raises(
        ParameterError, match=r"multislerp \(tensor 't'\): the weighted sum of the unit vectors is zero"
    ):
        _call(
            "multislerp",
            [base + c, base - c, base + 0 * c],
            base,
            weight=[1.0, 1.0, 0.0],
            normalize_weights=False,
        )
