"""Parity with mergekit 0.1.5: the same mergekit YAML, run by mergekit and by alloykit, must give
the same tensors (bit for bit), the same tensor names and the same dtypes.

Everything is local: a tiny Llama is built and saved here, then perturbed into "fine-tunes";
mergekit only ever sees local folders (and the Hugging Face hub is switched to offline mode).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

mergekit = pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import alloykit  # noqa: E402
from alloykit.errors import RecipeError  # noqa: E402
from alloykit.recipe import recipe_from_dict  # noqa: E402

# ----------------------------------------------------------------------------- models

# name -> seed of its noise (None: the base itself); the bf16 models are the fp32 ones, rounded
FP32 = {"base": None, "ft_a": 1, "ft_b": 2, "ft_c": 3}
BF16 = {"base_bf16": None, "ft_a_bf16": 1, "ft_b_bf16": 2}


def _perturb(state: dict[str, torch.Tensor], seed: int, rel: float = 1e-2) -> dict[str, torch.Tensor]:
    """θ + ε with ε ~ N(0, (rel · rms(θ))²) on every tensor (rms, not std: norms start at 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        rms = t.float().square().mean().sqrt()
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * (rel * rms)
        out[name] = (t.float() + noise).to(t.dtype)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Local folders: a float32 base and three fine-tunes, and bfloat16 copies of three of them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mk_models")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths: dict[str, str] = {}
    for dtype, names in ((torch.float32, FP32), (torch.bfloat16, BF16)):
        for name, seed in names.items():
            state = base_state if seed is None else _perturb(base_state, seed)
            model.load_state_dict(state)
            out = root / name
            model.to(dtype)
            model.config.dtype = dtype
            model.save_pretrained(out)
            model.to(torch.float32)
            paths[name] = str(out)
    return paths


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


# ----------------------------------------------------------------------------- running both


def run_mergekit(data: dict[str, Any], out: Path) -> Path:
    config = MergeConfiguration.model_validate(copy.deepcopy(data))
    options = MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False,
                           cuda=False, device="cpu", write_model_card=False, quiet=True,
                           random_seed=0)
    run_merge(config, str(out), options=options)
    return out


def run_alloykit(data: dict[str, Any], out: Path, **kwargs: Any) -> Path:
    recipe = recipe_from_dict(copy.deepcopy(data))
    alloykit.merge(**recipe.merge_kwargs(), output=out, **kwargs)
    return out


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    shards = sorted(folder.glob("*.safetensors"))
    assert shards, f"no safetensors in {folder}"
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(shard)
        assert not set(part) & set(tensors), f"tensor written twice in {folder}"
        tensors.update(part)
    return tensors


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs), (
        f"key sets differ: only alloykit {sorted(set(ours) - set(theirs))}, "
        f"only mergekit {sorted(set(theirs) - set(ours))}"
    )
    problems = []
    worst = 0.0
    for name in sorted(theirs):
        a, b = ours[name], theirs[name]
        if a.shape != b.shape:
            problems.append(f"{name}: shape {list(a.shape)} (alloykit) != {list(b.shape)}")
            continue
        diff = (a.double() - b.double()).abs()
        if a.dtype != b.dtype or bool((diff > 0).any()):
            worst = max(worst, float(diff.max()))
            note = f"dtype {a.dtype} (alloykit) != {b.dtype}, " if a.dtype != b.dtype else ""
            if a.dtype != b.dtype:
                low = a.dtype if a.dtype.itemsize < b.dtype.itemsize else b.dtype
                same_rounded = torch.equal(a.to(low), b.to(low))
                note += f"equal once both are rounded to {low}: {same_rounded}, "
            problems.append(f"{name}: {note}{int((diff > 0).sum())}/{diff.numel()} entries "
                            f"differ, max abs diff {float(diff.max()):.3e}")
    if problems:
        problems.insert(0, f"{len(problems)}/{len(theirs)} tensors differ, "
                           f"max abs diff {worst:.3e}")
    assert not problems, "alloykit != mergekit:\n  " + "\n  ".join(problems)
    # The goal is bit-for-bit equality; kept as assert_close for its standard diagnostics.
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)


# ----------------------------------------------------------------------------- recipes

Recipe = Callable[[dict[str, str]], dict[str, Any]]


def _m(path: str, **parameters: Any) -> dict[str, Any]:
    return {"model": path, "parameters": parameters} if parameters else {"model": path}


def _task(method: str, params: dict[str, Any] | None = None,
          model_params: tuple[dict[str, Any], ...] = ({"weight": 0.7}, {"weight": 1.3}),
          names: tuple[str, ...] = ("ft_a", "ft_b"), base: str = "base",
          **top: Any) -> Recipe:
    def build(p: dict[str, str]) -> dict[str, Any]:
        data: dict[str, Any] = {
            "merge_method": method,
            "base_model": p[base],
            "models": [_m(p[n], **mp) for n, mp in zip(names, model_params, strict=True)],
        }
        if params is not None:
            data["parameters"] = params
        data.update(top)
        return data

    return build


def _linear(weights: tuple[float, ...], names: tuple[str, ...],
            params: dict[str, Any] | None = None, base: str | None = None, **top: Any) -> Recipe:
    def build(p: dict[str, str]) -> dict[str, Any]:
        data: dict[str, Any] = {
            "merge_method": "linear",
            "models": [_m(p[n], weight=w) for n, w in zip(names, weights, strict=True)],
        }
        if base is not None:
            data["base_model"] = p[base]
        if params is not None:
            data["parameters"] = params
        data.update(top)
        return data

    return build


def _base_listed(method: str, params: dict[str, Any]) -> Recipe:
    """mergekit allows the base among ``models`` (task-vector methods skip it)."""

    def build(p: dict[str, str]) -> dict[str, Any]:
        return {
            "merge_method": method,
            "base_model": p["base"],
            "models": [_m(p["base"]), _m(p["ft_a"], weight=0.7), _m(p["ft_b"], weight=1.3)],
            "parameters": params,
        }

    return build


MLP_DENSITY = [{"filter": "mlp", "value": 0.7}, {"value": 0.3}]

CASES: dict[str, Recipe] = {
    # linear
    "linear-normalize": _linear((0.3, 1.2, 2.5), ("ft_a", "ft_b", "ft_c")),
    "linear-normalize-true": _linear((0.3, 1.2), ("ft_a", "ft_b"), {"normalize": True}),
    "linear-normalize-false": _linear((0.3, 1.2), ("ft_a", "ft_b"), {"normalize": False}),
    "linear-base-listed": _linear((0.5, 0.2, 1.1), ("base", "ft_a", "ft_b")),
    "linear-base_model-listed": _linear((0.5, 0.2, 1.1), ("base", "ft_a", "ft_b"),
                                        base="base"),
    "linear-bf16-models": _linear((0.3, 1.2), ("ft_a_bf16", "ft_b_bf16")),
    "linear-dtype-bf16": _linear((0.3, 1.2), ("ft_a", "ft_b"), dtype="bfloat16"),
    "linear-dtype-fp32-on-bf16": _linear((0.3, 1.2), ("ft_a_bf16", "ft_b_bf16"),
                                         dtype="float32"),
    # no dtype: mergekit computes in the promoted dtype of the inputs (float32) and writes it
    "linear-mixed-dtypes": _linear((0.3, 1.2), ("ft_a_bf16", "ft_b")),
    # mergekit adds a base_model missing from models to linear's inputs (global weight applies)
    "linear-base_model-unlisted": _linear((0.3, 1.2), ("ft_a", "ft_b"), {"weight": 1.0},
                                          base="base"),
    # task arithmetic
    "ta": _task("task_arithmetic"),
    "ta-lambda-normalize": _task("task_arithmetic", {"lambda": 0.7, "normalize": True}),
    "ta-lambda-no-normalize": _task("task_arithmetic", {"lambda": 0.7, "normalize": False}),
    "ta-three-models-global-weight": _task(
        "task_arithmetic", {"weight": 0.4, "lambda": 0.7}, ({}, {}, {"weight": -0.5}),
        ("ft_a", "ft_b", "ft_c")),
    "ta-weight-gradient": _task("task_arithmetic", {"lambda": 0.7},
                                ({"weight": [0.2, 1.0]}, {"weight": [1.3, 0.4]})),
    "ta-bf16-models": _task("task_arithmetic", {"lambda": 0.7},
                            names=("ft_a_bf16", "ft_b_bf16"), base="base_bf16"),
    "ta-dtype-bf16": _task("task_arithmetic", {"lambda": 0.7}, dtype="bfloat16"),
    "ta-dtype-fp32-on-bf16": _task("task_arithmetic", {"lambda": 0.7},
                                   names=("ft_a_bf16", "ft_b_bf16"), base="base_bf16",
                                   dtype="float32"),
    "ta-out-dtype-bf16": _task("task_arithmetic", {"lambda": 0.7}, dtype="float32",
                               out_dtype="bfloat16"),
    "ta-out-dtype-only": _task("task_arithmetic", {"lambda": 0.7}, out_dtype="bfloat16"),
    "ta-mixed-dtypes": _task("task_arithmetic", {"lambda": 0.7},
                             names=("ft_a_bf16", "ft_b")),
    "ta-base-listed": _base_listed("task_arithmetic", {"lambda": 0.7}),
    # TIES
    "ties-defaults": _task("ties", None),
    **{f"ties-density-{d}": _task("ties", {"density": d}) for d in (0.3, 0.5, 1.0)},
    "ties-normalize-false-lambda": _task("ties", {"density": 0.5, "normalize": False,
                                                  "lambda": 0.7}),
    "ties-normalize-true-lambda": _task("ties", {"density": 0.5, "normalize": True,
                                                 "lambda": 1.3}),
    "ties-per-model-density": _task(
        "ties", {"lambda": 0.9},
        ({"weight": 0.7, "density": 0.3}, {"weight": 1.3, "density": 0.6},
         {"weight": 1.0, "density": 0.5}), ("ft_a", "ft_b", "ft_c")),
    "ties-filter-density": _task("ties", {"density": MLP_DENSITY}),
    "ties-filter-density-per-model": _task(
        "ties", {"density": 0.5},
        ({"weight": 0.7, "density": MLP_DENSITY}, {"weight": 1.3})),
    # a condition list with no catch-all: mergekit falls back to the global value
    "ties-filter-fallthrough": _task(
        "ties", {"density": 0.4},
        ({"weight": 0.7, "density": [{"filter": "mlp", "value": 0.8}]}, {"weight": 1.3})),
    # a condition list with no catch-all at the top level: mergekit falls back to the default
    "ties-filter-global-fallthrough": _task("ties", {"density": [{"filter": "mlp",
                                                                  "value": 0.5}]}),
    "ties-int8-mask-rescale": _task("ties", {"density": 0.3, "int8_mask": True,
                                             "rescale": True}),
    "ties-bf16-models": _task("ties", {"density": 0.3}, names=("ft_a_bf16", "ft_b_bf16"),
                              base="base_bf16"),
    "ties-dtype-bf16": _task("ties", {"density": 0.3}, dtype="bfloat16"),
    "ties-dtype-fp32-on-bf16": _task("ties", {"density": 0.3},
                                     names=("ft_a_bf16", "ft_b_bf16"), base="base_bf16",
                                     dtype="float32"),
    "ties-mixed-dtypes-bf16-base": _task("ties", {"density": 0.5}, base="base_bf16"),
    "ties-base-listed": _base_listed("ties", {"density": 0.5}),
    # DARE, density 1 only (no random drop, so mergekit's global RNG stream is not involved)
    "dare_linear-defaults": _task("dare_linear", None),
    "dare_linear-density-1": _task("dare_linear", {"density": 1.0, "lambda": 0.7}),
    "dare_linear-density-1-normalize": _task("dare_linear", {"density": 1.0,
                                                             "normalize": True}),
    "dare_ties-density-1": _task("dare_ties", {"density": 1.0, "lambda": 0.7}),
    "dare_ties-density-1-normalize": _task("dare_ties", {"density": 1.0, "normalize": True,
                                                         "rescale": False}),
    "dare_ties-density-1-bf16": _task("dare_ties", {"density": 1.0},
                                      names=("ft_a_bf16", "ft_b_bf16"), base="base_bf16"),
}


def _input_names(data: dict[str, Any]) -> list[str]:
    names = [e["model"] for e in data["models"]]
    if data.get("base_model"):
        names.append(data["base_model"])
    return names


@pytest.mark.parametrize("case", list(CASES))
def test_parity(case: str, models: dict[str, str], tmp_path: Path) -> None:
    data = CASES[case](models)
    theirs = load_folder(run_mergekit(data, tmp_path / "mergekit"))
    ours = load_folder(run_alloykit(data, tmp_path / "alloykit", workers=1))
    assert_same_tensors(ours, theirs)
    # Sanity: the merge did something (neither output is just one of the inputs).
    for ref in _input_names(data):
        inp = load_folder(Path(ref))
        assert any(not torch.equal(theirs[k].float(), inp[k].float()) for k in theirs), ref


# ----------------------------------------------------------------------------- DARE, density < 1


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_random_drop_is_deterministic(method: str, models: dict[str, str]) -> None:
    """alloykit's DARE masks come from per-(tensor, model) generators, mergekit's from torch's
    global RNG in execution order: no parity is possible with density < 1. Check instead that a
    seed fixes the result whatever the worker count, and that the seed matters."""
    data = _task(method, {"density": 0.5},
                 ({"weight": 0.7}, {"weight": 1.3, "density": 0.3}))(models)
    kwargs = recipe_from_dict(copy.deepcopy(data)).merge_kwargs()
    for k in ("shard_size", "copy_files_from"):
        kwargs.pop(k)

    def run(seed: int, workers: int) -> dict[str, torch.Tensor]:
        out = alloykit.merge(**{**kwargs, "seed": seed}, workers=workers).state_dict
        assert out is not None
        return out

    first = run(0, 1)
    for other in (run(0, 1), run(0, 2)):
        assert sorted(other) == sorted(first)
        for name in first:
            torch.testing.assert_close(other[name], first[name], rtol=0, atol=0)
    reseeded = run(1, 1)
    assert any(not torch.equal(reseeded[k], first[k]) for k in first)
    # And the drop really happened: density 1 gives another result.
    dense = alloykit.merge(**{**kwargs, "parameters": {"density": 1.0},
                              "model_parameters": [{"weight": 0.7}, {"weight": 1.3}]},
                           workers=1).state_dict
    assert dense is not None
    assert any(not torch.equal(dense[k], first[k]) for k in first)


# ----------------------------------------------------------------------------- unsupported


def test_slices_that_drop_layers_become_a_layer_stack(models: dict[str, str]) -> None:
    # slices: over whole models are a plain merge, over part of them a layer stack
    # (tests/test_mergekit_slices.py compares both with mergekit)
    data = {
        "merge_method": "linear",
        "slices": [{"sources": [
            {"model": models["ft_a"], "layer_range": [0, 1], "parameters": {"weight": 0.5}},
            {"model": models["ft_b"], "layer_range": [0, 1], "parameters": {"weight": 0.5}},
        ]}],
    }
    MergeConfiguration.model_validate(copy.deepcopy(data))  # valid for mergekit
    recipe = recipe_from_dict(data)
    positions = [[[models["ft_a"], 0, 1]], [[models["ft_b"], 0, 1]]]
    assert recipe.layer_stack == {"positions": positions, "base": None}


def test_unsupported_mergekit_method_is_refused(models: dict[str, str]) -> None:
    data = {
        "merge_method": "frankenmerge",  # every method of mergekit 0.1.5 is supported now
        "models": [{"model": models["ft_a"], "parameters": {"weight": 0.5}},
                   {"model": models["ft_b"], "parameters": {"weight": 0.5}}],
    }
    MergeConfiguration.model_validate(copy.deepcopy(data))  # mergekit's config parses it too
    with pytest.raises(RecipeError, match=r"mergekit method 'frankenmerge' is not supported yet.*nuslerp"):
        recipe_from_dict(data)


def test_lora_reference_parses_and_a_missing_adapter_is_named(models: dict[str, str], tmp_path: Path) -> None:
    ref = f"{models['ft_a']}+{tmp_path / 'adapter'}"
    data = {
        "merge_method": "task_arithmetic",
        "base_model": models["base"],
        "models": [{"model": ref, "parameters": {"weight": 1.0}},
                   {"model": models["ft_b"], "parameters": {"weight": 1.0}}],
    }
    config = MergeConfiguration.model_validate(copy.deepcopy(data))
    assert config.models is not None and config.models[0].model.lora is not None
    recipe = recipe_from_dict(data)  # model+lora is read as an adapter on that model (tests/test_lora.py)
    assert recipe.models[0].model == ref
    from alloykit.errors import CheckpointError

    with pytest.raises(CheckpointError, match="is not a local PEFT adapter folder") as info:
        alloykit.merge(**recipe.merge_kwargs())
    assert ref in str(info.value)
