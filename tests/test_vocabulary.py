"""Models whose vocabularies differ (mergekit's ``tokenizer_source`` / ``tokenizer:``).

A tiny Llama base with its own tokenizer (64 tokens, 66 embedding rows: two padding rows) and
three fine-tunes: ``ft_a`` shares the base's tokenizer; ``ft_b`` adds six tokens; ``ft_c`` lacks
the base's last token, adds two of ``ft_b``'s tokens and three of its own, and stores its whole
vocabulary in a shuffled order (its embedding rows shuffled with it). ``ft_c_sorted`` is ``ft_c``
with its vocabulary in the base's order. Every result is checked token by token: against
mergekit 0.1.5 (bit for bit), against the rules computed by hand, and by the property that the
order in which a model stores its vocabulary does not change the merge.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import alloykit  # noqa: E402
from alloykit.cli.main import app  # noqa: E402
from alloykit.errors import AlloykitError  # noqa: E402
from alloykit.recipe import recipe_from_dict  # noqa: E402

BASE_TOKENS = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(61)]
B_NEW = [f"b{i}" for i in range(6)]
C_NEW = ["b0", "b1", "c0", "c1", "c2"]
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
runner = CliRunner()


def _save_tokenizer(tokens: list[str], folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("vocab_models")
    cfg = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base_state = {
        k: v.detach().clone()
        for k, v in LlamaForCausalLM(LlamaConfig(**cfg, vocab_size=66)).state_dict().items()
    }
    paths: dict[str, str] = {}
    rows: dict[str, dict[str, torch.Tensor]] = {}  # name -> {token-indexed tensor: rows by token}

    def save(
        name: str, tokens: list[str], state: dict[str, torch.Tensor], with_tokenizer: bool = True
    ) -> None:
        n = state["model.embed_tokens.weight"].shape[0]
        model = LlamaForCausalLM(LlamaConfig(**cfg, vocab_size=n))
        model.load_state_dict(state)
        model.save_pretrained(root / name)
        if with_tokenizer:
            _save_tokenizer(tokens, root / name)
        paths[name] = str(root / name)

    def fine_tune(seed: int, tokens: list[str], order: list[int] | None = None) -> dict[str, torch.Tensor]:
        """θ₀ + noise; token rows: the base's (plus noise) for base tokens, random for new ones,
        then stored in ``order``."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for k, v in base_state.items():
            t = v + 0.01 * torch.randn(v.shape, generator=g)
            if k in VOCAB and tokens != BASE_TOKENS:
                new = torch.randn(len(tokens), v.shape[1], generator=g)
                by_base = {tok: i for i, tok in enumerate(BASE_TOKENS)}
                t = torch.stack(
                    [t[by_base[tok]] if tok in by_base else new[i] for i, tok in enumerate(tokens)]
                )
            if k in VOCAB and order is not None:
                t = t[torch.tensor(order)]
            out[k] = t
        return out

    save("base", BASE_TOKENS, base_state)
    save("ft_a", BASE_TOKENS, fine_tune(1, BASE_TOKENS))
    b_tokens = BASE_TOKENS + B_NEW
    save("ft_b", b_tokens, fine_tune(2, b_tokens))
    c_tokens = BASE_TOKENS[:-1] + C_NEW  # lacks the base's last token
    c_sorted = fine_tune(3, c_tokens)
    save("ft_c_sorted", c_tokens, c_sorted)
    order = list(range(len(c_tokens)))
    random.Random(0).shuffle(order)
    shuffled = {k: (v[torch.tensor(order)] if k in VOCAB else v) for k, v in c_sorted.items()}
    save("ft_c", [c_tokens[i] for i in order], shuffled)
    save("no_tokenizer", BASE_TOKENS, fine_tune(1, BASE_TOKENS), with_tokenizer=False)
    for name, tokens in (
        ("base", BASE_TOKENS),
        ("ft_a", BASE_TOKENS),
        ("ft_b", b_tokens),
        ("ft_c_sorted", c_tokens),
    ):
        state = _load(Path(paths[name]))
        rows[name] = {k: {tok: state[k][i] for i, tok in enumerate(tokens)} for k in VOCAB}
    return {"paths": paths, "rows": rows}


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _by_token(folder: Path) -> tuple[dict[str, int], dict[str, torch.Tensor], int]:
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(folder), local_files_only=True).get_vocab()
    size = json.loads((folder / "config.json").read_text())["vocab_size"]
    return vocab, _load(folder), size


def _recipe(p: dict[str, str], method: str = "task_arithmetic", **top: Any) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": p["base"],
        "models": [
            {"model": p["ft_a"], "parameters": {"weight": 0.5}},
            {"model": p["ft_b"], "parameters": {"weight": 0.7}},
            {"model": p["ft_c"], "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
        **top,
    }


def _cases(p: dict[str, str]) -> dict[str, dict[str, Any]]:
    linear = _recipe(p, "linear", tokenizer_source="union")
    linear["models"].append({"model": p["base"], "parameters": {"weight": 0.3}})
    tokens = {
        "b0": {"source": {"kind": "zero"}, "force": True},
        "c1": {"source": {"kind": "model_token", "model": p["ft_a"], "token": "t5"}},
        "c2": {"source": {"kind": "model_token", "model": p["ft_b"], "token_id": 3}, "force": True},
        "t3": {"source": p["ft_c"], "force": True},
        "new_token": {"source": {"kind": "zero"}},
    }
    return {
        "union": _recipe(p, tokenizer_source="union"),
        "union-linear-base-listed": linear,
        "union-ties": _recipe(p, "ties", tokenizer_source="union", parameters={"density": 0.5}),
        "base": _recipe(p, tokenizer_source="base"),
        "a-model": _recipe(p, tokenizer_source=p["ft_c"]),
        "tokens-and-padding": _recipe(
            p, tokenizer={"source": "union", "pad_to_multiple_of": 16, "tokens": tokens}
        ),
        "union-bf16": _recipe(p, tokenizer_source="union", dtype="bfloat16"),
        "union-bf16-out-fp32": _recipe(p, tokenizer_source="union", dtype="bfloat16", out_dtype="float32"),
    }


CASES = list(_cases({k: k for k in ("base", "ft_a", "ft_b", "ft_c")}))


def _run(data: dict[str, Any], out: Path, **kwargs: Any) -> Path:
    recipe = recipe_from_dict(copy.deepcopy(data))
    alloykit.merge(**{**recipe.merge_kwargs(), **kwargs}, output=out)
    return out


@pytest.mark.parametrize("case", CASES)
def test_rows_match_mergekit_token_by_token(case: str, family: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("mergekit")
    from tests.test_mergekit_parity import run_mergekit

    data = _cases(family["paths"])[case]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        theirs_v, theirs, theirs_n = _by_token(run_mergekit(copy.deepcopy(data), tmp_path / "mk"))
    ours_v, ours, ours_n = _by_token(_run(data, tmp_path / "ak"))
    assert set(ours_v) == set(theirs_v) and ours_n == theirs_n
    assert sorted(ours) == sorted(theirs)
    for name, want in theirs.items():
        got = ours[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if name in VOCAB:
            tokens = sorted(theirs_v)
            # token rows by token: mergekit's ids for union tokens change from run to run (hash
            # order), so rows are compared token by token
            assert torch.equal(got[[ours_v[t] for t in tokens]], want[[theirs_v[t] for t in tokens]]), name
            # padding rows (past the vocabulary) are the mean of the token rows: summed in id
            # order, so equal only to rounding while mergekit's ids vary
            torch.testing.assert_close(got[len(ours_v) :], want[len(theirs_v) :], rtol=0, atol=1e-6)
        else:
            assert torch.equal(got, want), name


def test_union_rows_follow_the_rules_computed_by_hand(family: dict[str, Any], tmp_path: Path) -> None:
    """task arithmetic θ₀ + Σ λ_t (θ_t − θ₀), per token, with the rows each rule gives."""
    p, rows = family["paths"], family["rows"]
    vocab, out, n = _by_token(_run(_recipe(p, tokenizer_source="union"), tmp_path / "out"))
    # the base's tokens keep their ids; the others follow in model order, then each model's own
    # id order (ft_c stores c0..c2 shuffled)
    order = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert order[:70] == BASE_TOKENS + B_NEW and sorted(order[70:]) == ["c0", "c1", "c2"]
    assert n == len(vocab) == 73 and out["lm_head.weight"].shape[0] == 73
    lam = {"ft_a": 0.5, "ft_b": 0.7, "ft_c_sorted": 0.4}
    for name in VOCAB:
        r = {m: rows[m][name] for m in rows}

        def merged(row_of: dict[str, torch.Tensor]) -> torch.Tensor:
            base = row_of["base"]
            return base + sum(lam[m] * (row_of[m] - base) for m in lam)

        def check(token: str, row_of: dict[str, torch.Tensor], name: str = name) -> None:
            torch.testing.assert_close(out[name][vocab[token]], merged(row_of), rtol=0, atol=1e-6)

        # every model has it: its own rows
        check("t7", {m: r[m]["t7"] for m in r})
        # ft_c lacks t60: it takes the base's row (its task vector is zero there)
        check("t60", {**{m: r[m]["t60"] for m in ("base", "ft_a", "ft_b")}, "ft_c_sorted": r["base"]["t60"]})
        # only ft_b has b3: every model takes ft_b's row, so the output is ft_b's row
        torch.testing.assert_close(out[name][vocab["b3"]], r["ft_b"]["b3"], rtol=0, atol=1e-6)
        # only ft_c has c1
        torch.testing.assert_close(out[name][vocab["c1"]], r["ft_c_sorted"]["c1"], rtol=0, atol=1e-6)
        # ft_b and ft_c have b0, the base does not: the others take their mean
        mean = (r["ft_b"]["b0"] + r["ft_c_sorted"]["b0"]) / 2
        check(
            "b0", {"base": mean, "ft_a": mean, "ft_b": r["ft_b"]["b0"], "ft_c_sorted": r["ft_c_sorted"]["b0"]}
        )
    # tensors that are not token-indexed are merged as usual
    a, b, c, base = (_load(Path(p[m])) for m in ("ft_a", "ft_b", "ft_c", "base"))
    key = "model.layers.0.mlp.up_proj.weight"
    want = base[key] + 0.5 * (a[key] - base[key]) + 0.7 * (b[key] - base[key]) + 0.4 * (c[key] - base[key])
    torch.testing.assert_close(out[key], want, rtol=0, atol=1e-6)


def test_the_order_a_model_stores_its_vocabulary_in_does_not_change_the_merge(
    family: dict[str, Any], tmp_path: Path
) -> None:
    p = family["paths"]
    results = []
    for c in ("ft_c", "ft_c_sorted"):
        data = _recipe(p, tokenizer_source="union")
        data["models"][2]["model"] = p[c]
        results.append(_by_token(_run(data, tmp_path / c)))
    (v1, t1, _), (v2, t2, _) = results
    assert set(v1) == set(v2)
    for name in t1:
        if name in VOCAB:
            tokens = sorted(v1)
            assert torch.equal(t1[name][[v1[t] for t in tokens]], t2[name][[v2[t] for t in tokens]]), name
        else:
            assert torch.equal(t1[name], t2[name]), name


def test_sliced_jobs_read_only_their_rows_and_give_the_same_bytes(
    family: dict[str, Any], tmp_path: Path
) -> None:
    """Elementwise jobs read 37-element slices (rows cut in the middle, padding rows included)."""
    data = _recipe(family["paths"], tokenizer={"source": "union", "pad_to_multiple_of": 16})
    whole = _load(_run(data, tmp_path / "whole"))
    sliced = _load(_run(data, tmp_path / "sliced", chunk_elements=37))
    assert whole["lm_head.weight"].shape[0] == 80  # 73 tokens padded to a multiple of 16
    # the padding rows are the mean of the token rows
    for name in VOCAB:
        torch.testing.assert_close(whole[name][73], whole[name][:73].mean(0), rtol=0, atol=1e-6)
    for name in whole:
        assert torch.equal(whole[name], sliced[name]), name


def test_the_output_loads_and_its_tokenizer_indexes_its_rows(family: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = _run(_recipe(family["paths"], tokenizer_source="union"), tmp_path / "out")
    model = LlamaForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == 73
    ids = tok("b3 c1 t7", add_special_tokens=False)["input_ids"]
    rows = family["rows"]
    emb = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(
        emb[ids[0]], rows["ft_b"]["model.embed_tokens.weight"]["b3"], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        emb[ids[1]], rows["ft_c_sorted"]["model.embed_tokens.weight"]["c1"], rtol=0, atol=1e-6
    )
    assert not (out / "tokenizer.model").exists()  # the base's files are not copied beside it


def test_cli_option_and_summary_count_each_rule(family: dict[str, Any], tmp_path: Path) -> None:
    p = family["paths"]
    recipe = tmp_path / "r.yml"
    data = {
        "method": "task_arithmetic",
        "base_model": p["base"],
        "models": [{"model": p["ft_a"]}, {"model": p["ft_b"]}, {"model": p["ft_c"]}],
    }
    import yaml

    recipe.write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "o"), "--json"])
    assert res.exit_code != 0 and "--tokenizer-source union" in " ".join(res.output.split())
    res = runner.invoke(
        app, ["merge", str(recipe), "-o", str(tmp_path / "o"), "--json", "--tokenizer-source", "union"]
    )
    assert res.exit_code == 0, res.output
    vo = json.loads(res.stdout)["vocabulary"]
    # b2..b5 and c0..c2 from their one model, t60 from the base; b0, b1 means
    assert (vo["tokens"], vo["rows"], vo["from_one_model"], vo["mean_of_models"], vo["zeros"]) == (
        73,
        73,
        8,
        2,
        0,
    )
    assert vo["tensors"] == sorted(VOCAB)
    # the same as an alloykit recipe with tokenizer: {source: union}
    ours = _load(tmp_path / "o")
    data["tokenizer"] = {"source": "union"}
    recipe.write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "o2"), "--json"])
    assert res.exit_code == 0, res.output
    again = _load(tmp_path / "o2")
    assert all(torch.equal(ours[k], again[k]) for k in ours)


def _fails(data: dict[str, Any], tmp_path: Path, match: str) -> None:
    out = tmp_path / "bad"
    with pytest.raises(AlloykitError, match=match):
        _run(data, out)
    assert not out.exists()


def test_bad_tokenizer_settings_are_refused_with_a_message_and_nothing_written(
    family: dict[str, Any], tmp_path: Path
) -> None:
    p = family["paths"]
    base_without = _recipe(p, tokenizer_source="union")
    base_without["base_model"] = p["no_tokenizer"]
    _fails(base_without, tmp_path, r"no tokenizer files in .*no_tokenizer")
    _fails(
        _recipe(p, tokenizer_source=str(tmp_path / "nowhere")), tmp_path, "expected base, union or a local"
    )
    shutil.copytree(p["no_tokenizer"], tmp_path / "source_without")
    _fails(_recipe(p, tokenizer_source=str(tmp_path / "source_without")), tmp_path, "no tokenizer files")
    tokens = {"x": {"source": str(tmp_path)}}
    _fails(_recipe(p, tokenizer={"tokens": tokens}), tmp_path, "is not one of the models")
    tokens = {"c0": {"source": p["ft_a"], "force": True}}
    _fails(_recipe(p, tokenizer={"tokens": tokens}), tmp_path, "does not have this token")
    tokens = {"c0": {"source": {"kind": "model_token", "model": p["ft_a"], "token_id": 99}}}
    _fails(_recipe(p, tokenizer={"tokens": tokens}), tmp_path, r"token id 99 is out of range .*66 rows")
    tokens = {"c0": {"source": {"kind": "model_token", "model": p["ft_a"], "token": "zz"}}}
    _fails(_recipe(p, tokenizer={"tokens": tokens}), tmp_path, "token 'zz' is not in")
    _fails(_recipe(p, tokenizer={"source": "union", "pad_to_multiple_of": 0}), tmp_path, "pad_to_multiple_of")
    _fails(_recipe(p, tokenizer={"source": "union", "padding": 8}), tmp_path, r"unknown keys \['padding'\]")
    with pytest.raises(AlloykitError, match="unknown keys"):
        alloykit.merge([p["ft_a"]], p["base"], "task_arithmetic", tokenizer={"sorce": "union"})
    # a tokenizer whose ids have a gap cannot index rows
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    gap = tmp_path / "gap"
    vocab = {t: (i if i < 10 else i + 5) for i, t in enumerate(BASE_TOKENS)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(gap)
    _fails(_recipe(p, tokenizer_source=str(gap)), tmp_path, "without gaps")


def test_a_model_without_a_tokenizer_is_taken_to_share_the_bases(
    family: dict[str, Any], tmp_path: Path
) -> None:
    """mergekit's rule (with a warning): its rows are then read in the base's order."""
    p = family["paths"]
    data = _recipe(p, tokenizer_source="union")
    data["models"] = [{"model": p["no_tokenizer"], "parameters": {"weight": 1.0}}]
    plain = dict(data)
    del plain["tokenizer_source"]
    mapped, unmapped = _load(_run(data, tmp_path / "a")), _load(_run(plain, tmp_path / "b"))
    for name in mapped:
        want = unmapped[name][:64] if name in VOCAB else unmapped[name]  # the padding rows go
        assert torch.equal(mapped[name], want), name


def test_dry_run_plans_the_output_rows(family: dict[str, Any]) -> None:
    recipe = recipe_from_dict(copy.deepcopy(_recipe(family["paths"], tokenizer_source="union")))
    result = alloykit.merge(**recipe.merge_kwargs(), dry_run=True)
    shapes = {m.name: m.shape for m in result.plan.outputs}
    assert shapes["lm_head.weight"] == (73, 16) and result.vocabulary["tokens"] == 73


def test_a_lora_adapter_takes_its_base_models_vocabulary(family: dict[str, Any], tmp_path: Path) -> None:
    """An adapter folder has no config or tokenizer: its rows are its base's, in the base's
    token order; merged with a model that adds tokens, it gives what its dense weights give."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    p = family["paths"]
    base = LlamaForCausalLM.from_pretrained(p["base"])
    torch.manual_seed(4)
    adapted = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        for n, w in adapted.named_parameters():
            if "lora_" in n:
                w.normal_(0, 0.05)
    adapted.save_pretrained(tmp_path / "adapter")
    dense = tmp_path / "dense"
    adapted.merge_and_unload().save_pretrained(dense)
    _save_tokenizer(BASE_TOKENS, dense)
    results = {}
    for name, model in (("adapter", str(tmp_path / "adapter")), ("dense", str(dense))):
        data = _recipe(p, tokenizer_source="union")
        data["models"] = [{"model": model, "parameters": {"weight": 0.5}}, data["models"][1]]
        results[name] = _by_token(_run(data, tmp_path / f"out-{name}"))
    (va, ta, na), (vd, td, nd) = results["adapter"], results["dense"]
    assert va == vd and na == nd == 70
    for name in td:
        torch.testing.assert_close(ta[name], td[name], rtol=0, atol=2e-6)


def test_ray_jobs_read_the_mapped_rows_too(family: dict[str, Any], tmp_path: Path) -> None:
    """The wrapped readers travel to Ray tasks: the same bytes as in this process."""
    ray = pytest.importorskip("ray")
    data = _recipe(family["paths"], tokenizer_source="union")
    here = _load(_run(data, tmp_path / "thread"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        there = _load(_run(data, tmp_path / "ray", executor="ray", workers=2))
    finally:
        ray.shutdown()
    assert sorted(here) == sorted(there)
    for name in here:
        assert torch.equal(here[name], there[name]), name
