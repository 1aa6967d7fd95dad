"""Parity with mergekit 0.1.5 for breadcrumbs, breadcrumbs_ties, della, della_linear, slerp and
model_stock: the same mergekit YAML, run by mergekit and by alloykit, gives the same tensors bit
for bit (rtol = atol = 0), names and dtypes.

DELLA draws random masks. mergekit takes them from torch's global RNG in its execution order,
alloykit from one generator per (tensor, model), so the masks themselves cannot match. The DELLA
cases therefore replace ``torch.bernoulli`` (for both tools, in this process) by a deterministic
function of the probability tensor it is given: the same probabilities, bit for bit, give the
same mask. Everything but the random numbers is then compared exactly: the ranks and keep
probabilities (any difference in them changes the mask), the mask product, the L1 rescale, the
sign election and the fuse. The test also checks that both tools did call it, once per
(tensor, model).
"""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("mergekit")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from alloykit.errors import ParameterError  # noqa: E402
from tests.test_mergekit_parity import (  # noqa: E402, F401  (fixtures are used by name)
    Recipe,
    _m,
    _offline,
    _task,
    assert_same_tensors,
    load_folder,
    models,
    run_alloykit,
    run_mergekit,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """torch's CPU reductions along a dim (mergekit's MAGPRUNE min/max) cost ~15 ms a call with 2
    OpenMP threads on small CI machines and ~5 µs with one. Both tools run in this process under
    the same setting, so parity is unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- more models


def _derive(src: str, dst: Path, noise: dict[int, float]) -> str:
    """A copy of the model folder ``src`` with θ + Σ_seed rel·rms(θ)·N(0, 1) on every tensor."""
    shutil.copytree(src, dst)
    (weights,) = dst.glob("*.safetensors")
    state = load_file(weights)
    out = {}
    for name, t in state.items():
        x = t.float()
        rms = x.square().mean().sqrt()
        for seed, rel in noise.items():
            g = torch.Generator().manual_seed(seed * 1000 + len(name))
            x = x + torch.randn(t.shape, generator=g) * (rel * rms)
        out[name] = x.to(t.dtype).contiguous()
    save_file(out, str(weights), metadata={"format": "pt"})
    return str(dst)


@pytest.fixture(scope="module")
def zoo(models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:  # noqa: F811
    """The shared fixture's models, plus: ``far_*`` fine-tunes whose angle to the base is large
    enough for SLERP's spherical branch (the 1 % ones all take the lerp fallback), and
    ``cor_*`` fine-tunes sharing a common update (pairwise cos ≈ 0.5, so Model Stock's ratio is
    far from 0)."""
    root = tmp_path_factory.mktemp("zoo")
    paths = dict(models)
    paths["far_a"] = _derive(models["base"], root / "far_a", {11: 0.031})
    paths["far_b"] = _derive(models["base"], root / "far_b", {12: 0.4})
    paths["far_a_bf16"] = _derive(models["base_bf16"], root / "far_a_bf16", {11: 0.031})
    for i, name in enumerate(("cor_a", "cor_b", "cor_c")):
        paths[name] = _derive(models["base"], root / name, {20: 0.02, 21 + i: 0.02})
    return paths


# ----------------------------------------------------------------------------- recipes


def _slerp(other: str, t: Any, base: str = "base", list_base: bool = True, **top: Any) -> Recipe:
    def build(p: dict[str, str]) -> dict[str, Any]:
        listed = [_m(p[base]), _m(p[other])] if list_base else [_m(p[other])]
        return {
            "merge_method": "slerp",
            "base_model": p[base],
            "models": listed,
            "parameters": {"t": t},
            **top,
        }

    return build


def _stock(
    names: tuple[str, ...], params: dict[str, Any] | None = None, base: str = "base", **top: Any
) -> Recipe:
    def build(p: dict[str, str]) -> dict[str, Any]:
        data: dict[str, Any] = {
            "merge_method": "model_stock",
            "base_model": p[base],
            "models": [_m(p[n]) for n in names],
            **top,
        }
        if params is not None:
            data["parameters"] = params
        return data

    return build


THREE = (
    {"weight": 0.7, "density": 0.3, "gamma": 0.05},
    {"weight": 1.3, "density": 0.6},
    {"weight": -0.4, "density": 0.5, "gamma": 0.0},
)
DELLA_THREE = (
    {"weight": 0.7, "density": 0.3, "epsilon": 0.1},
    {"weight": 1.3, "density": 0.6},
    {"weight": 0.9, "density": 0.5, "epsilon": 0.3},
)
SLERP_FILTERS = [
    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
    {"value": 0.5},
]
BF16 = {"names": ("ft_a_bf16", "ft_b_bf16"), "base": "base_bf16"}

CASES: dict[str, Recipe] = {
    # breadcrumbs: defaults (density 1: nothing masked), outliers and small values dropped
    "breadcrumbs-defaults": _task("breadcrumbs", None),
    "breadcrumbs-density-0.5": _task("breadcrumbs", {"density": 0.5}),
    "breadcrumbs-gamma-lambda": _task("breadcrumbs", {"density": 0.3, "gamma": 0.1, "lambda": 0.7}),
    # int(density·N) + int(γ·N) > N: mergekit drops fewer outliers
    "breadcrumbs-crowded": _task("breadcrumbs", {"density": 0.95, "gamma": 0.1}),
    "breadcrumbs-normalize-rescale": _task(
        "breadcrumbs", {"density": 0.6, "normalize": True, "rescale": True}
    ),
    "breadcrumbs-per-model": _task("breadcrumbs", {"lambda": 0.9}, THREE, ("ft_a", "ft_b", "ft_c")),
    "breadcrumbs-filter-gamma": _task(
        "breadcrumbs", {"density": 0.5, "gamma": [{"filter": "mlp", "value": 0.2}, {"value": 0.02}]}
    ),
    "breadcrumbs-bf16-models": _task("breadcrumbs", {"density": 0.4}, **BF16),
    "breadcrumbs-dtype-bf16": _task("breadcrumbs", {"density": 0.4}, dtype="bfloat16"),
    "breadcrumbs_ties-defaults": _task("breadcrumbs_ties", None),
    "breadcrumbs_ties-density-gamma": _task("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05}),
    "breadcrumbs_ties-normalize": _task(
        "breadcrumbs_ties", {"density": 0.4, "normalize": True, "lambda": 1.3}
    ),
    "breadcrumbs_ties-per-model": _task(
        "breadcrumbs_ties", {"normalize": True}, THREE, ("ft_a", "ft_b", "ft_c")
    ),
    "breadcrumbs_ties-bf16-models": _task("breadcrumbs_ties", {"density": 0.4, "rescale": True}, **BF16),
    # della with density 1: no drop, no randomness
    "della-defaults": _task("della", None),
    "della_linear-density-1-normalize": _task("della_linear", {"density": 1.0, "normalize": True}),
    # slerp
    "slerp-lerp-branch": _slerp("ft_a", 0.3),
    "slerp-spherical": _slerp("far_b", 0.3),
    "slerp-near-threshold": _slerp("far_a", 0.6),
    "slerp-base-unlisted": _slerp("far_b", 0.7, list_base=False),
    "slerp-gradient": _slerp("far_b", [0.0, 0.5, 1.0]),
    "slerp-filters": _slerp("far_b", SLERP_FILTERS),
    "slerp-extrapolate": _slerp("far_b", 1.4),
    "slerp-bf16-models": _slerp("far_a_bf16", 0.4, base="base_bf16"),
    "slerp-dtype-bf16": _slerp("far_b", 0.4, dtype="bfloat16"),
    "slerp-mixed-dtypes": _slerp("far_a_bf16", 0.4),
    "slerp-out-dtype": _slerp("far_b", 0.4, dtype="float32", out_dtype="bfloat16"),
    # model stock
    "model_stock-two": _stock(("cor_a", "cor_b")),
    "model_stock-three": _stock(("cor_a", "cor_b", "cor_c")),
    "model_stock-independent": _stock(("ft_a", "ft_b", "ft_c")),
    "model_stock-filter_wise": _stock(("cor_a", "cor_b", "cor_c"), {"filter_wise": True}),
    "model_stock-filter_wise-false": _stock(("cor_a", "cor_b"), {"filter_wise": False}),
    "model_stock-bf16-models": _stock(("ft_a_bf16", "ft_b_bf16"), base="base_bf16"),
    "model_stock-dtype-bf16": _stock(("cor_a", "cor_b", "cor_c"), dtype="bfloat16"),
}

# DELLA with random drops: compared under the deterministic stand-in for torch.bernoulli
DELLA_CASES: dict[str, Recipe] = {
    "della-density-0.5": _task("della", {"density": 0.5}),
    "della-epsilon-lambda": _task("della", {"density": 0.4, "epsilon": 0.3, "lambda": 0.7}),
    "della-no-rescale-no-normalize": _task("della", {"density": 0.5, "rescale": False, "normalize": False}),
    "della-per-model": _task("della", {"lambda": 1.1}, DELLA_THREE, ("ft_a", "ft_b", "ft_c")),
    "della-bf16-models": _task("della", {"density": 0.5}, **BF16),
    "della-dtype-fp16": _task("della", {"density": 0.5}, dtype="float16"),
    "della_linear-density-0.5": _task("della_linear", {"density": 0.5}),
    "della_linear-normalize-lambda": _task(
        "della_linear", {"density": 0.3, "epsilon": 0.2, "normalize": True, "lambda": 0.8}
    ),
    "della_linear-dtype-bf16": _task("della_linear", {"density": 0.6}, dtype="bfloat16"),
}


def _input_names(data: dict[str, Any]) -> list[str]:
    return [e["model"] for e in data["models"]] + [data["base_model"]]


def _run_both(data: dict[str, Any], tmp_path: Path) -> tuple[dict, dict]:
    theirs = load_folder(run_mergekit(data, tmp_path / "mergekit"))
    ours = load_folder(run_alloykit(data, tmp_path / "alloykit", workers=1))
    return ours, theirs


def _merged_something(data: dict[str, Any], theirs: dict[str, torch.Tensor]) -> None:
    for ref in _input_names(data):
        inp = load_folder(Path(ref))
        assert any(not torch.equal(theirs[k].float(), inp[k].float()) for k in theirs), ref


@pytest.mark.parametrize("case", list(CASES))
def test_parity(case: str, zoo: dict[str, str], tmp_path: Path) -> None:
    data = CASES[case](zoo)
    ours, theirs = _run_both(data, tmp_path)
    assert_same_tensors(ours, theirs)
    _merged_something(data, theirs)


def test_slerp_cases_take_both_branches(zoo: dict[str, str]) -> None:
    """The slerp cases above are only meaningful if some tensors take the spherical branch and
    some the lerp fallback: check the cosines of the inputs directly."""
    base = load_folder(Path(zoo["base"]))
    branches = {}
    for other in ("ft_a", "far_a", "far_b"):
        x = load_folder(Path(zoo[other]))
        cos = [
            float(torch.nn.functional.cosine_similarity(base[k].reshape(1, -1), x[k].reshape(1, -1)))
            for k in base
        ]
        branches[other] = {abs(c) > 0.9995 for c in cos}
    assert branches["ft_a"] == {True}
    assert branches["far_b"] == {False}
    assert branches["far_a"] == {True, False}


# ----------------------------------------------------------------------------- DELLA


class _FixedBernoulli:
    """Stands in for ``torch.bernoulli``: keeps entry i iff u_i < p_i, with u uniform numbers
    seeded by a hash of the probability tensor's bytes (so equal probabilities ⇒ equal masks, and
    different tensors get different masks). Counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, probs: torch.Tensor, *args: Any, generator: Any = None, **kwargs: Any) -> torch.Tensor:
        assert not args and not kwargs, "unexpected torch.bernoulli arguments"
        self.calls += 1
        p = probs.detach().float().contiguous()
        assert bool(((p > 0) & (p < 1)).all()), "keep probabilities outside (0, 1)"
        digest = hashlib.sha256(p.numpy().tobytes() + repr(tuple(p.shape)).encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return (torch.rand(p.shape, generator=g) < p).to(probs.dtype)


@pytest.mark.parametrize("case", list(DELLA_CASES))
def test_della_parity_with_shared_masks(
    case: str, zoo: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = DELLA_CASES[case](zoo)
    fake = _FixedBernoulli()
    monkeypatch.setattr(torch, "bernoulli", fake)
    theirs = load_folder(run_mergekit(data, tmp_path / "mergekit"))
    mergekit_calls, fake.calls = fake.calls, 0
    ours = load_folder(run_alloykit(data, tmp_path / "alloykit", workers=1))
    monkeypatch.undo()
    n_models = len(data["models"])
    # every floating tensor of every model is dropped once, by both tools
    assert mergekit_calls == fake.calls == len(theirs) * n_models
    assert_same_tensors(ours, theirs)
    _merged_something(data, theirs)


def test_della_window_error_in_both(zoo: dict[str, str], tmp_path: Path) -> None:
    """density ± ε outside (0, 1): mergekit raises ValueError while merging; alloykit refuses
    the recipe before reading any tensor, naming the parameters and the allowed range."""
    data = _task("della", {"density": 0.9, "epsilon": 0.15})(zoo)
    with pytest.raises(ValueError, match="(?i)epsilon"):
        run_mergekit(data, tmp_path / "mergekit")
    with pytest.raises(ParameterError, match=r"density 0\.9 ± epsilon 0\.15") as info:
        run_alloykit(copy.deepcopy(data), tmp_path / "alloykit", workers=1)
    assert "< 1" in str(info.value)
    assert not (tmp_path / "alloykit").exists()


def test_della_random_drop_is_seeded(zoo: dict[str, str]) -> None:
    """Without the stand-in, alloykit's DELLA masks come from per-(tensor, model) generators: the
    same seed gives the same bytes on 1 and 2 workers; another seed gives other masks."""
    import alloykit
    from alloykit.recipe import recipe_from_dict

    data = _task("della", {"density": 0.5})(zoo)
    kwargs = recipe_from_dict(copy.deepcopy(data)).merge_kwargs()
    for k in ("shard_size", "copy_files_from"):
        kwargs.pop(k)

    def run(seed: int, workers: int) -> dict[str, torch.Tensor]:
        out = alloykit.merge(**{**kwargs, "seed": seed}, workers=workers).state_dict
        assert out is not None
        return out

    first = run(0, 1)
    again = run(0, 2)
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)
    other = run(1, 1)
    assert any(not torch.equal(other[k], first[k]) for k in first)
