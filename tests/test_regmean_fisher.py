"""RegMean and Fisher merging against their closed forms and by hand."""

from __future__ import annotations

import pytest
import torch

from alloykit import merge_state_dicts
from alloykit.calibration import Statistics
from alloykit.methods.regmean import regmean_matrix, shrink_off_diagonal

DT = torch.float64


def _models(n: int = 3, seed: int = 0, d_out: int = 5, d_in: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(d_out, d_in, generator=g, dtype=DT), "b": torch.randn(d_out, generator=g, dtype=DT)}
        for _ in range(n)
    ]


def _gram_stats(grams):
    return [Statistics({"w": {"gram": g, "tokens": 1}}) for g in grams]


def test_regmean_with_identical_grams_is_the_average():
    models = _models()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=g, dtype=DT)
    gram = x.T @ x
    for a in (0.0, 0.6, 1.0):
        out = merge_state_dicts(
            models,
            None,
            "regmean",
            statistics=_gram_stats([gram] * 3),
            parameters={"reduce_nondiag": a},
            dtype="float64",
        )
        torch.testing.assert_close(out["w"], torch.stack([m["w"] for m in models]).mean(0))
        torch.testing.assert_close(out["b"], torch.stack([m["b"] for m in models]).mean(0))  # no statistics


def test_regmean_with_diagonal_grams_is_a_per_column_weighted_mean():
    models = _models()
    diags = [torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=DT) * (t + 1) for t in range(3)]
    out = merge_state_dicts(
        models, None, "regmean", statistics=_gram_stats([torch.diag(d) for d in diags]), dtype="float64"
    )
    w = torch.stack([m["w"] for m in models])  # (T, out, in)
    weights = torch.stack(diags)[:, None, :]  # (T, 1, in)
    torch.testing.assert_close(out["w"], (w * weights).sum(0) / weights.sum(0))


def test_regmean_minimises_the_output_distance_on_every_models_data():
    models = _models(seed=2)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 4, generator=g, dtype=DT) for n in (7, 9, 12)]
    # a = 1, sums (normalize: none): the least-squares W* of Σ_t ‖X_t W*ᵀ − X_t W_tᵀ‖²
    stats = [Statistics({"w": {"inputs": x, "tokens": len(x)}}) for x in xs]
    out = merge_state_dicts(
        models,
        None,
        "regmean",
        statistics=stats,
        dtype="float64",
        parameters={"reduce_nondiag": 1.0, "normalize": "none"},
    )
    x_all = torch.cat(xs)
    y_all = torch.cat([x @ m["w"].T for x, m in zip(xs, models, strict=True)])
    expected = torch.linalg.lstsq(x_all, y_all).solution.T
    torch.testing.assert_close(out["w"], expected)
    # normalised by tokens (the reference code): the same with each model's rows weighted 1/N_t
    out = merge_state_dicts(
        models, None, "regmean", statistics=stats, dtype="float64", parameters={"reduce_nondiag": 1.0}
    )
    sw = [x / len(x) ** 0.5 for x in xs]
    expected = torch.linalg.lstsq(
        torch.cat(sw), torch.cat([x @ m["w"].T for x, m in zip(sw, models, strict=True)])
    )
    torch.testing.assert_close(out["w"], expected.solution.T)


def test_shrinking_keeps_the_diagonal():
    g = torch.tensor([[4.0, 2.0], [2.0, 9.0]], dtype=DT)
    torch.testing.assert_close(shrink_off_diagonal(g, 0.25), torch.tensor([[4.0, 0.5], [0.5, 9.0]], dtype=DT))


def test_features_no_data_reaches_take_the_mean_column():
    models = _models(n=2, seed=4)
    grams = [
        torch.diag(torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=DT)),
        torch.diag(torch.tensor([3.0, 0.0, 1.0, 1.0], dtype=DT)),
    ]
    merged = regmean_matrix([m["w"] for m in models], grams, 0.9)
    assert bool(torch.isfinite(merged).all())
    torch.testing.assert_close(merged[:, 1], (models[0]["w"][:, 1] + models[1]["w"][:, 1]) / 2)
    torch.testing.assert_close(merged[:, 0], (models[0]["w"][:, 0] + 3 * models[1]["w"][:, 0]) / 4)


def test_regmean_handles_conv1d_weights_stored_transposed():
    models = _models(seed=5)
    t_models = [{"w": m["w"].T.contiguous(), "b": m["b"]} for m in models]
    g = torch.Generator().manual_seed(6)
    grams = [(lambda x: x.T @ x)(torch.randn(8, 4, generator=g, dtype=DT)) for _ in range(3)]
    plain = merge_state_dicts(models, None, "regmean", statistics=_gram_stats(grams), dtype="float64")
    stats = [Statistics({"w": {"gram": gm, "tokens": 1, "transposed": True}}) for gm in grams]
    trans = merge_state_dicts(t_models, None, "regmean", statistics=stats, dtype="float64")
    torch.testing.assert_close(trans["w"], plain["w"].T)


# ----------------------------------------------------------------------------- Fisher


def _fisher(values, norm_free: bool = True):
    return [
        Statistics({k: {"fisher": v, "examples": 4} for k, v in f.items()}, meta={"kind": "fisher"})
        for f in values
    ]


def test_fisher_with_equal_fishers_is_the_average():
    models = _models()
    f = {"w": torch.rand(5, 4, dtype=DT) + 0.1, "b": torch.rand(5, dtype=DT)}
    out = merge_state_dicts(models, None, "fisher", statistics=_fisher([f, f, f]), dtype="float64")
    for k in ("w", "b"):
        torch.testing.assert_close(out[k], torch.stack([m[k] for m in models]).mean(0))


def test_fisher_weighted_average_by_hand():
    models = _models(n=2, seed=7)
    fa = {"w": torch.full((5, 4), 3.0, dtype=DT), "b": torch.full((5,), 3.0, dtype=DT)}
    fb = {"w": torch.full((5, 4), 1.0, dtype=DT), "b": torch.full((5,), 1.0, dtype=DT)}
    eps = 1e-6
    out = merge_state_dicts(
        models, None, "fisher", statistics=_fisher([fa, fb]), dtype="float64", parameters={"normalize": False}
    )
    expected = ((3 + eps) * models[0]["w"] + (1 + eps) * models[1]["w"]) / (4 + 2 * eps)
    torch.testing.assert_close(out["w"], expected)
    # normalised: c_t ∝ 1/‖F_t‖ over the whole model; ‖F_a‖ = 3‖F_b‖, so c = (1/4, 3/4)
    out = merge_state_dicts(models, None, "fisher", statistics=_fisher([fa, fb]), dtype="float64")
    na, nb = (3.0 * 25**0.5) + eps, (1.0 * 25**0.5) + eps
    ca, cb = (1 / na) / (1 / na + 1 / nb), (1 / nb) / (1 / na + 1 / nb)
    expected = (ca * (3 + eps) * models[0]["w"] + cb * (1 + eps) * models[1]["w"]) / (
        ca * (3 + eps) + cb * (1 + eps)
    )
    torch.testing.assert_close(out["w"], expected)
    assert expected.sub((models[0]["w"] + models[1]["w"]) / 2).abs().max() < 1e-3  # nearly the mean here


def test_tensors_without_a_fisher_are_averaged():
    models = [m | {"running_mean": torch.full((3,), float(i), dtype=DT)} for i, m in enumerate(_models(n=2))]
    f = {"w": torch.rand(5, 4, dtype=DT), "b": torch.rand(5, dtype=DT)}
    out = merge_state_dicts(models, None, "fisher", statistics=_fisher([f, f]), dtype="float64")
    torch.testing.assert_close(out["running_mean"], torch.full((3,), 0.5, dtype=DT))


def test_fisher_weights_must_not_be_negative():
    from alloykit.errors import ParameterError

    models = _models(n=2)
    f = {"w": torch.rand(5, 4, dtype=DT), "b": torch.rand(5, dtype=DT)}
    with pytest.raises(ParameterError, match="'weight' = -1"):
        merge_state_dicts(
            models, None, "fisher", statistics=_fisher([f, f]), model_parameters=[{"weight": -1.0}, {}]
        )


def test_fisher_refuses_weights_that_are_all_zero():
    """Σ_t c_t (F_t + ε) = 0 everywhere: the average would be NaN, so the plan refuses it."""
    from alloykit.errors import ParameterError

    models = _models(n=2)
    f = {"w": torch.rand(5, 4, dtype=DT), "b": torch.rand(5, dtype=DT)}
    with pytest.raises(ParameterError, match="every model's weight is 0"):
        merge_state_dicts(models, None, "fisher", statistics=_fisher([f, f]), parameters={"weight": 0.0})
    one = merge_state_dicts(
        models,
        None,
        "fisher",
        statistics=_fisher([f, f]),
        model_parameters=[{"weight": 0.0}, {}],
        dtype="float64",
    )
    for k in one:  # a single non-zero weight leaves that model
        torch.testing.assert_close(one[k], models[1][k].to(DT))
