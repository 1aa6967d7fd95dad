"""Each method against numbers computed independently in the test, and its properties."""

from __future__ import annotations

import pytest
import torch

from alloykit import merge_state_dicts
from alloykit.errors import ParameterError
from alloykit.methods import get_method
from alloykit.methods.primitives import ModelTopK
from tests.conftest import make_base, make_finetunes


def flat(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([sd[k].float().reshape(-1) for k in sorted(sd)])


def unflat(v: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, pos = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = v[pos : pos + n].reshape(like[k].shape)
        pos += n
    return out


def assert_sd_close(a, b, **kw):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), **kw, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------- linear


def test_linear_weighted_average_by_hand():
    a = {"w": torch.tensor([1.0, 2.0, -4.0])}
    b = {"w": torch.tensor([3.0, 0.0, 4.0])}
    out = merge_state_dicts([a, b], None, "linear", model_parameters=[{"weight": 1}, {"weight": 3}])
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 0.5, 2.0]))
    out = merge_state_dicts(
        [a, b],
        None,
        "linear",
        parameters={"normalize": False},
        model_parameters=[{"weight": 1}, {"weight": 3}],
    )
    torch.testing.assert_close(out["w"], torch.tensor([10.0, 2.0, 8.0]))


def test_linear_with_one_weight_one_returns_that_model():
    base = make_base()
    fts = make_finetunes(base)
    out = merge_state_dicts(
        fts, None, "linear", model_parameters=[{"weight": 0.0}, {"weight": 1.0}, {"weight": 0.0}]
    )
    assert_sd_close(out, fts[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "method,params",
    [
        ("linear", {}),
        ("task_arithmetic", {"normalize": True}),
        ("ties", {"density": 1.0}),
        ("ties", {"density": 0.3}),  # identical task vectors: trimmed δ is re-added at the top-k entries
        ("dare", {"density": 1.0, "aggregate": "weighted_mean"}),
        ("magnitude_prune", {"density": 1.0, "normalize": True}),
    ],
)
def test_merging_identical_models_returns_that_model(method, params):
    base = make_base()
    ft = make_finetunes(base, n=1)[0]
    copies = [{k: v.clone() for k, v in ft.items()} for _ in range(3)]  # the same object twice is refused
    out = merge_state_dicts(copies, None if method == "linear" else base, method, parameters=params)
    if params.get("density", 1.0) < 1:
        # TIES keeps the top 30 % of the (shared) task vector; the rest stays at the base.
        mask = {k: v for k, v in unflat(_paper_topk_mask(flat(ft) - flat(base), 0.3), ft).items()}
        expected = {k: torch.where(mask[k], ft[k], base[k]) for k in ft}
        assert_sd_close(out, expected, rtol=0, atol=1e-6)
    else:
        assert_sd_close(out, ft, rtol=0, atol=1e-6)


def test_linear_rejects_weights_summing_to_zero():
    a = {"w": torch.ones(2)}
    with pytest.raises(ParameterError, match="sum to 0"):
        merge_state_dicts([a, a], None, "linear", model_parameters=[{"weight": 1.0}, {"weight": -1.0}])


# ----------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_formula():
    base = make_base()
    fts = make_finetunes(base)
    w, lam = [0.5, 1.0, 2.0], 0.3
    out = merge_state_dicts(
        fts, base, "task_arithmetic", parameters={"lambda": lam}, model_parameters=[{"weight": x} for x in w]
    )
    for k in base:
        expected = base[k] + lam * sum(wi * (f[k] - base[k]) for wi, f in zip(w, fts, strict=True))
        torch.testing.assert_close(out[k], expected, rtol=1e-6, atol=1e-6)


def test_zero_task_vectors_give_the_base_back_for_every_method():
    base = make_base()
    for method in ("task_arithmetic", "ties", "dare", "magnitude_prune"):
        for preset in get_method(method).presets:
            out = merge_state_dicts([base, base], base, method, preset=preset)
            assert_sd_close(out, base, rtol=0, atol=0)


# ----------------------------------------------------------------------------- TIES


def _paper_topk_mask(v: torch.Tensor, density: float) -> torch.Tensor:
    """The TIES reference code's trim on one flattened task vector."""
    k = v.numel() - int(v.numel() * density)
    return v.abs() >= v.abs().kthvalue(k).values


def _ties_reference(base, fts, density, lam):
    """TIES as the authors' code computes it, on whole flattened task vectors."""
    b = flat(base)
    tvs = torch.stack([flat(f) - b for f in fts])
    trimmed = torch.stack([t * _paper_topk_mask(t, density) for t in tvs])
    sign = trimmed.sum(0).sign()
    sign[sign == 0] = sign.sum().sign()
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    merged = sel.sum(0) / (sel != 0).sum(0).float().clamp(min=1)
    return unflat(b + lam * merged, base)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.55])
def test_ties_paper_preset_matches_reference_code_on_the_whole_model(density):
    base = make_base()
    fts = make_finetunes(base, n=3)
    out = merge_state_dicts(fts, base, "ties", parameters={"density": density, "lambda": 0.8})
    assert_sd_close(out, _ties_reference(base, fts, density, 0.8), rtol=1e-6, atol=1e-6)


def test_ties_whole_model_trim_differs_from_per_tensor_trim():
    base = make_base()
    fts = make_finetunes(base, n=2)
    # Make one tensor's updates much larger: the whole-model trim keeps mostly that tensor.
    for f in fts:
        f["head.weight"] = base["head.weight"] + 10 * (f["head.weight"] - base["head.weight"])
    # 5 % of the 186 entries = 9, fewer than the head's 18: all of them come from the head.
    whole = merge_state_dicts(fts, base, "ties", parameters={"density": 0.05})
    per = merge_state_dicts(fts, base, "ties", parameters={"density": 0.05, "topk": "tensor"})
    assert torch.equal(whole["layers.0.attn.weight"], base["layers.0.attn.weight"])
    assert not torch.equal(per["layers.0.attn.weight"], base["layers.0.attn.weight"])


def test_ties_density_one_no_conflicts_is_the_mean_of_task_vectors():
    base = make_base()
    g = torch.Generator().manual_seed(3)
    direction = {k: torch.randn(v.shape, generator=g).sign() for k, v in base.items()}
    fts = [
        {k: base[k] + 0.1 * direction[k] * torch.rand(v.shape, generator=g) for k, v in base.items()}
        for _ in range(3)
    ]
    out = merge_state_dicts(fts, base, "ties", parameters={"density": 1.0})
    for k in base:
        torch.testing.assert_close(out[k], base[k] + sum(f[k] - base[k] for f in fts) / 3)


def test_ties_density_one_with_sum_equals_task_arithmetic():
    base = make_base()
    g = torch.Generator().manual_seed(4)
    direction = {k: torch.randn(v.shape, generator=g).sign() for k, v in base.items()}
    fts = [
        {k: base[k] + 0.1 * direction[k] * torch.rand(v.shape, generator=g) for k, v in base.items()}
        for _ in range(2)
    ]
    ties = merge_state_dicts(
        fts, base, "ties", preset="mergekit", parameters={"density": 1.0, "aggregate": "sum", "lambda": 0.4}
    )
    ta = merge_state_dicts(fts, base, "task_arithmetic", parameters={"lambda": 0.4})
    assert_sd_close(ties, ta, rtol=0, atol=1e-6)


def test_ties_mergekit_preset_by_independent_formula():
    base = make_base()
    fts = make_finetunes(base, n=3)
    w, dens, lam = [0.7, 1.3, 1.0], [0.3, 0.5, 0.4], 0.9
    out = merge_state_dicts(
        fts,
        base,
        "ties",
        preset="mergekit",
        parameters={"lambda": lam},
        model_parameters=[{"weight": a, "density": d} for a, d in zip(w, dens, strict=True)],
    )
    for k in base:
        deltas = []
        for f, d in zip(fts, dens, strict=True):
            tv = (f[k] - base[k]).reshape(-1)
            keep = torch.zeros_like(tv, dtype=torch.bool)
            keep[tv.abs().topk(max(1, int(d * tv.numel()))).indices] = True
            deltas.append(tv * keep)
        weighted = [wi * dv for wi, dv in zip(w, deltas, strict=True)]
        gamma = torch.where(sum(weighted) >= 0, 1.0, -1.0)
        num = sum(torch.where(x.sign() == gamma, x, 0.0) for x in weighted)
        den = sum(torch.where(x.sign() == gamma, wi, 0.0) for wi, x in zip(w, weighted, strict=True))
        den = torch.where(den == 0, 1.0, den)
        expected = base[k].reshape(-1) + lam * num / den
        torch.testing.assert_close(out[k].reshape(-1), expected, rtol=1e-6, atol=1e-6)


def test_ties_zero_elected_sign_uses_model_majority():
    # One entry where the two trimmed task vectors cancel exactly; elsewhere both are negative.
    base = {"w": torch.zeros(5)}
    a = {"w": torch.tensor([1.0, -2.0, -2.0, -2.0, -2.0])}
    b = {"w": torch.tensor([-1.0, -2.0, -2.0, -2.0, -2.0])}
    out = merge_state_dicts([a, b], base, "ties", parameters={"density": 1.0})
    # Majority of the elected signs is negative, so the -1 entry is kept at position 0.
    torch.testing.assert_close(out["w"], torch.tensor([-1.0, -2.0, -2.0, -2.0, -2.0]))
    out = merge_state_dicts([a, b], base, "ties", parameters={"density": 1.0, "zero_sign": "positive"})
    assert float(out["w"][0]) == 1.0


# ----------------------------------------------------------------------------- the reduction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.5, 0.999])
def test_model_topk_threshold_equals_kthvalue_of_the_concatenation(dtype, density):
    g = torch.Generator().manual_seed(5)
    shapes = [(37, 11), (5,), (64, 3), (1,)]
    base = [torch.zeros(s, dtype=dtype) for s in shapes]
    # Rounded values: many exact ties, like bf16 fine-tunes have.
    fts = [[(torch.randn(s, generator=g) * 4).round().div(4).to(dtype) for s in shapes] for _ in range(2)]
    red = ModelTopK()
    params = {"topk": "model", "density": [density, density]}
    state = None
    for p in range(red.passes(params)):
        acc = None
        for i in range(len(shapes)):
            acc = red.fold(p, acc, red.map(p, state, [f[i] for f in fts], base[i], None, params))
        state = red.finish(p, state, acc, params)
    for t in range(2):
        v = torch.cat([x.float().reshape(-1) for x in fts[t]]).abs()
        expected = v.kthvalue(v.numel() - int(v.numel() * density)).values
        assert state["threshold"][t] == float(expected)


# ----------------------------------------------------------------------------- DARE


def test_dare_density_one_is_task_arithmetic():
    base = make_base()
    fts = make_finetunes(base)
    dare = merge_state_dicts(fts, base, "dare", parameters={"density": 1.0, "lambda": 0.5})
    ta = merge_state_dicts(fts, base, "task_arithmetic", parameters={"lambda": 0.5})
    assert_sd_close(dare, ta, rtol=0, atol=1e-6)


def test_dare_keeps_survivors_scaled_by_inverse_density():
    base = {"w": torch.zeros(20000)}
    ft = {"w": torch.randn(20000, generator=torch.Generator().manual_seed(0))}
    out = merge_state_dicts([ft], base, "dare", parameters={"density": 0.3}, seed=7)["w"]
    kept = out != 0
    torch.testing.assert_close(out[kept], ft["w"][kept] / 0.3)
    assert abs(kept.float().mean().item() - 0.3) < 0.02  # Bernoulli(0.3), 20k draws


def test_dare_l1_rescale_preserves_the_l1_norm():
    base = {"w": torch.zeros(1000)}
    ft = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(1))}
    out = merge_state_dicts([ft], base, "dare", preset="mergekit", parameters={"density": 0.5})["w"]
    torch.testing.assert_close(out.abs().sum(), ft["w"].abs().sum())
    assert (out == 0).float().mean() > 0.3


def test_dare_is_seeded_and_independent_of_workers(toy):
    from alloykit import merge

    kw = dict(method="dare", parameters={"density": 0.5})
    a = merge(toy["paths"], toy["base_path"], seed=3, workers=1, **kw).state_dict
    b = merge(toy["paths"], toy["base_path"], seed=3, workers=3, **kw).state_dict
    c = merge(toy["paths"], toy["base_path"], seed=4, workers=1, **kw).state_dict
    assert_sd_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])


def test_dare_ties_combination_elects_signs():
    base = {"w": torch.zeros(3)}
    a = {"w": torch.tensor([1.0, 2.0, -1.0])}
    b = {"w": torch.tensor([-3.0, 2.0, -1.0])}
    out = merge_state_dicts(
        [a, b], base, "dare", parameters={"density": 1.0, "combine": "ties", "aggregate": "mean"}
    )
    torch.testing.assert_close(out["w"], torch.tensor([-3.0, 2.0, -1.0]))


# ----------------------------------------------------------------------------- magnitude prune


def test_magnitude_prune_keeps_top_entries_per_tensor():
    base = make_base()
    fts = make_finetunes(base, n=2)
    out = merge_state_dicts(fts, base, "magnitude_prune", parameters={"density": 0.25, "lambda": 1.0})
    for k in base:
        total = torch.zeros_like(base[k]).reshape(-1)
        for f in fts:
            tv = (f[k] - base[k]).reshape(-1)
            idx = tv.abs().topk(max(1, int(0.25 * tv.numel()))).indices
            total[idx] += tv[idx]
        torch.testing.assert_close(out[k].reshape(-1), base[k].reshape(-1) + total)


# ----------------------------------------------------------------------------- dtypes, params


def test_bf16_inputs_are_merged_in_float32_and_written_in_bf16():
    base = make_base(dtype=torch.bfloat16)
    fts = make_finetunes(base)
    out = merge_state_dicts(fts, base, "task_arithmetic", parameters={"lambda": 0.5})
    for k in base:
        assert out[k].dtype == torch.bfloat16
        expected = base[k].float() + 0.5 * sum(f[k].float() - base[k].float() for f in fts)
        torch.testing.assert_close(out[k], expected.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"density": 1.5}, r"'density' = 1.5 is not allowed; expected a float >= 0.0 and <= 1.0"),
        ({"lambda": "big"}, r"'lambda' = 'big' is not allowed; expected a float"),
        ({"topk": "layer"}, r"'topk' = 'layer' is not allowed; expected one of 'model', 'tensor'"),
        ({"densty": 0.5}, r"unknown parameter 'densty'; known: weight, density"),
    ],
)
def test_parameters_out_of_range_are_named(params, match):
    base = make_base()
    with pytest.raises(ParameterError, match=match):
        merge_state_dicts(make_finetunes(base), base, "ties", parameters=params)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ParameterError, match=r"unknown method 'tiez'; known methods: .*ties"):
        get_method("tiez")


def test_unknown_preset_is_named():
    base = make_base()
    with pytest.raises(ParameterError, match=r"unknown preset 'fusionbench'; known: paper, mergekit"):
        merge_state_dicts(make_finetunes(base), base, "ties", preset="fusionbench")


def test_tensor_filters_and_gradients():
    base = {f"layers.{i}.w": torch.zeros(4) for i in range(3)} | {"head.w": torch.zeros(4)}
    ft = {k: torch.ones(4) for k in base}
    out = merge_state_dicts(
        [ft],
        base,
        "task_arithmetic",
        parameters={"lambda": [{"filter": "head", "value": 0.25}, {"value": [0.0, 1.0]}]},
    )
    assert float(out["head.w"][0]) == 0.25
    assert [float(out[f"layers.{i}.w"][0]) for i in range(3)] == [0.0, 0.5, 1.0]


def test_method_needs_base():
    base = make_base()
    with pytest.raises(ParameterError, match="needs a base model"):
        merge_state_dicts(make_finetunes(base), None, "ties")


def test_no_models_is_an_error():
    with pytest.raises(ParameterError, match="no models to merge"):
        merge_state_dicts([], None, "linear")


@pytest.mark.parametrize("values", ["distinct", "tied"])
def test_exact_topk_mask_is_argsorts_top_k(values):
    from alloykit.methods.primitives import topk_mask_exact

    g = torch.Generator().manual_seed(6)
    x = torch.randn(5000, generator=g)
    if values == "tied":
        x = (x * 3).round()  # few distinct magnitudes: the cut falls inside a tie
    for density in (0.01, 0.2, 0.5, 0.9):
        k = max(1, int(density * x.numel()))
        expected = torch.zeros(x.numel(), dtype=torch.bool)
        expected[torch.argsort(x.abs(), descending=True)[:k]] = True
        mask = topk_mask_exact(x, density)
        assert int(mask.sum()) == k
        assert torch.equal(mask, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["exact", "kthvalue"])
def test_per_tensor_trim_of_stored_bf16_inputs_keeps_each_task_vectors_own_top_k(rule, dtype):
    """The per-tensor masks are chosen before the stack of task vectors is formed, in one scratch
    buffer the selection overwrites: each δ_t keeps what argsort (exact) or kthvalue (reference
    rule) picks on its own |δ_t|, computed here from the inputs independently, per density."""
    from alloykit.methods.base import TensorContext
    from alloykit.methods.primitives import trim_task_vectors

    g = torch.Generator().manual_seed(7)
    base = torch.randn(40, 30, generator=g).bfloat16()
    fts = [(base.float() + torch.randn(40, 30, generator=g) / 8).bfloat16() for _ in range(3)]
    density = [0.3, 1.0, 0.05]  # one task untrimmed: the others' masks must stay in their order
    kept = [f.clone() for f in fts]
    got = trim_task_vectors(list(fts), base, TensorContext("w"), density, "tensor", rule, dtype=dtype)
    assert got.dtype == dtype
    for t, (ft, d) in enumerate(zip(fts, density, strict=True)):
        delta = ft.to(dtype) - base.to(dtype)  # (rounded to bf16 when computed in bf16)
        mags = delta.abs().reshape(-1).float()
        if d >= 1:
            keep = torch.ones_like(mags, dtype=torch.bool)
        elif rule == "exact":
            keep = torch.zeros_like(mags, dtype=torch.bool)
            keep[torch.argsort(mags, descending=True)[: int(d * mags.numel())]] = True
        else:
            keep = mags >= mags.kthvalue(mags.numel() - int(d * mags.numel())).values
        assert len(torch.unique(mags)) < mags.numel()  # bf16 differences tie: the cut is tested
        assert torch.equal(got[t], delta * keep.reshape(delta.shape)), (rule, t)
    assert all(torch.equal(f, k) for f, k in zip(fts, kept, strict=True))  # inputs not overwritten
    # no entries, or density 0 (exact: nothing kept; kthvalue rule: the largest |δ| only)
    empty = torch.zeros(0, 4)
    assert trim_task_vectors([empty, empty], empty, TensorContext("w"), [0.5, 0.5], "tensor", rule).shape == (
        2,
        0,
        4,
    )
    zero = trim_task_vectors([fts[0]], base, TensorContext("w"), [0.0], "tensor", rule, dtype=dtype)[0]
    delta = fts[0].to(dtype) - base.to(dtype)
    expected = torch.zeros_like(delta) if rule == "exact" else delta * (delta.abs() == delta.abs().max())
    assert torch.equal(zero, expected)


@pytest.mark.parametrize(
    "name,params",
    [
        ("ties", {}),
        ("ties", {"threshold": "approximate", "density": 0.4}),
        ("ties", {"density": 1.0}),  # exact zero sums: the model-majority fallback decides
        ("magnitude_prune", {}),
        ("neuromerging", {}),
        ("consensus", {"combine": "ties"}),
        ("pcb", {}),
    ],
)
def test_direct_call_of_a_method_with_whole_model_passes_treats_the_tensor_as_the_model(name, params):
    """``method(tensors, base)`` runs the method's whole-model passes (top-k threshold, sign
    majority, …) over that one tensor, as the engine does for a model of that one tensor."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 40, generator=g)
    # deltas on a 1/64 grid drifting negative: exact cancellations, a negative sign majority
    fts = [base + ((torch.randn(50, 40, generator=g) - 0.4) * 8).round() / 64 for _ in range(3)]
    direct = get_method(name)(fts, base, **params)
    engine = merge_state_dicts([{"w": f} for f in fts], {"w": base}, name, parameters=params)["w"]
    assert torch.equal(direct, engine)
