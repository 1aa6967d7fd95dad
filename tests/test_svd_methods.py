"""TSV-M, Iso-C and Iso-CTS against the papers' equations re-implemented here in float64 numpy (the
reference code's own route: zero-padded bases, explicit projectors), and their properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alloykit import merge, merge_state_dicts
from alloykit.errors import ParameterError
from alloykit.io import open_checkpoint
from alloykit.methods import TensorContext, get_method
from alloykit.methods._svd import iso_cts_sizes, tsv_rank

METHODS = ("tsv_m", "iso_c", "iso_cts")


# ----------------------------------------------------------------------------- float64 references


def np_svd(a, rng=None):
    """Thin SVD; with ``rng``, every singular pair gets a random sign (an equally valid SVD)."""
    u, s, vh = np.linalg.svd(a, full_matrices=False)
    if rng is not None:
        d = rng.choice([-1.0, 1.0], size=s.shape)
        u, vh = u * d, d[:, None] * vh
    return u, s, vh


def np_polar(a, rng=None):
    u, _, vh = np_svd(a, rng)
    return u @ vh


def np_tsv_m(deltas, rng=None, k=None):
    """TSV-M as the reference code computes it: each task's top k triplets placed in its own
    slot of zero-padded r-column U, s, V, then polar(U) diag(s) polar(V)."""
    t_count = len(deltas)
    m, n = deltas[0].shape
    r = min(m, n)
    k = int(r * (1 / t_count)) if k is None else k
    width = max(r, t_count * k)
    u_all, s_all, v_all = np.zeros((m, width)), np.zeros(width), np.zeros((width, n))
    for i, d in enumerate(deltas):
        u, s, vh = np_svd(d, rng)
        u_all[:, i * k : (i + 1) * k] = u[:, :k]
        s_all[i * k : (i + 1) * k] = s[:k]
        v_all[i * k : (i + 1) * k] = vh[:k]
    return np_polar(u_all, rng) @ np.diag(s_all) @ np_polar(v_all, rng)


def np_iso_c(deltas, rng=None):
    u, s, vh = np_svd(sum(deltas), rng)
    return u @ np.diag(np.full_like(s, s.mean())) @ vh


def np_iso_cts(deltas, f, rng=None):
    """Iso-CTS as the reference code computes it (m × m projector, zero-padded slots)."""
    t_count = len(deltas)
    m, n = deltas[0].shape
    r = min(m, n)
    k_c = int(r * f)
    k_c = r - round((r - k_c) / t_count) * t_count
    n_t = int((r - k_c) / t_count)
    u, s, vh = np_svd(sum(deltas), rng)
    uc, sc, vc = u[:, :k_c], s[:k_c], vh[:k_c]
    u_all, s_all, v_all = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, d in enumerate(deltas):
        ut, st, vt = np_svd(d - uc @ uc.T @ d, rng)
        u_all[:, i * n_t : (i + 1) * n_t] = ut[:, :n_t]
        s_all[i * n_t : (i + 1) * n_t] = st[:n_t]
        v_all[i * n_t : (i + 1) * n_t] = vt[:n_t]
    u_all[:, t_count * n_t :] = uc
    s_all[t_count * n_t :] = sc
    v_all[t_count * n_t :] = vc
    return np_polar(u_all, rng) @ np.diag(np.full(r, s_all.mean())) @ np_polar(v_all, rng)


def task_matrices(shape, n_tasks, seed=0, decay=0.7, scale=0.1, spectrum=None):
    """A base and fine-tunes whose task vectors have distinct, decaying singular values
    (``spectrum(r)``: given singular values instead)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    base = torch.randn(m, n, generator=g, dtype=torch.float64)
    fts = []
    for _ in range(n_tasks):
        q1 = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
        q2 = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
        if spectrum is None:
            jitter = 1 + 0.1 * torch.rand(r, generator=g)
            sig = scale * decay ** torch.arange(r, dtype=torch.float64) * jitter
        else:
            sig = spectrum(r)
        fts.append(base + q1 @ torch.diag(sig) @ q2.T)
    return base.float(), [f.float() for f in fts]


def deltas64(base, fts):
    return [(f.double() - base.double()).numpy() for f in fts]


def close(actual, expected, tol=2e-5):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(
        actual.double(), expected, rtol=0, atol=tol * max(1.0, float(expected.abs().max()))
    )


# ----------------------------------------------------------------------------- against the equations


@pytest.mark.parametrize("shape", [(12, 8), (7, 16), (10, 10)])
@pytest.mark.parametrize("n_tasks", [1, 2, 3, 5])
@pytest.mark.parametrize("flip_seed", [None, 1])
def test_tsv_m_matches_the_reference_equations_and_ignores_singular_vector_signs(shape, n_tasks, flip_seed):
    base, fts = task_matrices(shape, n_tasks, seed=n_tasks)
    out = get_method("tsv_m")(fts, base, alpha=0.6)
    rng = None if flip_seed is None else np.random.default_rng(flip_seed)
    expected = base.double().numpy() + 0.6 * np_tsv_m(deltas64(base, fts), rng)
    close(out, expected)


@pytest.mark.parametrize("shape", [(12, 8), (7, 16)])
@pytest.mark.parametrize("n_tasks", [1, 3])
def test_iso_c_matches_the_reference_equations(shape, n_tasks):
    base, fts = task_matrices(shape, n_tasks, seed=10 + n_tasks)
    out = get_method("iso_c")(fts, base, alpha=1.3)
    rng = np.random.default_rng(3)
    close(out, base.double().numpy() + 1.3 * np_iso_c(deltas64(base, fts), rng))


@pytest.mark.parametrize(
    "shape,n_tasks,f",
    [((12, 8), 2, 0.8), ((16, 12), 3, 0.8), ((9, 20), 4, 0.5), ((30, 30), 4, 0.8), ((12, 10), 3, 0.0)],
)
@pytest.mark.parametrize("flip_seed", [None, 5])
def test_iso_cts_matches_the_reference_equations_and_ignores_singular_vector_signs(
    shape, n_tasks, f, flip_seed
):
    base, fts = task_matrices(shape, n_tasks, seed=20 + n_tasks)
    out = get_method("iso_cts")(fts, base, alpha=0.9, common_fraction=f)
    rng = None if flip_seed is None else np.random.default_rng(flip_seed)
    close(out, base.double().numpy() + 0.9 * np_iso_cts(deltas64(base, fts), f, rng))


def test_iso_cts_sizes_by_hand():
    # ViT-B, 768 × 768, 8 tasks: int(614.4) = 614; (768 − 614)/8 = 19.25 → 19·8 = 152; 768 − 152
    assert iso_cts_sizes(768, 8, 0.8) == (616, 19)
    assert iso_cts_sizes(10, 4, 0.8) == (10, 0)  # 2/4 = 0.5 rounds half to even: 0
    assert iso_cts_sizes(30, 4, 0.8) == (22, 2)  # 6/4 = 1.5 rounds half to even: 2
    assert iso_cts_sizes(10, 3, 0.8) == (7, 1)  # k_c grows or shrinks so that T divides the rest
    assert iso_cts_sizes(8, 2, 1.0) == (8, 0)
    assert iso_cts_sizes(5, 3, 0.0) == (2, 1)  # reference: round(5/3)·3 = 6 > 5; guarded
    for r, t, f in [(768, 8, 0.8), (30, 4, 0.8), (10, 3, 0.8), (5, 3, 0.0), (7, 2, 0.3)]:
        k_c, n_t = iso_cts_sizes(r, t, f)
        assert k_c >= 0 and k_c + t * n_t == r


def test_tsv_rank_is_the_reference_codes_int_of_r_times_one_over_t():
    assert tsv_rank(768, 8) == 96
    assert tsv_rank(768, 14) == 54
    assert tsv_rank(49, 49) == 0  # int(49 · (1/49)) = int(0.999…) in floating point
    assert tsv_rank(1, 3) == 0 and tsv_rank(1, 3, min_rank=1) == 1
    assert tsv_rank(4, 2, min_rank=9) == 4


# ----------------------------------------------------------------------------- properties


def test_tsv_m_one_model_at_full_rank_is_base_plus_alpha_tau():
    base, fts = task_matrices((9, 6), 1, seed=4)
    out = get_method("tsv_m")(fts, base, alpha=0.35)
    close(out, base.double() + 0.35 * (fts[0].double() - base.double()))


def test_tsv_m_with_a_zero_task_is_the_other_tasks_truncated_svd():
    base, fts = task_matrices((10, 8), 1, seed=6)
    out = get_method("tsv_m")([fts[0], base.clone()], base)
    u, s, vh = np.linalg.svd(deltas64(base, fts)[0])
    close(out, base.double().numpy() + u[:, :4] @ np.diag(s[:4]) @ vh[:4])


def test_tsv_m_min_rank_keeps_thin_matrices_and_zero_rank_leaves_the_base():
    base, fts = task_matrices((2, 6), 3, seed=7)  # r = 2 < T = 3: k = 0 in the reference code
    assert torch.equal(get_method("tsv_m")(fts, base), base)
    out = get_method("tsv_m")(fts, base, min_rank=1)
    close(out, base.double().numpy() + np_tsv_m(deltas64(base, fts), k=1))


def test_tsv_m_rank_tol_drops_the_noise_directions_of_low_rank_task_vectors():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(16, 12, generator=g)
    # LoRA-like task vectors of rank 2; T = 2 keeps k = 6 triplets, 4 of them numerical noise
    deltas = [torch.randn(16, 2, generator=g) @ torch.randn(2, 12, generator=g) * 0.1 for _ in range(2)]
    out = get_method("tsv_m")([base + d for d in deltas], base, rank_tol=1e-4)
    expected = np_tsv_m([d.double().numpy() for d in deltas], k=2)
    close(out, base.double().numpy() + expected, tol=1e-4)


def test_iso_c_update_has_a_flat_spectrum_equal_to_the_mean_of_the_sums():
    base, fts = task_matrices((14, 9), 3, seed=9)
    update = get_method("iso_c")(fts, base).double() - base.double()
    sv_sum = torch.linalg.svdvals(sum(f.double() - base.double() for f in fts))
    sv = torch.linalg.svdvals(update)
    torch.testing.assert_close(sv, torch.full_like(sv, float(sv_sum.mean())), rtol=1e-5, atol=1e-6)


def test_iso_cts_update_has_a_flat_spectrum_too():
    base, fts = task_matrices((14, 9), 3, seed=9)
    update = get_method("iso_cts")(fts, base).double() - base.double()
    sv = torch.linalg.svdvals(update)
    torch.testing.assert_close(sv, torch.full_like(sv, float(sv[0])), rtol=1e-5, atol=1e-6)


def test_iso_cts_with_common_fraction_one_is_exactly_iso_c():
    base, fts = task_matrices((12, 9), 4, seed=11)
    a = get_method("iso_cts")(fts, base, common_fraction=1.0, alpha=1.7)
    b = get_method("iso_c")(fts, base, alpha=1.7)
    assert torch.equal(a, b)


def test_iso_cts_with_one_task_equals_iso_c():
    # one task: common space + the rest of its own spectrum = all of it, polar(U) = U
    base, fts = task_matrices((12, 9), 1, seed=12)
    close(get_method("iso_cts")(fts, base), get_method("iso_c")(fts, base), tol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_zero_task_vectors_give_the_base_back_exactly(method, tmp_path):
    sd = {
        "w": torch.randn(5, 4),
        "b": torch.randn(4),
        "conv": torch.randn(3, 2, 2, 2),
        "text_projection": torch.randn(4, 4),
        "scalar": torch.tensor(2.0),
    }
    m = get_method(method)
    for preset in m.presets:
        out = merge_state_dicts([sd, sd, sd], sd, method, preset=preset, parameters={"conv": "svd"})
        for k in sd:
            assert torch.equal(out[k], sd[k]), k
    # one parameter changed, the others not: the unchanged ones are the base, no NaN
    ft = dict(sd, w=sd["w"] + 0.1)
    out = merge_state_dicts([ft, sd], sd, method)
    assert all(torch.equal(out[k], sd[k]) for k in sd if k != "w")
    assert torch.isfinite(out["w"]).all() and not torch.equal(out["w"], sd["w"])


@pytest.mark.parametrize("method", METHODS)
def test_vectors_and_conv_kernels_are_averaged_and_text_projection_in_the_paper_preset(method):
    g = torch.Generator().manual_seed(13)
    base = {
        k: torch.randn(s, generator=g)
        for k, s in {"b": (6,), "k": (4, 3, 2, 2), "text_projection": (5, 4)}.items()
    }
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    out = merge_state_dicts(fts, base, method, parameters={"alpha": 0.8})
    for k in base:
        expected = base[k] + 0.8 * sum(f[k] - base[k] for f in fts) / 3
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6)
    out = merge_state_dicts(fts, base, method, parameters={"matrices": "svd"})
    direct = get_method(method)([f["text_projection"] for f in fts], base["text_projection"])
    assert torch.equal(out["text_projection"], direct)


@pytest.mark.parametrize("method", METHODS)
def test_conv_kernel_merged_as_out_by_rest_matrix_round_trips_its_shape(method):
    g = torch.Generator().manual_seed(14)
    base = torch.randn(6, 3, 2, 2, generator=g)
    fts = [base + 0.1 * torch.randn(base.shape, generator=g) for _ in range(2)]
    m = get_method(method)
    out = m(fts, base, conv="svd", alpha=0.5)
    assert out.shape == base.shape
    flat = m([f.reshape(6, 12) for f in fts], base.reshape(6, 12), alpha=0.5)
    assert torch.equal(out, flat.reshape(base.shape))
    assert not torch.allclose(out, m(fts, base, alpha=0.5))  # the default averages instead


@pytest.mark.parametrize("method", METHODS)
def test_bf16_inputs_are_decomposed_in_float32_and_returned_in_bf16(method):
    base, fts = task_matrices((12, 8), 3, seed=15)
    b16, f16 = base.bfloat16(), [f.bfloat16() for f in fts]
    out = get_method(method)(f16, b16)
    assert out.dtype == torch.bfloat16
    expected = get_method(method)([f.float() for f in f16], b16.float()).bfloat16()
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------- randomized SVD


@pytest.mark.parametrize("method,params", [("tsv_m", {}), ("iso_cts", {"common_fraction": 0.5})])
def test_lowrank_svd_is_close_to_exact_deterministic_and_only_used_for_small_ranks(method, params):
    base, fts = task_matrices((60, 48), 4, seed=16, decay=0.85)
    m = get_method(method)
    exact = m(fts, base, svd="exact", **params)
    ctx = TensorContext(name="layers.0.w", seed=3)
    kw = dict(params, svd="lowrank", lowrank_niter=4, lowrank_oversample=10)
    low = m(fts, base, ctx, **kw)
    assert float((low - exact).norm() / (exact - base).norm()) < 1e-4
    assert not torch.equal(low, exact)  # it really took the randomized route (k + 10 <= r/2 = 24)
    assert torch.equal(low, m(fts, base, ctx, **kw))
    # no power iteration and little oversampling: a coarse approximation
    rough = m(fts, base, ctx, **dict(kw, lowrank_niter=0, lowrank_oversample=4))
    assert float((rough - exact).norm() / (exact - base).norm()) > 1e-2
    # the default oversampling (100) makes the sketch wider than r/2: the exact SVD is used
    assert torch.equal(m(fts, base, ctx, svd="lowrank", **params), exact)


# ----------------------------------------------------------------------------- errors and the engine


@pytest.mark.parametrize(
    "method,params,match",
    [
        ("iso_cts", {"common_fraction": 1.5}, r"'common_fraction' = 1.5 .*<= 1.0"),
        ("tsv_m", {"svd": "fast"}, r"'svd' = 'fast' .*'exact', 'lowrank'"),
        ("iso_c", {"rank_tol": 1.0}, r"'rank_tol' = 1.0 .*< 1.0"),
        ("tsv_m", {"min_rank": -1}, r"'min_rank' = -1 .*>= 0"),
        ("iso_c", {"conv": "matrix"}, r"'conv' = 'matrix' .*'mean', 'svd'"),
        ("iso_c", {"lambda": 1.0}, r"unknown parameter 'lambda'"),
    ],
)
def test_bad_parameters_are_named_with_their_value_and_range(method, params, match):
    base, fts = task_matrices((4, 3), 2)
    with pytest.raises(ParameterError, match=match):
        get_method(method)(fts, base, **params)


@pytest.mark.parametrize(
    "method,params",
    [("tsv_m", {"alpha": 0.7}), ("iso_c", {}), ("iso_cts", {"svd": "lowrank", "lowrank_oversample": 1})],
)
def test_merge_of_safetensors_folders_equals_the_direct_call(toy, method, params):
    out = toy["tmp"] / "merged"
    merge(toy["paths"], toy["base_path"], method, out, parameters=params, workers=2)
    r = open_checkpoint(out)
    m = get_method(method)
    for k, b in toy["base"].items():
        direct = m([f[k] for f in toy["fts"]], b, TensorContext(name=k), **params)
        assert torch.equal(r.read(k), direct), k
        if b.dim() == 2:  # the matrices really were decomposed, not averaged
            assert not torch.allclose(
                direct, get_method("task_arithmetic")([f[k] for f in toy["fts"]], b, **{"lambda": 1 / 3})
            )


def test_an_svd_that_fails_to_converge_in_float32_is_retried_in_float64(monkeypatch):
    base, fts = task_matrices((12, 8), 3, seed=17)
    expected = get_method("iso_cts")([f.double() for f in fts], base.double(), svd="exact")
    real_svd = torch.linalg.svd
    failed = []

    def flaky_svd(a, *args, **kwargs):
        if a.dtype == torch.float32:
            failed.append(tuple(a.shape))
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    out = get_method("iso_cts")(fts, base, svd="exact")
    assert failed and out.dtype == torch.float32
    close(out, expected, tol=1e-6)


# ----------------------------------------------------------------------------- the Gram route


def _spectrum_matrices(shape, n_tasks, cond, seed):
    """Task vectors whose singular values fall geometrically from 0.05 to 0.05/cond."""
    spectrum = lambda r: 0.05 * torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)  # noqa: E731
    return task_matrices(shape, n_tasks, seed=seed, spectrum=spectrum)


@pytest.mark.parametrize("method", ["iso_c", "tsv_m", "iso_cts"])
@pytest.mark.parametrize("shape", [(160, 48), (48, 160), (64, 64)])
@pytest.mark.parametrize("cond", [10.0, 1e3, 5e3])
def test_the_gram_route_is_at_least_as_accurate_as_the_float32_svd(method, shape, cond):
    """Against the float64 SVD of the same float32 inputs: svd=auto (float64 Gram eigh) errs no
    more than the reference's float32 SVD (svd=exact), up to a float32 rounding floor."""
    base, fts = _spectrum_matrices(shape, 3, cond, seed=int(cond) + shape[0])
    m = get_method(method)
    truth = m([f.double() for f in fts], base.double(), svd="exact")
    scale = float((truth - base.double()).abs().max())
    err_exact = float((m(fts, base, svd="exact").double() - truth).abs().max()) / scale
    err_auto = float((m(fts, base, svd="auto").double() - truth).abs().max()) / scale
    assert err_auto <= max(1.5 * err_exact, 2e-6), (err_auto, err_exact)


def test_the_gram_route_falls_back_to_the_svd_past_its_bound():
    from alloykit.methods._svd import GRAM_MAX_COND, TopSVD, gram_polar, gram_svd

    base, fts = _spectrum_matrices((80, 40), 2, 1e6, seed=3)
    delta = fts[0] - base
    assert gram_svd(delta) is None and gram_polar(delta) is None
    assert gram_svd(delta, 10) is not None  # the top 10 alone are well conditioned
    top = TopSVD("auto")
    u, s, vh = top(delta, 40)
    assert top.fallbacks == 1
    torch.testing.assert_close(u @ torch.diag(s) @ vh, delta, rtol=0, atol=1e-6)
    _, fine = _spectrum_matrices((80, 40), 2, GRAM_MAX_COND / 2, seed=3)
    a = fine[0] - base
    u, s, vh = gram_svd(a)
    # the singular values of the very float32 matrix, to float32 rounding even at σ₁/σ_r = 5000
    s64 = torch.linalg.svdvals(a.double())
    assert float(((s.double() - s64) / s64).abs().max()) < 1e-6
    torch.testing.assert_close(u.mT @ u, torch.eye(40), rtol=0, atol=1e-5)
    torch.testing.assert_close((u * s) @ vh, a, rtol=0, atol=1e-6)
    # an exactly rank-deficient matrix (a LoRA update) takes the SVD
    low = torch.randn(80, 4) @ torch.randn(4, 40)
    assert gram_polar(low) is None


@pytest.mark.parametrize(
    "method,preset",
    [
        ("tsv_m", None),
        ("iso_c", None),
        ("iso_cts", None),
        ("model_stock", None),
        ("model_stock", "mergekit"),
        ("neuromerging", None),
        ("neuromerging", "code"),
        ("della", None),
        ("della_linear", "mergekit"),
        ("ties", None),  # whole-model trim (2 histogram passes) and the fused model-majority sign
        ("ties", "mergekit"),
        ("ties", "mergekit-trim"),  # per-tensor exact top-k (argsort)
        ("ties", "tensor-kthvalue"),
    ],
)
@pytest.mark.parametrize("out_dtype", [None, "float32"])
def test_bf16_inputs_handed_as_stored_give_the_bytes_of_widened_inputs(
    method, preset, out_dtype, tmp_path, monkeypatch
):
    """The methods that widen their inputs themselves (SVD methods, Model Stock, NeuroMerging,
    DELLA, TIES): with a float32 compute dtype the engine hands them bfloat16 tensors as stored
    (half the memory). The bytes equal those of inputs widened by the engine first, also when
    the result is written in float32 (not rounded to bfloat16 on the way)."""
    import dataclasses

    from safetensors.torch import save_file

    import alloykit.methods as methods

    g = torch.Generator().manual_seed(11)
    base = {
        "w": torch.randn(48, 20, generator=g),
        "emb": torch.randn(70, 12, generator=g),
        "b": torch.randn(20, generator=g),
    }
    paths = []
    for i in range(3):
        state = base if i == 0 else {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        path = tmp_path / f"m{i}.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))
        paths.append(str(path))
    params = {
        "mergekit-trim": ("mergekit", {"density": 0.3, "lambda": 0.7}),
        "tensor-kthvalue": (None, {"topk": "tensor", "density": 0.4, "rescale": "l1"}),
    }
    preset, params = params.get(preset, (preset, {}))
    kw = dict(preset=preset, parameters=params, out_dtype=out_dtype)
    narrow = merge(paths[1:], paths[0], method, **kw).state_dict
    m = methods.get_method(method)
    assert m.widens_inputs
    monkeypatch.setitem(methods.REGISTRY, method, dataclasses.replace(m, widens_inputs=False))
    widened = merge(paths[1:], paths[0], method, **kw).state_dict
    for k in widened:
        assert narrow[k].dtype == widened[k].dtype == (torch.float32 if out_dtype else torch.bfloat16)
        assert torch.equal(narrow[k], widened[k]), k


def test_task_vectors_are_formed_when_asked_and_merge_as_a_list_does():
    """``merge_tensor`` hands the matrix merges lazily formed task vectors (one embedding-sized
    τ_t in memory at a time): each item is a fresh θ_t − θ_0 in float32 of the (rows, rest)
    shape, and TSV-M, Iso-C and Iso-CTS give the bytes they give for a list of the same."""
    from alloykit.methods._svd import TaskVectors, iso_c_matrix, iso_cts_matrix, tsv_m_matrix

    g = torch.Generator().manual_seed(4)
    base = torch.randn(30, 4, 5, generator=g).bfloat16()
    fts = [(base.float() + 0.1 * torch.randn(30, 4, 5, generator=g)).bfloat16() for _ in range(3)]
    lazy = TaskVectors(fts, base, torch.float32)
    listed = [(x.float() - base.float()).reshape(30, 20) for x in fts]
    assert len(lazy) == 3 and lazy.shape == (30, 20)
    first = lazy[0]
    first.zero_()  # the caller's own: the next one is formed anew
    assert all(torch.equal(a, b) for a, b in zip(lazy[0:3], listed, strict=True))
    assert torch.equal(lazy[-1], listed[-1])
    for fn in (tsv_m_matrix, iso_c_matrix, iso_cts_matrix):
        assert torch.equal(fn(lazy), fn(listed)), fn.__name__
        assert torch.equal(fn(lazy), fn(TaskVectors(fts, base, torch.float32))), fn.__name__


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_a_narrow_base_is_subtracted_and_added_in_blocks_of_entries(method, monkeypatch):
    """A float32 tensor minus a bfloat16 one makes torch widen the whole bfloat16 tensor first
    (an embedding-sized temporary); the base is subtracted and added back in blocks instead.
    Blocks of 7 entries give the bytes of one whole operation."""
    import alloykit.methods.primitives as primitives
    from alloykit.methods.primitives import add_base_, task_vector

    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 30, generator=g).bfloat16()
    base = torch.randn(40, 30, generator=g).bfloat16()
    whole = x.float() - base.float()
    models = [{"w": base, "b": base[0]}] + [
        {"w": (base.float() + 0.1 * torch.randn(40, 30, generator=g)).bfloat16(), "b": x[i]} for i in range(2)
    ]
    ref = merge_state_dicts(models[1:], models[0], method, out_dtype="float32")
    monkeypatch.setattr(primitives, "COMBINE_BLOCK", 7)
    assert torch.equal(task_vector(x, base, torch.float32), whole)
    assert torch.equal(add_base_(whole.clone(), base), whole + base.float())
    got = merge_state_dicts(models[1:], models[0], method, out_dtype="float32")
    assert all(torch.equal(got[k], v) for k, v in ref.items())


def test_iso_cts_residual_adds_its_task_vector_in_blocks_of_entries(monkeypatch):
    """Iso-CTS's residual τ_t − U_c U_cᵀ τ_t is formed as (−U_c U_cᵀ τ_t) + τ_t, with τ_t added a
    block of entries at a time (no embedding-sized τ_t beside the projection): the bytes of the
    plain formula, for any block size, and a caller's list of task vectors is left as it was."""
    import alloykit.methods._svd as svd

    g = torch.Generator().manual_seed(8)
    base = torch.randn(63, 5, 4, generator=g).bfloat16()
    fts = [(base.float() + 0.1 * torch.randn(63, 5, 4, generator=g)).bfloat16() for _ in range(3)]
    lazy = svd.TaskVectors(fts, base, torch.float32)
    listed = [(x.float() - base.float()).reshape(63, 20) for x in fts]
    kept = [x.clone() for x in listed]
    basis = torch.linalg.qr(torch.randn(63, 9, generator=g))[0]
    projection = basis @ (basis.mT @ listed[1])
    ref = svd.iso_cts_matrix(listed, common_fraction=0.5)
    for block in (7, 20, 5000):
        monkeypatch.setattr(svd, "COMBINE_BLOCK", block)
        got = svd.add_task_vector_(projection.neg(), lazy, 1)
        assert torch.equal(got, listed[1] - projection), block
        assert torch.equal(svd.iso_cts_matrix(lazy, common_fraction=0.5), ref), block
    assert torch.equal(svd.iso_cts_matrix(listed, common_fraction=0.5), ref)
    assert all(torch.equal(a, b) for a, b in zip(listed, kept, strict=True))


@pytest.mark.parametrize("shape", [(90, 12), (12, 90)])
def test_gram_polar_written_over_its_input_gives_the_same_bytes(shape):
    """The Gram route's polar factor may be written over its input (TSV-M's and Iso-CTS's
    stacked bases, Iso-C's own sum: one matrix-sized buffer less). The bytes are those of a
    fresh result, the factor lives in the input's storage, and an input that is not the merge's
    own (Iso-C given a caller's single matrix) is left as it was."""
    from alloykit.methods._svd import TopSVD, _times64, gram_polar, iso_c_matrix

    g = torch.Generator().manual_seed(9)
    a = torch.randn(*shape, generator=g)
    fresh = gram_polar(a)
    work = a.clone()
    over = gram_polar(work, overwrite=True)
    assert torch.equal(over, fresh) and torch.equal(work, fresh)
    assert over.data_ptr() == work.data_ptr()
    kept = a.clone()
    iso = iso_c_matrix([a], top_svd=TopSVD("auto"))
    assert torch.equal(a, kept)
    assert torch.equal(iso_c_matrix([a.clone()], top_svd=TopSVD("auto"), owned=True), iso)
    mean_sigma = torch.linalg.svdvals(a.double()).mean().float()
    assert torch.allclose(iso, fresh * mean_sigma, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="only when right is square"):
        _times64(a, torch.zeros(shape[1], 3, dtype=torch.float64), overwrite=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5000, 96), (96, 300), (33, 33)])
def test_a_product_written_over_its_left_factor_has_the_bytes_of_a_fresh_product(dtype, shape):
    """``times_over`` (the last product of TSV-M and Iso-CTS) works a block of rows at a time in
    the left factor itself: the same bytes as ``a @ right`` for a square right factor; a
    rectangular one gets a fresh product and leaves ``a`` alone."""
    from alloykit.methods._svd import times_over

    g = torch.Generator().manual_seed(3)
    a = torch.randn(*shape, generator=g, dtype=dtype)
    square = torch.randn(shape[1], shape[1], generator=g, dtype=dtype)
    wide = torch.randn(shape[1], shape[1] + 7, generator=g, dtype=dtype)
    expected = a @ square
    kept = a.clone()
    fresh = times_over(a, wide)
    assert torch.equal(a, kept) and torch.equal(fresh, kept @ wide)
    got = times_over(a, square)
    assert got.data_ptr() == a.data_ptr()  # written over a
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300), (64, 64)])
def test_singular_values_from_the_gram_matrix_match_svdvals(shape):
    """Top-k singular values through eigvalsh of the float64 Gram (no vectors), against
    torch.linalg.svdvals in float64: within the Gram route's bound where σ₁/σ_k ≤ 10⁴; past it
    (an ill-conditioned matrix) and for a zero matrix, svdvals itself."""
    from alloykit.methods._svd import singular_values

    g = torch.Generator().manual_seed(5)
    a = torch.randn(*shape, generator=g, dtype=torch.float64)
    truth = torch.linalg.svdvals(a)
    for k in (None, 1, 10):
        got = singular_values(a, k)
        want = truth if k is None else truth[:k]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    # σ down to 1e-7 σ₁: the Gram would lose the small ones; the fallback keeps them
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    s = torch.logspace(0, -7, min(shape), dtype=torch.float64)
    ill = (u * s) @ vh
    torch.testing.assert_close(singular_values(ill), s, rtol=1e-6, atol=1e-20)
    assert torch.equal(
        singular_values(torch.zeros(*shape, dtype=torch.float64)),
        torch.zeros(min(shape), dtype=torch.float64),
    )
    f32 = singular_values(a.float(), 5)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), truth[:5], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- numpy's LAPACK on CPU


def test_eigh64_on_cpu_matches_torch_and_reads_the_lower_triangle():
    """The Gram route's eigendecomposition goes through numpy on the CPU: the same eigenvalues
    as torch.linalg.eigh, eigenvectors equal up to sign, computed from the lower triangle only
    (what is above the diagonal is ignored, as torch ignores it)."""
    from alloykit.methods._svd import eigh64

    g = torch.Generator().manual_seed(11)
    a = torch.randn(50, 30, generator=g, dtype=torch.float64)
    sym = a.T @ a
    lam_t, w_t = torch.linalg.eigh(sym)
    garbage = sym.tril() + torch.randn(30, 30, generator=g, dtype=torch.float64).triu(1)
    lam, w = eigh64(garbage)
    assert lam.dtype == torch.float64 and w.shape == (30, 30)
    torch.testing.assert_close(lam, lam_t, rtol=1e-12, atol=1e-12)
    signs = torch.sign((w * w_t).sum(0))
    torch.testing.assert_close(w * signs, w_t, rtol=0, atol=1e-10)
    # float32 (or another device) keeps torch's own routine
    lam32, _ = eigh64(sym.float())
    assert lam32.dtype == torch.float32


@pytest.mark.parametrize("shape", [(20000, 24), (24, 20000), (300, 300)])
def test_gram64_on_cpu_is_exactly_symmetric_and_matches_the_float64_product(shape):
    """AᵀA of the tall side (row blocks of 8192 summed in numpy): equal to the float64 product to
    rounding, exactly symmetric, for float32 inputs, and for the transposed view a wide matrix
    is decomposed through."""
    from alloykit.methods._svd import _gram64

    g = torch.Generator().manual_seed(12)
    a = torch.randn(*shape, generator=g)
    tall = a if shape[0] >= shape[1] else a.mT  # (a non-contiguous view for the wide one)
    got = _gram64(tall)
    want = tall.double().T @ tall.double()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    assert torch.equal(got, got.T)
