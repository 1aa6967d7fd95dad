"""A tiny Hugging Face model built in the test, merged from its folders, loaded back with
``from_pretrained``: the merged model computes what the merged weights say it should."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from alloykit import merge  # noqa: E402


def tiny_llama(seed: int):
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    base = tiny_llama(0)
    base.save_pretrained(tmp / "base")
    fts = []
    for i in range(2):
        ft = tiny_llama(0)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        # one sharded fine-tune, to read an index
        ft.save_pretrained(tmp / f"ft{i}", max_shard_size="40KB" if i == 0 else "5GB")
        fts.append(ft)
    return tmp, base, fts


def test_sharded_hf_input_is_read(hf_models):
    tmp, _, _ = hf_models
    assert (tmp / "ft0" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("shard_size", ["5GB", "30KB"])
def test_merged_hf_folder_loads_with_from_pretrained_and_matches(hf_models, shard_size):
    tmp, base, fts = hf_models
    out = tmp / f"merged-{shard_size}"
    merge(
        [tmp / "ft0", tmp / "ft1"],
        tmp / "base",
        "task_arithmetic",
        out,
        parameters={"lambda": 0.6},
        shard_size=shard_size,
    )
    if shard_size == "30KB":
        assert (out / "model.safetensors.index.json").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    # independent: the same arithmetic on the modules' own parameters
    expected = tiny_llama(0)
    sd_b, sd_0, sd_1 = base.state_dict(), fts[0].state_dict(), fts[1].state_dict()
    expected.load_state_dict({k: sd_b[k] + 0.6 * ((sd_0[k] - sd_b[k]) + (sd_1[k] - sd_b[k])) for k in sd_b})
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)
        # and it is not just the base
        assert not torch.allclose(loaded(ids).logits, base(ids).logits, atol=1e-3)


def test_merge_modules_directly(hf_models):
    _, base, fts = hf_models
    sd = merge(fts, base, "linear").state_dict
    w = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(sd[w], (fts[0].state_dict()[w] + fts[1].state_dict()[w]) / 2)
