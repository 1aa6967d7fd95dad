"""breadcrumbs, breadcrumbs_ties, della, della_linear, slerp and model_stock against numbers
computed independently in the test (by hand, slow loops over the papers' equations, transcriptions
of the reference code), their properties and their error messages. Parity with mergekit itself
is in test_mergekit_parity_zoo.py."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from alloykit import merge_state_dicts
from alloykit.errors import ParameterError
from alloykit.methods import get_method
from alloykit.methods._sparsify import magprune_probabilities
from alloykit.methods.base import TensorContext
from alloykit.recipe import recipe_from_dict
from tests.conftest import make_base, make_finetunes

TV_METHODS = ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]
ALL = [*TV_METHODS, "slerp", "model_stock"]


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _n_models(method: str) -> int:
    return 1 if method == "slerp" else 3


def _params(method: str, preset: str) -> dict:
    """Parameters that make every method do real work (drops, angles) in either preset."""
    if method.startswith("breadcrumbs"):
        return {"density": 0.5, "gamma": 0.1}
    if method.startswith("della"):
        return {"density": 0.5, "epsilon": 0.2}
    if method == "slerp":
        return {"t": 0.3}
    return {}


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("preset", ["paper", "mergekit"])
@pytest.mark.parametrize("method", ALL)
def test_zero_task_vectors_give_the_base(method, preset):
    base = make_base()
    fts = [{k: v.clone() for k, v in base.items()} for _ in range(_n_models(method))]
    out = merge_state_dicts(fts, base, method, preset=preset, parameters=_params(method, preset))
    for k in base:
        assert torch.isfinite(out[k]).all(), k
        torch.testing.assert_close(out[k], base[k], rtol=0, atol=1e-6 if method == "slerp" else 0)


@pytest.mark.parametrize("method", ALL)
def test_bf16_and_fp16_inputs_work(method):
    base32 = make_base()
    fts32 = make_finetunes(base32, n=_n_models(method), scale=0.3)
    ref = merge_state_dicts(fts32, base32, method, parameters=_params(method, "paper"))
    for dtype in (torch.bfloat16, torch.float16):
        base = {k: v.to(dtype) for k, v in base32.items()}
        fts = [{k: v.to(dtype) for k, v in sd.items()} for sd in fts32]
        out = merge_state_dicts(fts, base, method, parameters=_params(method, "paper"), dtype="auto")
        for k in out:
            assert out[k].dtype == dtype
            assert torch.isfinite(out[k].float()).all()
            close = torch.isclose(out[k].float(), ref[k], rtol=0.05, atol=0.05)
            if method.startswith("della"):
                continue  # random masks drawn from rounded probabilities
            # masks on rounded task vectors may pick a few other entries
            assert float(close.float().mean()) >= (0.9 if method.startswith("breadcrumbs") else 1.0), k


def test_every_new_method_is_listed_with_both_presets():
    for name in ALL:
        m = get_method(name)
        assert set(m.presets) == {"paper", "mergekit"} and m.default_preset == "paper"
        assert re.search(r"\b(19|20)\d\d\b", m.summary), m.summary  # the summary line cites the paper


# ----------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_tensor_scope_by_hand():
    """mergekit rule on 10 entries: keep int(0.5·10) = 5, drop int(0.2·10) = 2 outliers, so the
    3 smallest and 2 largest |δ| go."""
    delta = torch.tensor([0.1, -0.9, 0.3, 0.05, -0.5, 0.7, 0.2, -1.5, 0.4, 0.6])
    base = torch.zeros(10)
    bc = get_method("breadcrumbs")
    out = bc([base + delta], base, preset="mergekit", density=0.5, gamma=0.2)
    # |δ| ascending: 0.05 0.1 0.2 | 0.3 0.4 0.5 0.6 0.7 | 0.9 1.5
    expected = torch.tensor([0, 0, 0.3, 0, -0.5, 0.7, 0, 0, 0.4, 0.6])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # keep 9 and drop 2 outliers do not fit in 10: only the largest goes
    out = bc([base + delta], base, preset="mergekit", density=0.9, gamma=0.2)
    torch.testing.assert_close(out, delta * (delta.abs() < 1.5), rtol=0, atol=0)


def _reference_rows(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Slow loop of TaskVectorMiddleKeep: per row, drop the int(nγ) largest |δ|, then keep the
    int(n·density) largest of the rest."""
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() >= 3 else delta.reshape(-1, delta.shape[-1])
    out = torch.zeros_like(rows)
    n = rows.shape[1]
    for r in range(rows.shape[0]):
        order = sorted(range(n), key=lambda j: -abs(float(rows[r, j])))
        for j in order[int(n * gamma) : int(n * gamma) + int(n * density)]:
            out[r, j] = rows[r, j]
    return out.reshape(delta.shape)


@pytest.mark.parametrize("shape", [(6, 20), (40,), (4, 3, 5, 2)])
def test_breadcrumbs_row_scope_matches_reference_loop(shape):
    base, a, b = _randn(*shape, seed=1), _randn(*shape, seed=2), _randn(*shape, seed=3)
    out = get_method("breadcrumbs").fn(
        [a, b],
        base,
        TensorContext("w"),
        weight=[0.5, 2.0],
        density=[0.3] * 2,
        gamma=[0.1] * 2,
        lambda_=1.0,
        scope="row",
        rescale="none",
        aggregate="sum",
    )
    expected = base + 0.5 * _reference_rows(a - base, 0.3, 0.1) + 2.0 * _reference_rows(b - base, 0.3, 0.1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_breadcrumbs_ties_elects_signs_on_the_masked_vectors():
    base = _randn(8, 10, seed=4)
    fts = [base + _randn(8, 10, seed=5 + i) for i in range(3)]
    w = [0.7, 1.3, 0.4]
    out = get_method("breadcrumbs_ties").fn(
        fts,
        base,
        TensorContext("w"),
        weight=w,
        density=[0.6] * 3,
        gamma=[0.1] * 3,
        lambda_=1.0,
        scope="row",
        rescale="none",
        aggregate="weighted_mean",
    )
    masked = [wt * _reference_rows(x - base, 0.6, 0.1) for wt, x in zip(w, fts, strict=True)]
    expected = base.clone()
    for i in range(8):
        for j in range(10):
            vals = [float(m[i, j]) for m in masked]
            elected = 1.0 if sum(vals) >= 0 else -1.0
            agree = [
                (v, wt) for v, wt in zip(vals, w, strict=True) if v != 0 and math.copysign(1, v) == elected
            ]
            if agree:
                expected[i, j] += sum(v for v, _ in agree) / sum(wt for _, wt in agree)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_breadcrumbs_keeps_nothing_masked_at_density_one_and_gamma_zero():
    base = make_base()
    fts = make_finetunes(base)
    ta = merge_state_dicts(fts, base, "task_arithmetic", parameters={"lambda": 0.6})
    for preset, params in (("paper", {"density": 1.0, "gamma": 0.0}), ("mergekit", {"gamma": 0.3})):
        out = merge_state_dicts(fts, base, "breadcrumbs", preset=preset, parameters={**params, "lambda": 0.6})
        for k in ta:
            torch.testing.assert_close(out[k], ta[k], rtol=0, atol=0)
    # the reference still drops the outliers at density 1 when γ > 0
    out = merge_state_dicts(fts, base, "breadcrumbs", parameters={"density": 1.0, "gamma": 0.2})
    assert any(not torch.equal(out[k], ta[k]) for k in ta)


def test_breadcrumbs_l1_rescale_restores_the_norm_and_0d_tensors_are_kept():
    base = _randn(50, seed=6)
    ft = base + _randn(50, seed=7)
    out = get_method("breadcrumbs")([ft], base, preset="mergekit", density=0.3, rescale="l1")
    delta = out - base
    assert int((delta != 0).sum()) == 15
    torch.testing.assert_close(delta.abs().sum(), (ft - base).abs().sum(), rtol=1e-5, atol=0)
    scalar = get_method("breadcrumbs")([torch.tensor(2.0)], torch.tensor(1.0), density=0.1, gamma=0.5)
    assert float(scalar) == 2.0


def test_breadcrumbs_errors_name_the_parameter():
    with pytest.raises(ParameterError, match=r"breadcrumbs.*'gamma' = 1\.5.*<= 1"):
        get_method("breadcrumbs")([torch.ones(3)], torch.zeros(3), gamma=1.5)
    with pytest.raises(ParameterError, match=r"'scope' = 'layer'.*one of 'row', 'tensor'"):
        get_method("breadcrumbs_ties")([torch.ones(3)], torch.zeros(3), scope="layer")


# ----------------------------------------------------------------------------- della


@pytest.mark.parametrize("convention", ["reference", "mergekit"])
def test_magprune_probabilities_by_hand(convention):
    # |δ| ranks 4, 2, 3, 1 → r̂ = 1, 1/3, 2/3, 0 → p = 0.4 + 0.2·r̂
    row = torch.tensor([3.0, -1.0, 2.0, 0.5])
    p = magprune_probabilities(row, 0.5, 0.1, convention)
    torch.testing.assert_close(p, torch.tensor([[0.6, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3, 0.4]]))
    # a 2-D tensor: rows are ranked separately; a one-entry row gets p = density
    p = magprune_probabilities(torch.tensor([[1.0, 5.0], [-2.0, 0.1]]), 0.5, 0.2, convention)
    torch.testing.assert_close(p, torch.tensor([[0.3, 0.7], [0.7, 0.3]]))
    torch.testing.assert_close(
        magprune_probabilities(torch.tensor([[4.0]]), 0.5, 0.2, convention), torch.tensor([[0.5]])
    )


def test_magprune_conventions_agree_in_float32():
    x = _randn(30, 300, seed=7)
    for d, e in ((0.5, 0.15), (0.3, 0.2), (0.9, 0.05)):
        ref = magprune_probabilities(x, d, e, "reference")
        torch.testing.assert_close(ref, magprune_probabilities(x, d, e, "mergekit"), rtol=0, atol=0)
        assert float(ref.amin()) == pytest.approx(d - e) and float(ref.amax()) == pytest.approx(d + e)


def test_magprune_n_d_rows_per_convention():
    x = _randn(3, 4, 2, seed=8)
    p_ref = magprune_probabilities(x, 0.5, 0.1, "reference")  # out × rest: 3 rows of 8
    p_mk = magprune_probabilities(x, 0.5, 0.1, "mergekit")  # ranked along dim 1 (4 entries)
    assert p_ref.shape == (3, 8) and p_mk.shape == (3, 4, 2)
    ranks = x.reshape(3, 8).abs().argsort(dim=1).argsort(dim=1).float()
    torch.testing.assert_close(p_ref, 0.4 + 0.2 * ranks / 7)


def test_della_drops_with_the_seeded_generator_and_rescales_by_1_over_p():
    """Recompute the merge from the formula with the mask the method's generator gives."""
    base = _randn(5, 12, seed=9)
    fts = [base + _randn(5, 12, seed=10 + i) for i in range(2)]
    ctx = TensorContext("layers.0.w", seed=3)
    w = [0.8, 1.2]
    out = get_method("della").fn(
        fts,
        base,
        ctx,
        weight=w,
        density=[0.5, 0.5],
        epsilon=[0.2, 0.2],
        lambda_=0.9,
        rescale="inverse",
        magprune="reference",
        aggregate="weighted_mean",
    )
    dropped = []
    for i, x in enumerate(fts):
        d = x - base
        ranks = d.abs().argsort(dim=1).argsort(dim=1).float()
        p = 0.3 + 0.4 * ranks / 11
        m = torch.bernoulli(p, generator=TensorContext("layers.0.w", seed=3).generator(i))
        assert 0 < m.mean() < 1
        dropped.append(w[i] * m * d / p)
    total = dropped[0] + dropped[1]
    elected = torch.where(total >= 0, 1.0, -1.0)
    agree = [(dd.sign() == elected).float() for dd in dropped]
    num = sum(dd * a for dd, a in zip(dropped, agree, strict=True))
    den = sum(wt * a for wt, a in zip(w, agree, strict=True))
    expected = base + 0.9 * num / torch.where(den == 0, 1.0, den)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_della_keep_rate_follows_the_rank_window():
    """Over many draws, entry j of a row is kept with probability density − ε + 2ε·r̂_j and the
    1/p rescale makes the dropped vector unbiased."""
    row = torch.tensor([[0.1, -0.4, 0.3, 0.2, -0.5]])
    kept = torch.zeros(5)
    mean = torch.zeros(5)
    n = 4000
    della = get_method("della")
    for s in range(n):
        out = della.fn(
            [row],
            torch.zeros_like(row),
            TensorContext("w", seed=s),
            weight=[1.0],
            density=[0.5],
            epsilon=[0.3],
            lambda_=1.0,
            rescale="inverse",
            magprune="reference",
            aggregate="sum",
        )
        kept += (out[0] != 0).float()
        mean += out[0]
    expected_p = torch.tensor([0.2, 0.65, 0.5, 0.35, 0.8])
    torch.testing.assert_close(kept / n, expected_p, rtol=0, atol=0.035)
    torch.testing.assert_close(mean / n, row[0], rtol=0, atol=0.03)


def test_della_density_extremes():
    base = make_base()
    fts = make_finetunes(base)
    ties = merge_state_dicts(fts, base, "ties", preset="mergekit", parameters={"density": 1.0})
    ta_mean = merge_state_dicts(fts, base, "task_arithmetic", parameters={"normalize": True})
    for preset in ("paper", "mergekit"):
        out = merge_state_dicts(fts, base, "della", preset=preset, parameters={"density": 1.0})
        lin = merge_state_dicts(
            fts,
            base,
            "della_linear",
            preset=preset,
            parameters={"density": 1.0, "aggregate": "weighted_mean"},
        )
        zero = merge_state_dicts(fts, base, "della", preset=preset, parameters={"density": 0.0})
        for k in base:
            torch.testing.assert_close(out[k], ties[k], rtol=0, atol=0)
            torch.testing.assert_close(lin[k], ta_mean[k], rtol=0, atol=0)
            torch.testing.assert_close(zero[k], base[k], rtol=0, atol=0)


def test_della_is_deterministic_per_seed_and_tensor():
    base = make_base()
    fts = make_finetunes(base)
    a = merge_state_dicts(fts, base, "della", seed=5)
    b = merge_state_dicts(fts, base, "della", seed=5, workers=2)
    c = merge_state_dicts(fts, base, "della", seed=6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_window_outside_0_1_is_refused_before_merging(method):
    base = make_base()
    fts = make_finetunes(base, n=2)
    with pytest.raises(
        ParameterError,
        match=rf"^{method}, model 0: density 0\.9 ± epsilon 0\.15 .*expected 0 < density − epsilon",
    ):
        merge_state_dicts(fts, base, method, parameters={"density": 0.9, "epsilon": 0.15})
    with pytest.raises(ParameterError, match=rf"^{method}, model 1: density 0\.1 ± epsilon 0\.1 "):
        merge_state_dicts(fts, base, method, model_parameters=[{}, {"density": 0.1, "epsilon": 0.1}])
    with pytest.raises(ParameterError, match=rf"^{method}, model 0: density 0\.5 ± epsilon 0\.5"):
        get_method(method)([torch.ones(4)], torch.zeros(4), density=0.5, epsilon=0.5)
    # density 1 (no drop) needs no window, as in mergekit
    merge_state_dicts(fts, base, method, parameters={"density": 1.0, "epsilon": 0.5})


# ----------------------------------------------------------------------------- slerp


def _slerp64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Shoemake's formula in float64, with the 0.9995 lerp fallback."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    cos = float(x @ y / (x.norm() * y.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * x + t * y).reshape(a.shape)
    om = math.acos(cos)
    return ((math.sin((1 - t) * om) * x + math.sin(t * om) * y) / math.sin(om)).reshape(a.shape)


@pytest.mark.parametrize("t", [0.25, 0.5, 0.9, 1.3])
def test_slerp_matches_shoemake_formula(t):
    a, b = _randn(40, 30, seed=11), _randn(40, 30, seed=12)
    out = get_method("slerp")([b], a, t=t)
    torch.testing.assert_close(out.double(), _slerp64(a, b, t), rtol=1e-5, atol=1e-5)
    # for unit vectors the path stays on the sphere
    ua, ub = a / a.norm(), b / b.norm()
    assert abs(float(get_method("slerp")([ub], ua, t=0.4).norm()) - 1) < 1e-5


def test_slerp_endpoints_and_lerp_fallback():
    a, b = _randn(7, 9, seed=13), _randn(7, 9, seed=14)
    s = get_method("slerp")
    torch.testing.assert_close(s([b], a, t=0.0), a, rtol=0, atol=0)
    torch.testing.assert_close(s([b], a, t=1.0), b, rtol=0, atol=0)
    near = a + 1e-3 * b  # cos > 0.9995: plain lerp in float32
    torch.testing.assert_close(
        s([near], a, t=0.3), (1 - torch.tensor(0.3)) * a + torch.tensor(0.3) * near, rtol=0, atol=0
    )
    assert s([torch.empty(0, 3)], torch.empty(0, 3), t=0.5).shape == (0, 3)


def test_slerp_chunks_long_tensors():
    a, b = _randn(1_100_000, seed=15), _randn(1_100_000, seed=16)
    out = get_method("slerp")([b], a, t=0.35)
    torch.testing.assert_close(out.double(), _slerp64(a, b, 0.35), rtol=1e-4, atol=1e-5)


def test_slerp_errors():
    a = torch.ones(3)
    from alloykit.errors import RecipeError

    with pytest.raises(RecipeError, match=r"slerp needs 'parameters: \{t: \.\.\.\}'"):
        recipe_from_dict(
            {"merge_method": "slerp", "base_model": "b", "models": [{"model": "b"}, {"model": "x"}]}
        )
    torch.testing.assert_close(get_method("slerp")([a + 1], a), a + 0.5)  # alloykit's default: t = 0.5
    with pytest.raises(ParameterError, match=r"'dot_threshold' = 1\.5"):
        get_method("slerp")([a], a, t=0.5, dot_threshold=1.5)
    base = make_base()
    with pytest.raises(ParameterError, match=r"slerp takes at most 1 models, got 2"):
        merge_state_dicts(make_finetunes(base, n=2), base, "slerp", parameters={"t": 0.5})


def test_slerp_t_gradient_over_layers():
    base = make_base()
    (ft,) = make_finetunes(base, n=1, scale=2.0)
    out = merge_state_dicts([ft], base, "slerp", parameters={"t": [0.0, 1.0]}, base_check=None)
    torch.testing.assert_close(out["layers.0.attn.weight"], base["layers.0.attn.weight"], rtol=0, atol=0)
    torch.testing.assert_close(out["layers.1.mlp.weight"], ft["layers.1.mlp.weight"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- model stock


def _reference_model_stock(w0: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """Transcription of the authors' notebook / FusionBench model_stock.py: compute_angle,
    compute_ratio (k models, mean of pairwise angles for k > 2), merge."""
    eps = 1e-8
    angles = []
    for i in range(len(ws)):
        for j in range(i + 1, len(ws)):
            v1, v2 = (ws[i] - w0).float(), (ws[j] - w0).float()
            cos = torch.sum(v1 * v2) / (math.sqrt(torch.sum(v1**2) * torch.sum(v2**2)) + eps)
            cos = torch.clamp(cos, min=-1.0, max=1.0)
            angles.append(np.rad2deg(torch.acos(cos).item()))
    angle = sum(angles) / len(angles)
    k = len(ws)
    ratio = k * np.cos(np.deg2rad(angle)) / ((k - 1) * np.cos(np.deg2rad(angle)) + 1 + eps)
    avg = torch.zeros_like(ws[0])
    for w in ws:
        avg += w
    avg /= k
    return avg * ratio + w0 * (1.0 - ratio)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_model_stock_matches_the_reference_code(k):
    w0 = _randn(16, 8, seed=20)
    shared = _randn(16, 8, seed=21)
    ws = [w0 + shared + _randn(16, 8, seed=22 + i) for i in range(k)]
    out = get_method("model_stock")(ws, w0)
    torch.testing.assert_close(out, _reference_model_stock(w0, ws), rtol=0, atol=1e-7)


def test_model_stock_mergekit_formula_in_float64():
    w0 = _randn(6, 10, seed=30)
    ws = [w0 + _randn(6, 10, seed=40) + 0.8 * _randn(6, 10, seed=31 + i) for i in range(3)]
    out = get_method("model_stock")(ws, w0, preset="mergekit")
    d = [(w - w0).double().reshape(-1) for w in ws]
    cos = [float(d[i] @ d[j] / (d[i].norm() * d[j].norm())) for i in range(3) for j in range(i + 1, 3)]
    c = sum(cos) / 3
    t = 3 * c / (1 + 2 * c)
    expected = t * sum(w.double() for w in ws) / 3 + (1 - t) * w0.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert 0.4 < t < 0.9  # the test exercises a real interpolation


def test_model_stock_identical_and_orthogonal_task_vectors():
    w0 = _randn(4, 6, seed=50)
    ft = w0 + _randn(4, 6, seed=51)
    for preset in ("paper", "mergekit"):
        # cos = 1 → t = 1: the fine-tune itself
        torch.testing.assert_close(
            get_method("model_stock")([ft, ft, ft], w0, preset=preset), ft, rtol=0, atol=1e-6
        )
    e = torch.zeros(2, 2)
    a, b = e.clone(), e.clone()
    a[0, 0], b[1, 1] = 1.0, 1.0  # orthogonal: t = 0, the base
    torch.testing.assert_close(get_method("model_stock")([a, b], e, preset="mergekit"), e, rtol=0, atol=0)
    torch.testing.assert_close(get_method("model_stock")([a, b], e), e, rtol=0, atol=1e-7)
    # opposite task vectors, N = 2: mergekit keeps the base where 1 + cos θ = 0
    torch.testing.assert_close(get_method("model_stock")([a, -a], e, preset="mergekit"), e, rtol=0, atol=0)


def test_model_stock_granularity_rows():
    w0 = _randn(5, 4, 3, seed=60)
    ws = [w0 + _randn(5, 4, 3, seed=61) + _randn(5, 4, 3, seed=62 + i) for i in range(2)]
    ms = get_method("model_stock")
    out = ms(ws, w0, granularity="filter")
    for r in range(5):  # one ratio per output unit (rows of out × rest)
        expected = _reference_model_stock(w0[r], [w[r] for w in ws])
        torch.testing.assert_close(out[r], expected, rtol=1e-5, atol=1e-6)
    # mergekit's filter_wise: per vector along the last axis; for 2-D the same as per row
    out2 = ms([w[:, :, 0] for w in ws], w0[:, :, 0], preset="mergekit", granularity="last_axis")
    out3 = ms([w[:, :, 0] for w in ws], w0[:, :, 0], preset="mergekit", granularity="filter")
    torch.testing.assert_close(out2, out3, rtol=0, atol=0)
    assert not torch.allclose(out, ms(ws, w0))  # per-row ratios differ from the per-tensor one


def test_model_stock_needs_two_fine_tunes():
    base = make_base()
    with pytest.raises(ParameterError, match=r"model_stock needs at least 2 models, got 1"):
        merge_state_dicts(make_finetunes(base, n=1), base, "model_stock")


# ----------------------------------------------------------------------------- mergekit recipes


def _mk(method: str, params: dict | None = None, n: int = 2, list_base: bool = False) -> dict:
    models = [{"model": f"ft{i}", "parameters": {"weight": 1.0}} for i in range(n)]
    if list_base:
        models.insert(0, {"model": "base"})
    data = {"merge_method": method, "base_model": "base", "models": models}
    if params is not None:
        data["parameters"] = params
    return data


@pytest.mark.parametrize(
    "name,params,expected",
    [
        (
            "breadcrumbs",
            {"normalize": True, "rescale": True, "gamma": 0.02},
            {"aggregate": "weighted_mean", "rescale": "l1", "gamma": 0.02},
        ),
        ("breadcrumbs_ties", {"density": 0.4}, {"density": 0.4}),
        (
            "della",
            {"normalize": False, "rescale": False, "epsilon": 0.1},
            {"aggregate": "sum", "rescale": "none", "epsilon": 0.1},
        ),
        ("della_linear", {"int8_mask": True, "lambda": 0.5}, {"lambda": 0.5}),
        ("model_stock", {"filter_wise": True}, {"granularity": "last_axis"}),
        ("slerp", {"t": [0.0, 0.5, 1.0]}, {"t": [0.0, 0.5, 1.0]}),
    ],
)
def test_mergekit_recipes_translate(name, params, expected):
    recipe = recipe_from_dict(_mk(name, params, n=1 if name == "slerp" else 2, list_base=True))
    assert recipe.method == name and recipe.preset == "mergekit"
    assert recipe.parameters == expected
    assert [m.model for m in recipe.models] == (["ft0"] if name == "slerp" else ["ft0", "ft1"])


def test_mergekit_methods_still_unsupported_are_refused():
    from alloykit.errors import RecipeError

    with pytest.raises(RecipeError, match=r"mergekit method 'frankenmerge' is not supported yet.*nuslerp"):
        recipe_from_dict(_mk("frankenmerge"))


@pytest.mark.parametrize("preset", ["paper", "mergekit"])
@pytest.mark.parametrize("method", ALL)
def test_empty_scalar_and_single_entry_rows(method, preset):
    """Every tensor class gets a finite answer of its own shape: empty, 0-D, one-entry rows."""
    n = _n_models(method)
    for shape in [(0,), (4, 0), (), (1,), (3, 1)]:
        fts = [torch.full(shape, 2.0 + i) for i in range(n)]
        out = get_method(method)(fts, torch.ones(shape), preset=preset, **_params(method, preset))
        assert out.shape == torch.Size(shape)
        assert torch.isfinite(out).all(), (method, shape)
