"""alloykit merges by tensor names, not architecture tables: tiny random checkpoints of dense
decoders, mixture-of-experts decoders, a vision-language model and an encoder, built here with
``transformers``, merge with every tensor kept, load back with ``from_pretrained`` and hold the
task-arithmetic values computed independently."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from alloykit.cli.main import app  # noqa: E402

runner = CliRunner()
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2))


def _qwen3():
    cfg = transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=8)
    return transformers.Qwen3ForCausalLM(cfg)


def _gemma3():
    cfg = transformers.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=8, sliding_window=16)
    return transformers.Gemma3ForCausalLM(cfg)


def _qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(
        **SMALL,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def _mixtral():
    cfg = transformers.MixtralConfig(
        **SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
    )
    return transformers.MixtralForCausalLM(cfg)


def _llava():
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    text = transformers.LlamaConfig(**SMALL, num_key_value_heads=2)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=95)
    return transformers.LlavaForConditionalGeneration(cfg)


def _bert():
    cfg = transformers.BertConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=96
    )
    return transformers.BertModel(cfg)


ARCHITECTURES = {
    "llama": _llama,
    "qwen3": _qwen3,
    "gemma3": _gemma3,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "llava": _llava,
    "bert": _bert,
}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _recipe(root: Path, base: Path, fts: list[Path], **top: Any) -> str:
    data = {
        "method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(f)} for f in fts],
        "parameters": {"lambda": 0.5},
        **top,
    }
    path = root / "recipe.yml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def _family(build: Any, root: Path) -> tuple[Path, list[Path], type]:
    """A base and two fine-tunes (base + 1 % seeded noise on every float tensor), saved."""
    torch.manual_seed(0)
    model = build().eval()
    base = root / "base"
    model.save_pretrained(base)
    fts = []
    for i in (1, 2):
        folder = root / f"ft{i}"
        model.save_pretrained(folder)
        (weights,) = folder.glob("*.safetensors")
        g = torch.Generator().manual_seed(i)
        state = load_file(weights)
        for k, v in state.items():
            if v.is_floating_point():
                scale = 0.01 * (float(v.float().square().mean().sqrt()) + 1e-3)  # relative noise
                state[k] = v + scale * torch.randn(v.shape, generator=g).to(v.dtype)
        save_file(state, str(weights), metadata={"format": "pt"})
        fts.append(folder)
    return base, fts, type(model)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_tensor_is_kept_and_the_merge_loads(arch: str, tmp_path: Path) -> None:
    base, fts, cls = _family(ARCHITECTURES[arch], tmp_path)
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", _recipe(tmp_path, base, fts), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    b, a, c = _weights(base), _weights(fts[0]), _weights(fts[1])
    merged = _weights(out)
    assert sorted(merged) == sorted(b) == sorted(a) == sorted(c)  # nothing dropped, nothing added
    floats = [k for k in b if b[k].is_floating_point()]
    assert summary["merged"] == len(floats) and summary["skipped"] == 0
    assert summary["tensors"] == len(b)
    for k in b:  # θ0 + 0.5 (τ1 + τ2), computed here in float32
        expected = (
            b[k] if k not in floats else b[k].float() + 0.5 * ((a[k].float() - b[k]) + (c[k].float() - b[k]))
        )
        torch.testing.assert_close(merged[k].float(), expected.float(), rtol=1e-6, atol=1e-6, msg=k)
    loaded = cls.from_pretrained(out)
    state = loaded.state_dict()
    for k in floats:
        if k in state:
            torch.testing.assert_close(state[k].float(), merged[k].float(), rtol=0, atol=0, msg=k)


def test_a_skipped_tensor_is_counted_and_named(tmp_path: Path) -> None:
    base, fts, _ = _family(_llama, tmp_path)
    (weights,) = fts[1].glob("*.safetensors")
    state = load_file(weights)
    state["extra_head.weight"] = torch.zeros(3, 32)
    save_file(state, str(weights), metadata={"format": "pt"})
    args = ["merge", _recipe(tmp_path, base, fts), "--keys", "union"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["skipped"] == 1
    left_out = [
        w for w in summary["warnings"] if re.search(r"1 tensors that \S*base does not have are left out", w)
    ]
    assert len(left_out) == 1 and "extra_head.weight" in left_out[0], summary["warnings"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "out2")], env={"COLUMNS": "200"})
    assert "1 held by an input left out" in res.output


def test_vocabularies_that_differ_say_what_to_do_and_excluding_the_embeddings_merges(tmp_path: Path) -> None:
    base, fts, cls = _family(_llama, tmp_path)
    grown = cls.from_pretrained(fts[1])
    grown.resize_token_embeddings(98)  # a fine-tune that added two tokens
    grown.save_pretrained(fts[1])
    res = runner.invoke(app, ["merge", _recipe(tmp_path, base, fts), "-o", str(tmp_path / "out")])
    assert res.exit_code != 0
    text = " ".join(res.output.split())
    assert (
        "'lm_head.weight' has different shapes" in text or "'model.embed_tokens.weight' has different" in text
    )
    assert "vocabularies differ (96 vs 98 tokens)" in text and "exclude: [embed, lm_head]" in text
    assert "tokenizer: {source: union}" in text and "--tokenizer-source union" in text
    recipe = _recipe(tmp_path, base, fts, exclude=["embed", "lm_head"])
    res = runner.invoke(app, ["merge", recipe, "-o", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (
        sum("shapes differ between models; excluded, so copied from" in w for w in summary["warnings"]) == 2
    )
    merged, b = _weights(tmp_path / "out"), _weights(base)
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    cls.from_pretrained(tmp_path / "out")
