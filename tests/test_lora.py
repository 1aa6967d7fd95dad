"""PEFT LoRA adapters as models: their dense weights equal PEFT's own merge, per tensor and per
slice; every task-vector method takes them; bad adapters are named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import alloykit
from alloykit.errors import CheckpointError, MismatchError, ParameterError
from alloykit.io.lora import LoraReader
from alloykit.io.readers import open_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _adapter(base_model, folder, seed, **lora):
    """A PEFT adapter with random A and B (B is zero at PEFT's default init), saved."""
    import copy

    torch.manual_seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=False, **lora)
    model = peft.get_peft_model(copy.deepcopy(base_model), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    return model


def _dense(peft_model, folder):
    """PEFT's own merge, saved as a full checkpoint (float32: no rounding)."""
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = _llama()
    base.save_pretrained(root / "base", safe_serialization=True)
    ad1 = _adapter(base, root / "ad1", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    targets = ["k_proj", "o_proj", "up_proj"]
    ad2 = _adapter(
        base, root / "ad2", 2, r=2, lora_alpha=3, use_rslora=True, target_modules=targets,
        rank_pattern={"o_proj": 6}, alpha_pattern={"up_proj": 7},
    )  # fmt: skip
    return {
        "root": root,
        "base": root / "base",
        "adapters": [root / "ad1", root / "ad2"],
        "dense": [_dense(ad1, root / "dense1"), _dense(ad2, root / "dense2")],
    }


def _close(a: dict, b: dict, atol: float = 2e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=atol, msg=k)


def test_an_adapter_reads_as_peft_merges_it(llama):
    base = open_checkpoint(llama["base"])
    for adapter, dense in zip(llama["adapters"], llama["dense"], strict=True):
        reader = LoraReader(adapter, base)
        ref = load_file(dense / "model.safetensors")
        ours = {k: reader.read(k) for k in reader.keys()}
        _close(ours, ref)
        assert len(reader.adapters) == 6  # 3 modules × 2 layers
        # slices of the flattened tensor are the same numbers
        for name in reader.adapters:
            flat = ours[name].reshape(-1)
            for start, length in [(0, 7), (5, 61), (flat.numel() - 9, 9)]:
                assert torch.equal(reader.read_range(name, start, length), flat[start : start + length])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "tsv_m", "neuromerging", "linear"])
def test_methods_merge_adapters_as_their_dense_fine_tunes(llama, method):
    """Adapters, one adapter and one dense fine-tune, and both dense give the same merge (up to the
    float32 rounding of PEFT's merge), streamed in small slices."""
    base = str(llama["base"])
    kw = {"seed": 1, "chunk_elements": 100}
    dense = alloykit.merge([str(p) for p in llama["dense"]], base, method, **kw).state_dict
    adapters = alloykit.merge([str(p) for p in llama["adapters"]], base, method, **kw).state_dict
    mixed = alloykit.merge([str(llama["adapters"][0]), str(llama["dense"][1])], base, method, **kw).state_dict
    _close(adapters, dense, atol=1e-5)
    _close(mixed, dense, atol=1e-5)


def test_mergekit_model_plus_lora_notation(llama):
    base = str(llama["base"])
    spec = [f"{base}+{llama['adapters'][0]}", str(llama["dense"][1])]
    got = alloykit.merge(spec, None, "linear").state_dict
    want = alloykit.merge([str(p) for p in llama["dense"]], None, "linear").state_dict
    _close(got, want)


def test_fan_in_fan_out_embeddings_and_modules_to_save(tmp_path):
    """GPT-2 (Conv1D: weight stored in × out), an adapted embedding and a saved module."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=1, n_head=2)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    ad = _adapter(base, tmp_path / "ad", 3, r=3, lora_alpha=6, target_modules=["c_attn", "wte"],
                  fan_in_fan_out=True, modules_to_save=["ln_f"])  # fmt: skip
    with torch.no_grad():
        for n, p in ad.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5)
    ad.save_pretrained(tmp_path / "ad")
    merged = ad.merge_and_unload()
    ref = {k: v.detach() for k, v in merged.state_dict().items()}
    reader = LoraReader(tmp_path / "ad", open_checkpoint(tmp_path / "base"))
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"} <= set(reader.adapters)
    assert "transformer.ln_f.weight" in reader.replaced
    for k in reader.keys():
        if k in ref:
            torch.testing.assert_close(reader.read(k).float(), ref[k].float(), rtol=0, atol=2e-6, msg=k)


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_adapters_are_named(llama, tmp_path):
    base = str(llama["base"])
    ad = llama["adapters"][0]
    cases = [
        (_edit_config(ad, tmp_path / "dora", use_dora=True), CheckpointError, "DoRA adapter"),
        (_edit_config(ad, tmp_path / "r0", r=0), CheckpointError, "rank r = 0"),
        (_edit_config(ad, tmp_path / "alpha", lora_alpha=-1), CheckpointError, "lora_alpha = -1"),
        (_edit_config(ad, tmp_path / "ia3", peft_type="IA3"), CheckpointError, "a IA3 adapter"),
        (_edit_config(ad, tmp_path / "rank", r=8), CheckpointError, "rank 4 in the file, 8 in the config"),
    ]
    for folder, err, words in cases:
        with pytest.raises(err, match=words):
            alloykit.merge([str(folder), str(llama["dense"][1])], base, "task_arithmetic")
    # an adapter on another base: shapes differ
    other = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )  # fmt: skip
    )
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(MismatchError, match="trained on another base model"):
        alloykit.merge([str(ad), str(llama["adapters"][1])], str(tmp_path / "other"), "task_arithmetic")
    # a target module the base lacks
    bad = tmp_path / "missing"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
    t = load_file(ad / "adapter_model.safetensors")
    t = {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}
    save_file(t, bad / "adapter_model.safetensors")
    with pytest.raises(MismatchError, match=r"targets 'model\.layers\.7\."):
        alloykit.merge([str(bad), str(ad)], base, "task_arithmetic")
    with pytest.raises(ParameterError, match="is a LoRA adapter: give its base model"):
        alloykit.merge([str(ad), str(llama["adapters"][1])], None, "linear")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError):
        alloykit.merge([str(cases[0][0]), str(ad)], base, "ties", output=out)
    assert not out.exists()


def test_mergekit_recipe_with_model_plus_lora(llama, tmp_path):
    from typer.testing import CliRunner

    from alloykit.cli.main import app

    recipe = tmp_path / "mk.yml"
    recipe.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {llama['base']}\n"
        "models:\n"
        f"  - model: {llama['base']}+{llama['adapters'][0]}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {llama['dense'][1]}\n    parameters: {{weight: 1.0}}\n"
        "dtype: float32\n"
    )
    res = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = alloykit.merge([str(p) for p in llama["dense"]], str(llama["base"]), "task_arithmetic").state_dict
    _close(got, want, atol=1e-5)
    recipe.write_text(recipe.read_text().replace(str(llama["adapters"][0]), str(tmp_path / "nowhere")))
    res = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out2")])
    assert res.exit_code == 2 and "is not a local PEFT adapter folder" in res.output


# ----------------------------------------------------------------------------- extract-lora


def _low_rank_finetune(base_model, folder, rank=3, seed=5, norm_shift=0.1):
    """base + a rank-``rank`` update on q_proj and down_proj of every layer, and a shifted norm."""
    import copy

    g = torch.Generator().manual_seed(seed)
    ft = copy.deepcopy(base_model)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if n.endswith(("q_proj.weight", "down_proj.weight")):
                p.add_(
                    0.05
                    * torch.randn(p.shape[0], rank, generator=g)
                    @ torch.randn(rank, p.shape[1], generator=g)
                )
            elif n == "model.norm.weight":
                p.add_(norm_shift)
    ft.save_pretrained(folder, safe_serialization=True)
    return ft


def test_extracted_adapter_loads_with_peft_and_reproduces_the_model(llama, tmp_path):
    from typer.testing import CliRunner

    from alloykit.cli.main import app

    base_model = transformers.LlamaForCausalLM.from_pretrained(llama["base"]).eval()
    ft = _low_rank_finetune(base_model, tmp_path / "ft")
    out = tmp_path / "adapter"
    res = CliRunner().invoke(
        app,
        [
            "extract-lora",
            str(tmp_path / "ft"),
            "-b",
            str(llama["base"]),
            "-o",
            str(out),
            "--rank",
            "4",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert sorted(report["modules"]) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
    )
    assert all(m["rank"] == 4 and m["relative_error"] < 1e-5 for m in report["modules"].values())
    assert report["modules_to_save"] == ["model.norm"] and report["dropped"] == {}
    loaded = peft.PeftModel.from_pretrained(base_model, out).merge_and_unload()
    want = ft.state_dict()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-5, msg=k)
    x = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(loaded(x).logits, ft(x).logits, rtol=0, atol=1e-4)
    # the adapter is also a model for alloykit, on its base
    other = str(llama["dense"][1])
    via_adapter = alloykit.merge([str(out), other], str(llama["base"]), "task_arithmetic").state_dict
    via_dense = alloykit.merge(
        [str(tmp_path / "ft"), other], str(llama["base"]), "task_arithmetic"
    ).state_dict
    _close(via_adapter, via_dense, atol=1e-5)


def test_energy_picks_the_smallest_rank_and_reports_the_truncation_error(llama, tmp_path):
    from alloykit.io.lora_export import extract_lora

    dense = llama["dense"][0]  # adapter 1 merged: rank 4 updates on q, v and down
    res = extract_lora(dense, llama["base"], tmp_path / "e", energy=0.9)
    for module, m in res.modules.items():
        fine = load_file(dense / "model.safetensors")[f"{module}.weight"].double()
        base = load_file(llama["base"] / "model.safetensors")[f"{module}.weight"].double()
        s = torch.linalg.svdvals(fine - base)
        e = s.square() / s.square().sum()
        assert m["rank"] <= 4 and float(e[: m["rank"]].sum()) >= 0.9 > float(e[: m["rank"] - 1].sum())
        # a truncated SVD's error is the energy it leaves out
        assert m["relative_error"] == pytest.approx((1 - m["energy"]) ** 0.5, abs=1e-4)
    capped = extract_lora(dense, llama["base"], tmp_path / "c", energy=1.0, max_rank=2)
    assert all(m["rank"] == 2 for m in capped.modules.values())


def test_extract_lora_refuses_what_it_cannot_do(llama, tmp_path):
    from alloykit.io.lora_export import extract_lora

    with pytest.raises(ParameterError, match="energy = 1.5"):
        extract_lora(llama["dense"][0], llama["base"], tmp_path / "a", energy=1.5)
    with pytest.raises(MismatchError, match="does not differ from the base"):
        extract_lora(llama["base"], llama["base"], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_merge_with_lora_output_writes_an_adapter_that_reproduces_the_dense_merge(llama, tmp_path):
    from typer.testing import CliRunner

    from alloykit.cli.main import app

    base_model = transformers.LlamaForCausalLM.from_pretrained(llama["base"]).eval()
    _low_rank_finetune(base_model, tmp_path / "ft1", seed=5)
    _low_rank_finetune(base_model, tmp_path / "ft2", seed=6, norm_shift=0.3)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        json.dumps(
            {
                "method": "task_arithmetic",
                "base_model": str(llama["base"]),
                "models": [{"model": str(tmp_path / "ft1")}, {"model": str(tmp_path / "ft2")}],
                "parameters": {"lambda": 0.5},
            }
        )
    )
    out = tmp_path / "adapter"
    args = ["merge", str(recipe), "-o", str(out), "--output-format", "lora", "--lora-rank", "6", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    # two rank-3 updates summed: rank 6 holds them exactly
    assert summary["lora"]["modules"] == 4 and summary["lora"]["ranks"] == [6, 6]
    assert summary["lora"]["max_relative_error"] < 1e-5 and summary["lora"]["modules_to_save"] == [
        "model.norm"
    ]
    assert summary["output"] == str(out) and (out / "adapter_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if "alloykit-dense" in p.name] == []  # the dense merge is gone
    dense = alloykit.merge(
        [str(tmp_path / "ft1"), str(tmp_path / "ft2")],
        str(llama["base"]),
        "task_arithmetic",
        parameters={"lambda": 0.5},
    ).state_dict
    loaded = peft.PeftModel.from_pretrained(base_model, out).merge_and_unload()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, dense[k], rtol=0, atol=1e-5, msg=k)
    # without a base model there is no adapter to write
    recipe.write_text(
        json.dumps(
            {
                "method": "linear",
                "models": [{"model": str(tmp_path / "ft1")}, {"model": str(tmp_path / "ft2")}],
            }
        )
    )
    res = CliRunner().invoke(
        app, ["merge", str(recipe), "-o", str(tmp_path / "x"), "--output-format", "lora"]
    )
    assert res.exit_code != 0 and "needs a base_model folder" in " ".join(res.output.split())
