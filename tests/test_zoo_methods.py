"""Consensus (TALL masks), PCB-Merging and MagMax against the reference code's equations, written
here on whole flattened vectors, and their properties."""

from __future__ import annotations

import pytest
import torch

from alloykit import merge, merge_state_dicts
from alloykit.errors import ParameterError
from alloykit.methods import _radix, get_method
from tests.conftest import make_base, make_finetunes
from tests.test_methods import assert_sd_close, flat, unflat


def assert_sd_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k].float() - b[k].float()).abs().max()}"


def task_vectors(base, fts):
    b = flat(base)
    return b, torch.stack([flat(f) - b for f in fts])


# ----------------------------------------------------------------------------- consensus


def _ties_flat(tvs: torch.Tensor, density: float, aggregate: str) -> torch.Tensor:
    """``ties_merging`` of the TALL-mask code on (T, d) task vectors."""
    d = tvs.shape[1]
    kth = tvs.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    trimmed = tvs * (tvs.abs() >= kth)
    sign = trimmed.sum(0).sign()
    sign[sign == 0] = sign.sum().sign()
    selected = trimmed * torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    if aggregate == "sum":
        return selected.sum(0)
    return selected.sum(0) / (selected != 0).sum(0).float().clamp(min=1)


def _consensus_reference(base, fts, lambdas, k, alpha, combine="ta", density=0.2, aggregate="sum"):
    """Consensus merging as ``nik-dim/tall_masks`` computes it on the flattened model."""
    ptm, tvs = task_vectors(base, fts)
    flat_ft = ptm + tvs
    merged = tvs.sum(0) if combine == "ta" else _ties_flat(tvs, density, aggregate)
    multi = ptm + merged
    masks = torch.stack(
        [(ptm - flat_ft[t]).abs() > (multi - flat_ft[t]).abs() * lam for t, lam in enumerate(lambdas)]
    )
    consensus = masks.float().sum(0) >= k
    return unflat(ptm + alpha * (merged * consensus), base), consensus


@pytest.mark.parametrize("combine", ["ta", "ties"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_consensus_matches_the_reference_code_on_the_whole_model(combine, k):
    base = make_base()
    fts = make_finetunes(base, n=3)
    lambdas = [0.2, 0.4, 0.6]
    out = merge_state_dicts(
        fts,
        base,
        "consensus",
        parameters={"k": k, "lambda": 0.7, "combine": combine},
        model_parameters=[{"tall_mask_lambda": x} for x in lambdas],
    )
    expected, mask = _consensus_reference(base, fts, lambdas, k, 0.7, combine)
    assert mask.any() and (k == 1 or not mask.all())  # the masks really select something
    assert_sd_equal(out, expected)


def test_consensus_masks_by_hand():
    # τ_MTL = [2, 3, 0]. λ = 0.5: m_1 = [1 > .5, 0 > 1.5, 2 > 1] = [T, F, T];
    # m_2 = [1 > .5, 3 > 0, 2 > 1] = [T, T, T]; m_3 = [0 > 1, 0 > 1.5, 0 > 0] = [F, F, F].
    # Votes [2, 1, 2] ≥ 2 keep entries 0 and 2: [2, 0, 0] (entry 2 cancels).
    base = {"w": torch.zeros(3)}
    fts = [{"w": torch.tensor(v)} for v in ([1.0, 0.0, 2.0], [1.0, 3.0, -2.0], [0.0, 0.0, 0.0])]
    out = merge_state_dicts(fts, base, "consensus", parameters={"tall_mask_lambda": 0.5})
    assert out["w"].tolist() == [2.0, 0.0, 0.0]
    out = merge_state_dicts(fts, base, "consensus", parameters={"tall_mask_lambda": 0.5, "k": 1})
    assert out["w"].tolist() == [2.0, 3.0, 0.0]
    # λ = 2: m_1 = [1 > 2, 0 > 6, 2 > 4], m_2 = [1 > 2, 3 > 0, 2 > 4], m_3 all false: only entry 1.
    out = merge_state_dicts(fts, base, "consensus", parameters={"tall_mask_lambda": 2.0, "k": 1})
    assert out["w"].tolist() == [0.0, 3.0, 0.0]


def test_consensus_inclusive_comparison_keeps_ties():
    # |τ_1| = 1 = 1 · |τ_MTL − τ_1|: kept only by ">=".
    base = {"w": torch.zeros(1)}
    fts = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}]
    kw = {"tall_mask_lambda": 1.0, "k": 1}
    assert merge_state_dicts(fts, base, "consensus", parameters=kw)["w"].item() == 0.0
    kw["compare"] = "inclusive"
    assert merge_state_dicts(fts, base, "consensus", parameters=kw)["w"].item() == 2.0


@pytest.mark.parametrize("params", [{"k": 0}, {"k": 1, "tall_mask_lambda": 0.0}])
def test_consensus_without_pruning_is_task_arithmetic(params):
    base = make_base()
    fts = make_finetunes(base)
    out = merge_state_dicts(fts, base, "consensus", parameters={**params, "lambda": 0.4})
    ta = merge_state_dicts(fts, base, "task_arithmetic", parameters={"lambda": 0.4})
    assert_sd_equal(out, ta)


def test_consensus_ties_without_pruning_is_ties_with_a_disjoint_sum():
    base = make_base()
    fts = make_finetunes(base)
    out = merge_state_dicts(fts, base, "consensus", parameters={"k": 0, "combine": "ties", "lambda": 0.6})
    ties = merge_state_dicts(fts, base, "ties", parameters={"aggregate": "sum", "lambda": 0.6})
    assert_sd_equal(out, ties)


def test_consensus_ties_zero_elected_sign_takes_the_model_majority():
    # Entry 0 cancels exactly; the majority of elected signs is negative, so -1 is kept there.
    base = {"w": torch.zeros(5)}
    fts = [
        {"w": torch.tensor([1.0, -2.0, -2.0, -2.0, -2.0])},
        {"w": torch.tensor([-1.0, -2.0, -2.0, -2.0, -2.0])},
    ]
    params = {"combine": "ties", "density": 1.0, "k": 1, "tall_mask_lambda": 0.0}
    out = merge_state_dicts(fts, base, "consensus", parameters=params)
    assert out["w"].tolist() == [-1.0, -4.0, -4.0, -4.0, -4.0]


def test_consensus_ties_with_mean_matches_reference():
    base = make_base()
    fts = make_finetunes(base)
    params = {"combine": "ties", "aggregate": "mean", "density": 0.5, "tall_mask_lambda": 0.3}
    out = merge_state_dicts(fts, base, "consensus", parameters=params)
    expected, _ = _consensus_reference(base, fts, [0.3] * 3, 2, 1.0, "ties", 0.5, "mean")
    assert_sd_equal(out, expected)


def test_consensus_identical_models_with_lambda_one_over_t_return_that_model():
    # m_t = |τ| > λ(T − 1)|τ| holds for every changed entry when λ(T − 1) < 1.
    base = make_base()
    ft = make_finetunes(base, n=1)[0]
    out = merge_state_dicts([ft, ft, ft], base, "consensus", parameters={"lambda": 1 / 3})
    assert_sd_close(out, ft, rtol=0, atol=1e-6)


def test_consensus_single_model_keeps_nothing_with_k_two_and_everything_with_k_one():
    base = make_base()
    ft = make_finetunes(base, n=1)[0]
    assert_sd_equal(merge_state_dicts([ft], base, "consensus"), base)
    assert_sd_equal(merge_state_dicts([ft], base, "consensus", parameters={"k": 1, "lambda": 1.0}), ft)


# ----------------------------------------------------------------------------- PCB


@pytest.mark.parametrize("index", [0, 1, 17, 500, 998, 999])
def test_radix_order_statistics_of_pieces_equal_sorting_the_concatenation(index):
    g = torch.Generator().manual_seed(index)
    v = (torch.randn(1000, generator=g) * 3).round() / 4  # many exact ties, both signs
    v[::7] = -0.0
    v[::13] = 0.0
    pieces = torch.split(v, [100, 37, 1, 500, 362])
    bucket, rank = _radix.locate(sum(_radix.high_histogram(p) for p in pieces), index + 1)
    found = _radix.value_of(bucket, sum(_radix.low_histogram(p, bucket) for p in pieces), rank)
    assert found == float(torch.sort(v).values[index])


def _pcb_reference(base, fts, density, lam, clip, weights=None):
    """``PCB_merge`` of ``duguodong7/pcb-merging`` on the flattened model."""
    ptm, tvs = task_vectors(base, fts)
    n, d = tvs.shape

    def clamp(x, min_ratio, max_ratio):
        s = torch.sort(x, dim=1).values
        return torch.clamp(
            x, s[:, int(d * min_ratio)].unsqueeze(1), s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
        )

    def normalize(x):
        lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        return (x - lo) / (hi - lo)

    clamped_abs = clamp(tvs.abs(), clip, clip)
    clipped = torch.sign(tvs) * clamped_abs
    score = torch.exp(n * normalize(clamped_abs) ** 2) * torch.tanh(tvs * tvs.sum(0))
    scale = normalize(clamp(score, 1 - density, 0))
    if weights is not None:
        clipped = clipped * torch.tensor(weights).unsqueeze(1)
    merged = (clipped * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)
    return unflat(ptm + lam * merged, base), scale


@pytest.mark.parametrize("density,clip", [(0.05, 1e-4), (0.1, 0.01), (0.3, 0.05), (1.0, 0.0)])
def test_pcb_matches_the_reference_code_on_the_whole_model(density, clip):
    base = make_base()
    fts = make_finetunes(base, n=3)
    out = merge_state_dicts(fts, base, "pcb", parameters={"density": density, "clip": clip, "lambda": 1.3})
    expected, scale = _pcb_reference(base, fts, density, 1.3, clip)
    assert abs((scale > 0).float().mean().item() - density) < 0.02
    assert_sd_equal(out, expected)


def test_pcb_default_parameters_and_per_task_lambdas_match_reference():
    base = make_base()
    fts = make_finetunes(base, n=3)
    weights = [0.8, 1.3, 1.1]
    out = merge_state_dicts(
        fts, base, "pcb", parameters={"lambda": 1.0}, model_parameters=[{"weight": w} for w in weights]
    )
    assert_sd_equal(out, _pcb_reference(base, fts, 0.05, 1.0, 1e-4, weights)[0])
    out = merge_state_dicts(fts, base, "pcb")  # defaults: density 0.05, λ = 1.2, clip 1e-4
    assert_sd_equal(out, _pcb_reference(base, fts, 0.05, 1.2, 1e-4)[0])


def test_pcb_tensor_scope_applies_the_reference_to_each_tensor():
    base = make_base()
    fts = make_finetunes(base, n=2)
    out = merge_state_dicts(fts, base, "pcb", parameters={"scope": "tensor", "density": 0.4, "clip": 0.05})
    for name in base:
        one = {name: base[name]}
        expected, _ = _pcb_reference(one, [{name: f[name]} for f in fts], 0.4, 1.2, 0.05)
        torch.testing.assert_close(out[name], expected[name], rtol=0, atol=0)


def test_pcb_zero_and_partly_zero_task_vectors_give_no_nan():
    base = make_base()
    assert_sd_equal(merge_state_dicts([base, base], base, "pcb"), base)
    assert_sd_equal(merge_state_dicts([base, base], base, "pcb", parameters={"scope": "tensor"}), base)
    # One fine-tune changes only the head: every other tensor stays at the base, no NaN anywhere.
    ft = dict(base)
    ft["head.weight"] = base["head.weight"] + 0.1
    out = merge_state_dicts([ft, base], base, "pcb", parameters={"density": 0.5, "scope": "tensor"})
    assert all(torch.isfinite(v).all() for v in out.values())
    assert torch.equal(out["embed.weight"], base["embed.weight"])


def test_pcb_density_zero_keeps_nothing():
    base = make_base()
    fts = make_finetunes(base)
    assert_sd_equal(merge_state_dicts(fts, base, "pcb", parameters={"density": 0.0}), base)


def test_pcb_identical_models_add_the_clipped_task_vector_where_kept():
    # All tasks score alike, so the weighted mean of identical clipped vectors is that vector.
    base = make_base()
    ft = make_finetunes(base, n=1)[0]
    out = merge_state_dicts([ft, ft], base, "pcb", parameters={"density": 0.5, "clip": 0.0, "lambda": 1.0})
    kept = [k for k in base if not torch.equal(out[k], base[k])]
    assert kept
    ptm, tv = task_vectors(base, [ft])
    got = flat(out) - ptm
    changed = got != 0
    torch.testing.assert_close(got[changed], tv[0][changed], rtol=0, atol=1e-6)
    assert abs(changed.float().mean().item() - 0.5) < 0.02


def test_pcb_single_model_matches_reference():
    base = make_base()
    ft = make_finetunes(base, n=1)
    out = merge_state_dicts(ft, base, "pcb", parameters={"density": 0.3})
    assert_sd_equal(out, _pcb_reference(base, ft, 0.3, 1.2, 1e-4)[0])


# ----------------------------------------------------------------------------- MagMax


def _magmax_reference(base, fts, lam):
    """Per entry the task value of largest |τ|; ties go to the last model (``>=`` in the fold)."""
    ptm, tvs = task_vectors(base, fts)
    mags = tvs.abs()
    last = (mags.shape[0] - 1) - (mags.flip(0) == mags.max(0).values).int().argmax(0)
    return unflat(ptm + lam * tvs.gather(0, last.unsqueeze(0))[0], base)


def test_magmax_matches_the_reference_rule():
    base = make_base()
    fts = make_finetunes(base, n=4)
    out = merge_state_dicts(fts, base, "magmax", parameters={"lambda": 0.8})
    assert_sd_equal(out, _magmax_reference(base, fts, 0.8))


def test_magmax_by_hand_later_model_wins_ties():
    base = {"w": torch.zeros(3)}
    fts = [{"w": torch.tensor(v)} for v in ([1.0, -2.0, 0.0], [-1.0, 2.0, 0.5], [0.5, -2.0, -0.5])]
    assert merge_state_dicts(fts, base, "magmax", parameters={"lambda": 1.0})["w"].tolist() == [
        -1.0,
        -2.0,
        -0.5,
    ]
    assert merge_state_dicts(fts, base, "magmax")["w"].tolist() == [-0.5, -1.0, -0.25]  # λ = 0.5


def test_magmax_one_model_is_task_arithmetic():
    base = make_base()
    ft = make_finetunes(base, n=1)
    out = merge_state_dicts(ft, base, "magmax", parameters={"lambda": 0.3})
    assert_sd_equal(out, merge_state_dicts(ft, base, "task_arithmetic", parameters={"lambda": 0.3}))


def test_magmax_identical_models_return_that_model():
    base = make_base()
    ft = make_finetunes(base, n=1)[0]
    out = merge_state_dicts([ft, ft, ft], base, "magmax", parameters={"lambda": 1.0})
    assert_sd_close(out, ft, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- all three


CASES = [
    ("consensus", {}),
    ("consensus", {"combine": "ties", "k": 1}),
    ("pcb", {"density": 0.2}),
    ("pcb", {"scope": "tensor"}),
    ("magmax", {}),
]


@pytest.mark.parametrize("method,params", CASES)
def test_zero_task_vectors_give_the_base_back(method, params):
    base = make_base()
    assert_sd_equal(merge_state_dicts([base, base, base], base, method, parameters=params), base)


@pytest.mark.parametrize("method,params", CASES)
def test_merging_folders_in_slices_gives_the_in_memory_tensors(toy, method, params):
    expected = merge_state_dicts(toy["fts"], toy["base"], method, parameters=params)
    for chunk in (1 << 20, 7):
        result = merge(toy["paths"], toy["base_path"], method=method, parameters=params, chunk_elements=chunk)
        assert_sd_equal(result.state_dict, expected)
    result = merge(
        toy["paths"], toy["base_path"], method=method, parameters=params, workers=2, chunk_elements=7
    )
    assert_sd_equal(result.state_dict, expected)


def test_whole_model_statistics_take_their_passes(toy):
    def passes(method, params):
        return merge(toy["paths"], toy["base_path"], method=method, parameters=params).report.reduction_passes

    assert passes("pcb", {}) == 4
    assert passes("pcb", {"scope": "tensor"}) == 0
    assert passes("consensus", {}) == 0
    assert passes("consensus", {"combine": "ties"}) == 3
    assert passes("magmax", {}) == 0


def test_elementwise_declarations():
    assert get_method("magmax").is_elementwise({})
    assert get_method("consensus").is_elementwise({"combine": "ties"})
    assert get_method("pcb").is_elementwise({"scope": "model"})
    assert not get_method("pcb").is_elementwise({"scope": "tensor"})


@pytest.mark.parametrize("method,params", CASES)
def test_bf16_inputs(method, params):
    base = make_base(dtype=torch.bfloat16)
    fts = make_finetunes(base)
    out = merge_state_dicts(fts, base, method, parameters=params)
    expected = merge_state_dicts(
        [{k: v.float() for k, v in f.items()} for f in fts],
        {k: v.float() for k, v in base.items()},
        method,
        parameters=params,
    )
    for k in base:
        assert out[k].dtype == torch.bfloat16
        assert torch.equal(out[k], expected[k].to(torch.bfloat16))


@pytest.mark.parametrize(
    "method,params,match",
    [
        ("consensus", {"k": -1}, r"consensus: parameter 'k' = -1 is not allowed; expected a int >= 0"),
        ("consensus", {"k": 1.5}, r"'k' = 1.5 is not allowed; expected a int"),
        (
            "consensus",
            {"combine": "dare"},
            r"'combine' = 'dare' is not allowed; expected one of 'ta', 'ties'",
        ),
        (
            "consensus",
            {"tall_mask_lambda": -0.1},
            r"'tall_mask_lambda' = -0.1 is not allowed; expected a float >= 0",
        ),
        (
            "pcb",
            {"clip": 0.5},
            r"pcb: parameter 'clip' = 0.5 is not allowed; expected a float >= 0.0 and < 0.5",
        ),
        ("pcb", {"density": -0.1}, r"'density' = -0.1 is not allowed; expected a float >= 0.0 and <= 1.0"),
        ("pcb", {"scope": "layer"}, r"'scope' = 'layer' is not allowed; expected one of 'model', 'tensor'"),
        ("magmax", {"weight": 1.0}, r"magmax: unknown parameter 'weight'; known: lambda"),
    ],
)
def test_bad_parameters_are_named(method, params, match):
    base = make_base()
    with pytest.raises(ParameterError, match=match):
        merge_state_dicts(make_finetunes(base), base, method, parameters=params)
