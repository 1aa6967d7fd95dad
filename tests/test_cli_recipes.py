"""Recipes (alloykit's and mergekit's) and the command line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from alloykit.cli.main import app
from alloykit.errors import RecipeError
from alloykit.io import open_checkpoint
from alloykit.recipe import load_recipe, recipe_from_dict

runner = CliRunner()


def write_recipe(tmp, data, name="recipe.yml"):
    p = tmp / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_cli_merge_alloykit_recipe_matches_the_formula(toy):
    tmp = toy["tmp"]
    recipe = write_recipe(
        tmp,
        {
            "method": "task_arithmetic",
            "base_model": "base",  # relative to the recipe's folder
            "models": [{"model": "ft0", "parameters": {"weight": 0.5}}, {"model": "ft1"}],
            "parameters": {"lambda": 0.8},
            "out_dtype": "float32",
        },
    )
    res = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp / "out"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["method"] == "task_arithmetic" and report["merged"] == 6
    r = open_checkpoint(tmp / "out")
    b, f0, f1 = toy["base"], toy["fts"][0], toy["fts"][1]
    for k in b:
        expected = b[k] + 0.8 * (0.5 * (f0[k] - b[k]) + (f1[k] - b[k]))
        torch.testing.assert_close(r.read(k), expected)
    assert yaml.safe_load((tmp / "out" / "alloykit_recipe.yml").read_text())["parameters"] == {"lambda": 0.8}


def test_cli_merge_mergekit_recipe(toy):
    tmp = toy["tmp"]
    recipe = write_recipe(
        tmp,
        {
            "merge_method": "ties",
            "base_model": str(toy["base_path"]),
            "models": [
                {"model": str(toy["base_path"])},
                {"model": str(toy["paths"][0]), "parameters": {"weight": 0.7, "density": 0.5}},
                {"model": str(toy["paths"][1]), "parameters": {"weight": 1.3, "density": 0.5}},
            ],
            "parameters": {"normalize": True, "int8_mask": True},
            "dtype": "float32",
        },
    )
    res = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp / "out"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["source_format"] == "mergekit" and rep["preset"] == "mergekit"
    from alloykit import merge

    direct = merge(
        toy["fts"][:2],
        toy["base"],
        "ties",
        preset="mergekit",
        model_parameters=[{"weight": 0.7, "density": 0.5}, {"weight": 1.3, "density": 0.5}],
    ).state_dict
    r = open_checkpoint(tmp / "out")
    assert all(torch.equal(r.read(k), direct[k]) for k in direct)


def test_cli_dry_run_prints_plan_and_writes_nothing(toy):
    recipe = write_recipe(
        toy["tmp"],
        {
            "method": "ties",
            "base_model": str(toy["base_path"]),
            "models": [{"model": str(p)} for p in toy["paths"]],
        },
    )
    res = runner.invoke(app, ["merge", str(recipe), "-o", str(toy["tmp"] / "out"), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["reduction_passes"] == 2 and plan["tensors"] == 6
    assert plan["bytes_to_write"] == sum(v.numel() * 4 for v in toy["base"].values())
    assert not (toy["tmp"] / "out").exists()


def test_cli_errors_are_clear_and_exit_2(toy):
    recipe = write_recipe(toy["tmp"], {"method": "tiez", "models": [{"model": str(toy["paths"][0])}]})
    res = runner.invoke(app, ["merge", str(recipe), "-o", str(toy["tmp"] / "out")])
    assert res.exit_code == 2
    assert "unknown method 'tiez'" in res.output and "task_arithmetic" in res.output
    (toy["tmp"] / "exists").mkdir()
    ok = write_recipe(toy["tmp"], {"method": "linear", "models": [{"model": str(toy["paths"][0])}]}, "ok.yml")
    res = runner.invoke(app, ["merge", str(ok), "-o", str(toy["tmp"] / "exists")])
    assert res.exit_code == 2 and "--force" in res.output


@pytest.mark.parametrize(
    "data,match",
    [
        ({"method": "ties"}, r"models: Field required"),
        ({"method": "ties", "models": []}, r"models: List should have at least 1 item"),
        (
            {"method": "ties", "models": [{"model": "a"}], "colour": 1},
            r"colour: Extra inputs are not permitted",
        ),
        ({"method": "ties", "models": [{"model": "a"}], "keys": "all"}, r"keys: Input should be 'strict'"),
        (
            {"merge_method": "sparse_linear", "models": [{"model": "a"}]},
            r"mergekit method 'sparse_linear' is not supported yet",
        ),
        ({"merge_method": "ties", "slices": []}, r"'slices:' must be a non-empty list"),
        ({"merge_method": "ties", "models": [{"model": "org/m@v1"}]}, r"revisions are not supported"),
        (
            {"merge_method": "ties", "tokenizer": {"source": "union", "pad": 8}, "models": [{"model": "a"}]},
            r"tokenizer: unknown keys \['pad'\]",
        ),
        (["not", "a", "mapping"], r"mapping at the top level"),
    ],
)
def test_bad_recipes_say_what_is_wrong(data, match):
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(data)


def test_mergekit_translation_maps_normalize_rescale_and_dtype():
    r = recipe_from_dict(
        {
            "merge_method": "dare_ties",
            "base_model": "b",
            "models": [{"model": "b"}, {"model": "m1", "parameters": {"weight": 0.5, "density": 0.3}}],
            "parameters": {"normalize": True, "rescale": False},
            "dtype": "bfloat16",
        }
    )
    assert (r.method, r.preset, r.base_model) == ("dare", "mergekit_ties", "b")
    assert [m.model for m in r.models] == ["m1"]
    assert r.parameters == {"aggregate": "weighted_mean", "rescale": "none"}
    assert (r.dtype, r.out_dtype) == ("bfloat16", "bfloat16")
    no_dtype = recipe_from_dict({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]})
    assert (no_dtype.dtype, no_dtype.out_dtype) == ("auto", None)


def test_load_recipe_reports_yaml_errors(tmp_path):
    p = tmp_path / "r.yml"
    p.write_text("method: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "none.yml")


def test_cli_methods_lists_every_method_with_presets():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    for name in ("linear", "task_arithmetic", "ties", "dare", "magnitude_prune"):
        assert f"\n{name} " in res.output
    assert "mergekit_ties" in res.output
    assert "density" in runner.invoke(app, ["methods", "dare"]).output


def test_cli_inspect_json_numbers(toy):
    res = runner.invoke(
        app, ["inspect", *map(str, toy["paths"][:2]), "--base", str(toy["base_path"]), "--json"]
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    b = toy["base"]
    t0 = torch.cat([(toy["fts"][0][k] - b[k]).reshape(-1) for k in sorted(b)])
    t1 = torch.cat([(toy["fts"][1][k] - b[k]).reshape(-1) for k in sorted(b)])
    assert rep["cosine"][0][1] == pytest.approx(float(t0 @ t1 / (t0.norm() * t1.norm())), abs=1e-6)
    base_norm = torch.cat([b[k].reshape(-1) for k in sorted(b)]).norm()
    assert rep["relative_norm"][str(toy["paths"][0])] == pytest.approx(float(t0.norm() / base_norm), rel=1e-5)
    conflicts = float(((t0 > 0) & (t1 < 0) | (t0 < 0) & (t1 > 0)).float().mean())
    assert rep["sign_conflict_rate"] == pytest.approx(conflicts)
    layer0 = torch.cat(
        [(toy["fts"][0][k] - b[k]).reshape(-1) for k in ("layers.0.attn.weight", "layers.0.attn.bias")]
    )
    assert rep["groups"]["layers.0"]["norm"][0] == pytest.approx(float(layer0.norm()), rel=1e-5)


def test_demo_merges_beat_the_base_and_trail_the_fine_tunes(tmp_path):
    from alloykit.demo import demo_merges, run_demo

    rows = run_demo(tmp_path / "demo")
    base, tuned = rows["base (pre-trained)"], rows["fine-tuned, each on its own task"]
    assert all(t > b + 0.2 for t, b in zip(tuned, base, strict=True))
    assert set(rows) == {"base (pre-trained)", "fine-tuned, each on its own task"} | {
        m[0] for m in demo_merges()
    }
    ta = rows["task_arithmetic λ=0.5"]
    assert sum(base) < sum(ta) < sum(tuned)


def test_cli_merges_pytorch_state_dict_files_from_a_mergekit_recipe(toy):
    tmp = toy["tmp"]
    paths = []
    for name, sd in [("base.pt", toy["base"]), ("a.pt", toy["fts"][0]), ("b.bin", toy["fts"][1])]:
        torch.save(sd, tmp / name)
        paths.append(str(tmp / name))
    recipe = write_recipe(
        tmp,
        {
            "merge_method": "task_arithmetic",
            "base_model": paths[0],
            "dtype": "float32",
            "models": [
                {"model": paths[1], "parameters": {"weight": 0.3}},
                {"model": paths[2], "parameters": {"weight": 0.6}},
            ],
        },
        "pt.yml",
    )
    res = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp / "out-pt")])
    assert res.exit_code == 0, res.output
    r = open_checkpoint(tmp / "out-pt")
    b, f0, f1 = toy["base"], toy["fts"][0], toy["fts"][1]
    for k in b:
        torch.testing.assert_close(r.read(k), b[k] + 0.3 * (f0[k] - b[k]) + 0.6 * (f1[k] - b[k]))
