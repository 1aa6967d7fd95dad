"""ESM against the spec (§1.3–1.8): the Gram route, each scaling level by hand, sign invariance,
the whole method against a slow literal implementation of the reference code, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from alloykit import merge_state_dicts
from alloykit.calibration import collect_activation_statistics
from alloykit.methods import get_method
from alloykit.methods.base import TensorContext
from alloykit.methods.esm import esm_matrix, essential_basis, essential_factors, layer_type, reference_norm

DT = torch.float64
LEVELS = dict(
    eigen_power=0.15,
    task_power=2.0,
    column_power=2.0,
    min_rank=0,
    rank="reference",
    basis_norm="reference",
    tol=1e-12,
)


def test_the_gram_route_equals_the_svd_of_the_output_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g, dtype=DT)
    delta = torch.randn(20, 12, generator=g, dtype=DT)
    basis, lam, rank = essential_basis(delta, {"gram": x.T @ x, "tokens": 40}, 1e-12)
    _, s, vh = torch.linalg.svd(x @ delta.T, full_matrices=False)
    assert rank == 12  # ΔO = X ΔWᵀ has rank d_in here
    torch.testing.assert_close(lam[:12], s[:12] ** 2, rtol=1e-10, atol=1e-10)
    assert torch.all(lam[12:] == 0)  # below the numerical rank: exactly zero, as the reference pads
    for r in (3, 7, 12):  # top-r projectors agree (eigenvectors only up to sign)
        p_ours = basis[:, :r] @ basis[:, :r].T
        p_svd = vh[:r].T @ vh[:r]
        torch.testing.assert_close(p_ours, p_svd, rtol=1e-9, atol=1e-9)
    # raw inputs give the same as their Gram
    b2, l2, _ = essential_basis(delta, {"inputs": x, "tokens": 40}, 1e-12)
    torch.testing.assert_close(l2, lam)


def test_reference_norm_over_the_padded_basis():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(10, 6, generator=g, dtype=DT)
    x = torch.randn(4, 6, generator=g, dtype=DT)  # N = 4 < d_out = 10
    basis, _, _ = essential_basis(delta, {"inputs": x, "tokens": 4}, 1e-12)
    # the reference: the SVD's N directions, then identity columns e_N … e_9
    _, _, vh = torch.linalg.svd(x @ delta.T, full_matrices=False)
    padded = torch.eye(10, dtype=DT)
    padded[:, :4] = vh.T
    expected = torch.linalg.matrix_norm(padded.T @ delta)
    torch.testing.assert_close(reference_norm(delta, basis, 4), expected)
    assert float(reference_norm(delta, basis, 10)) == pytest.approx(float(torch.linalg.matrix_norm(delta)))


def _identity_gram(d: int) -> dict:
    return {"gram": torch.eye(d, dtype=DT), "tokens": 100}


def test_each_scaling_level_on_a_two_task_example_by_hand():
    # G = I, so ΔW Wᵀ gives the directions: task 1 along e1 (λ 9, 1), task 2 along e2 (λ 4).
    d1 = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=DT)
    d2 = torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=DT)
    entries = [_identity_gram(2), _identity_gram(2)]
    e, c = essential_factors([d1, d2], entries, **LEVELS)  # r = int(2 · 1/2) = 1
    n1, n2 = math.sqrt(10), 2.0
    mean = (n1 + n2) / 2
    a, b = (n1 / mean) ** 2, (n2 / mean) ** 2  # (b) inter-task
    # one direction per task: (a) renormalises g to 1; columns of C before (c): [3a, 0], [0, 2b]
    rows = torch.tensor([[3 * a, 0.0], [0.0, 2 * b]], dtype=DT)
    cols = rows.abs().sum(0)
    expected_c = rows * ((cols / cols.mean()) ** 2)[None, :]  # (c) inter-column
    torch.testing.assert_close(e.dense().abs(), torch.eye(2, dtype=DT))
    torch.testing.assert_close(c.dense().abs(), expected_c)
    # polar of the identity and of a positive diagonal are I; σ̄(C) is the mean of the diagonal
    merged = esm_matrix([d1, d2], entries, factor=2.0, **LEVELS)
    torch.testing.assert_close(merged, 2.0 * float(expected_c.diagonal().mean()) * torch.eye(2, dtype=DT))
    # without (b) and (c) (RoBERTa code): C = diag(3, 2), ΔW = factor · 2.5 · I
    plain = esm_matrix([d1, d2], entries, factor=1.0, **{**LEVELS, "task_power": 0.0, "column_power": 0.0})
    torch.testing.assert_close(plain, 2.5 * torch.eye(2, dtype=DT))


def test_eigenvalue_level_by_hand():
    # one task, d_out = 2, T = 1: r = 2 directions with λ = 9, 1; γ = 0.5:
    # g = (λ/5)^0.5 / mean = [1.5, 0.5]
    d = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=DT)
    e, c = essential_factors([d], [_identity_gram(2)], **{**LEVELS, "eigen_power": 0.5, "column_power": 0.0})
    torch.testing.assert_close(e.dense().abs(), torch.diag(torch.tensor([1.5, 0.5], dtype=DT)))
    torch.testing.assert_close(c.dense().abs(), torch.diag(torch.tensor([4.5, 0.5], dtype=DT)))


def test_esm_is_invariant_to_eigenvector_signs(monkeypatch):
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(12, 8, generator=g, dtype=DT) for _ in range(3)]
    entries = [{"inputs": torch.randn(30, 8, generator=g, dtype=DT), "tokens": 30} for _ in range(3)]
    expected = esm_matrix(deltas, entries, factor=2.0, **LEVELS)
    import alloykit.methods._svd as svd_module
    import alloykit.methods.esm as esm_module

    real = svd_module.eigh64
    calls = []

    def flipped(m):
        calls.append(m.shape)
        lam, vec = real(m)
        signs = torch.where(torch.rand(vec.shape[1], generator=g) < 0.5, -1.0, 1.0).to(vec.dtype)
        return lam, vec * signs

    monkeypatch.setattr(esm_module, "eigh64", flipped)
    monkeypatch.setattr(svd_module, "eigh64", flipped)
    torch.testing.assert_close(esm_matrix(deltas, entries, factor=2.0, **LEVELS), expected)
    assert calls  # the decompositions went through the flipped routine


def test_layer_type_removes_layer_indices():
    name = "encoder.layer.11.attention.self.query.weight"
    assert layer_type(name) == "encoder.layer.*.attention.self.query.weight"
    assert layer_type("blocks.0.mlp.0.weight") == "blocks.*.mlp.*.weight"
    assert layer_type("0.weight") == "*.weight" and layer_type("head.weight") == "head.weight"


# ----------------------------------------------------------------------------- whole method


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class Net(nn.Module):
    # d_in ≥ d: every layer's inputs span their space, so r = int(d_out/T) stays within the rank
    # of the output shift and the reference code's directions are all determined
    def __init__(self, d_in: int = 12, d: int = 10, n_out: int = 4):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(3))
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _family(n_tasks: int, seed: int = 0):
    torch.manual_seed(seed)
    base = Net().double()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    fts = []
    for _ in range(n_tasks):
        m = Net().double()
        m.load_state_dict(base_sd)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        fts.append(m)
    data = [[torch.randn(n, 12, dtype=torch.float64) for n in (7, 5, 9)] for _ in range(n_tasks)]  # N = 21
    return base_sd, fts, data


def _raw_inputs(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Every Linear's input rows, captured by hand (independently of alloykit's collector)."""
    rows: dict[str, list[torch.Tensor]] = {}

    def keep(name: str):
        return lambda m, a, o: rows.setdefault(name + ".weight", []).append(a[0].detach())

    hooks = [
        mod.register_forward_hook(keep(n)) for n, mod in model.named_modules() if isinstance(mod, nn.Linear)
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


def _literal_esm(base, fts, inputs, esd_keys, alpha, preset):
    """A slow, literal port of the reference code (ESM-ViT esm_merge / ESM-RoBERTa esm) in float64,
    following spec §1.4, with the output shift ΔO formed explicitly and decomposed by SVD."""
    vit = preset == "vit"
    n_tasks = len(fts)
    red = 1.0 / n_tasks
    new, branch = {}, {}
    for key, b in base.items():
        taus = [ft[key] - b for ft in fts]
        if b.dim() == 2 and key in esd_keys:
            sum_u, sum_v, norms = [], [], []
            for t, tau in enumerate(taus):
                x = inputs[t][key]
                n, d_out = x.shape[0], tau.shape[0]
                d_o = x @ tau.T
                _, s, vh = torch.linalg.svd(d_o, full_matrices=False)
                lam = s**2 / (n - 1)
                vec = vh.T
                if vec.shape[1] < d_out:  # the reference's identity padding
                    full = torch.eye(d_out, dtype=vec.dtype)
                    full[:, : vec.shape[1]] = vec
                    lam = torch.cat([lam, torch.zeros(d_out - len(lam), dtype=lam.dtype)])
                    vec = full
                order = torch.argsort(lam, descending=True, stable=True)
                vec, lam = vec[:, order], lam[order]
                r = int(d_out * red) if vit else max(1, int(d_out * red))
                v = vec.T @ tau
                nv = torch.norm(v)
                norms.append(nv)
                if vit:
                    v = v * nv**2
                ev = lam[:r]
                scale = torch.pow(ev / ev.mean(), 0.15)
                scale = scale / scale.mean()
                sum_u.append(vec[:, :r] * scale[None, :])
                sum_v.append(v[:r] * scale[:, None])
            u = torch.cat(sum_u, 1)
            v = torch.cat(sum_v, 0)
            if vit:
                v = v / torch.stack(norms).mean() ** 2
                cols = torch.norm(v, dim=0)
                v = v * (cols / cols.mean())[None, :] ** 2
            uu, su, vu = torch.linalg.svd(u, full_matrices=False)
            uv, sv, vv = torch.linalg.svd(v, full_matrices=False)
            new[key] = (uu @ vu * su.mean()) @ (uv @ vv * sv.mean()) * (2 if vit else 1)
            branch[key] = "esd"
        elif b.dim() == 2:
            us, ss, vs = [], [], []
            for tau in taus:
                uu, s, vh = torch.linalg.svd(tau, full_matrices=False)
                k = int(s.shape[0] * red) if vit else max(1, int(s.shape[0] * red))
                us.append(uu[:, :k])
                ss.append(s[:k])
                vs.append(vh[:k])
            uu, _, vu = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
            uv, _, vv = torch.linalg.svd(torch.cat(vs, 0), full_matrices=False)
            new[key] = uu @ vu @ torch.diag(torch.cat(ss)) @ uv @ vv
            branch[key] = "tsv"
        else:
            new[key] = torch.stack(taus).mean(0)
            branch[key] = "mean"
    # inter-layer scaling over the 2-D updates of each type
    types: dict[str, list[str]] = {}
    for key in new:
        if branch[key] != "mean":
            types.setdefault(layer_type(key), []).append(key)
    for keys in types.values():
        mean = torch.stack([torch.norm(new[k]) for k in keys]).mean()
        for k in keys:
            new[k] = new[k] * (torch.norm(new[k]) / mean) ** 2
    out = {}
    for key, b in base.items():
        coef = alpha if (not vit or branch[key] == "esd") else 1.0
        out[key] = b + coef * new[key]
    return out


@pytest.mark.parametrize("preset", ["vit", "roberta"])
@pytest.mark.parametrize("n_tasks", [2, 3])
def test_esm_equals_a_literal_port_of_the_reference_code(preset, n_tasks):
    base, fts, data = _family(n_tasks)
    fts_sd = [m.state_dict() for m in fts]
    inputs = [_raw_inputs(m, d) for m, d in zip(fts, data, strict=True)]
    # the head keeps the TSV-M branch: no statistics for it
    stats = [collect_activation_statistics(m, d, exclude=["^head$"]) for m, d in zip(fts, data, strict=True)]
    esd = set(stats[0].names())
    assert "head.weight" not in esd and "blocks.1.fc2.weight" in esd
    for alpha in (1.0, 0.7):
        ours = merge_state_dicts(
            fts_sd, base, "esm", preset=preset, parameters={"alpha": alpha}, statistics=stats, dtype="float64"
        )
        ref = _literal_esm(base, fts_sd, inputs, esd, alpha, preset)
        for k in base:
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-9, atol=1e-10, msg=k)


def test_raw_inputs_and_float64_grams_give_the_same_merge():
    base, fts, data = _family(2, seed=4)
    fts_sd = [m.state_dict() for m in fts]
    raw = [_raw_inputs(m, d) for m, d in zip(fts, data, strict=True)]
    as_rows = merge_state_dicts(fts_sd, base, "esm", statistics=raw)
    grams = [collect_activation_statistics(m, d, store="gram") for m, d in zip(fts, data, strict=True)]
    assert grams[0].get("inp.weight")["gram"].dtype == torch.float64
    as_grams = merge_state_dicts(fts_sd, base, "esm", statistics=grams)
    for k in base:
        torch.testing.assert_close(as_rows[k], as_grams[k], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- edge cases


def test_a_layer_no_fine_tune_changed_merges_to_the_base_without_nan():
    base, fts, data = _family(2, seed=5)
    with torch.no_grad():
        for m in fts:
            m.blocks[1].fc1.weight.copy_(base["blocks.1.fc1.weight"])
        fts[0].blocks[2].fc1.weight.copy_(base["blocks.2.fc1.weight"])  # frozen in one task only
    fts_sd = [m.state_dict() for m in fts]
    stats = [collect_activation_statistics(m, d) for m, d in zip(fts, data, strict=True)]
    out = merge_state_dicts(fts_sd, base, "esm", statistics=stats, base_check=None)
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    assert torch.equal(out["blocks.1.fc1.weight"], base["blocks.1.fc1.weight"])
    assert not torch.equal(out["blocks.2.fc1.weight"], base["blocks.2.fc1.weight"])


def test_zero_task_vectors_give_the_base_back():
    base, fts, data = _family(2, seed=6)
    stats = [collect_activation_statistics(m, d) for m, d in zip(fts, data, strict=True)]
    copies = [{k: v.clone() for k, v in base.items()} for _ in range(2)]
    # statistics were computed on the fine-tunes: disable the signature check by dropping it
    for s in stats:
        for e in s.entries.values():
            e.pop("signature")
    out = merge_state_dicts(copies, base, "esm", statistics=stats)
    for k in base:
        assert torch.equal(out[k], base[k])


def test_rank_above_the_data_warns_and_can_be_capped():
    base, fts, _ = _family(3, seed=7)
    few = [[torch.randn(2, 12, dtype=torch.float64)] for _ in range(3)]  # N = 2 tokens < r
    stats = [collect_activation_statistics(m, d) for m, d in zip(fts, few, strict=True)]
    from alloykit import merge

    res = merge([m.state_dict() for m in fts], base, "esm", statistics=stats)
    assert any("exceeds the numerical rank 2" in w for w in res.report.warnings)
    capped = merge(
        [m.state_dict() for m in fts], base, "esm", statistics=stats, parameters={"rank": "numerical"}
    )
    assert all(bool(torch.isfinite(v).all()) for v in capped.state_dict.values())


def test_fewer_tokens_than_outputs_works():
    base, fts, _ = _family(2, seed=8)
    few = [[torch.randn(1, 12, dtype=torch.float64) for _ in range(6)] for _ in range(2)]  # N = 6 < 20
    stats = [collect_activation_statistics(m, d) for m, d in zip(fts, few, strict=True)]
    assert stats[0].get("blocks.0.fc2.weight")["tokens"] == 6
    out = merge_state_dicts([m.state_dict() for m in fts], base, "esm", statistics=stats)
    assert all(bool(torch.isfinite(v).all()) for v in out.values())


def test_direct_call_without_statistics_is_tsv_m_for_matrices():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(8, 5, generator=g)
    tensors = [base + 0.1 * torch.randn(8, 5, generator=g) for _ in range(2)]
    esm = get_method("esm")
    tsv = get_method("tsv_m")
    got = esm(tensors, base, TensorContext("w"), layer_power=0.0)
    torch.testing.assert_close(got, tsv(tensors, base, TensorContext("w")))


def test_the_tsv_branch_of_a_tall_matrix_takes_the_gram_route_unless_exact_is_asked(monkeypatch):
    """A 2-D tensor without statistics (an embedding) is merged by TSV-M; ``svd="auto"`` (default)
    decomposes it through the float64 Gram matrix, as tsv_m does, and agrees with the exact SVDs
    to float64 rounding; ``svd="exact"`` never takes that route."""
    import alloykit.methods._svd as svd_module

    g = torch.Generator().manual_seed(12)
    base = torch.randn(96, 16, generator=g, dtype=DT)
    tensors = [base + 0.1 * torch.randn(96, 16, generator=g, dtype=DT) for _ in range(2)]
    esm = get_method("esm")
    calls = []
    real = svd_module.gram_svd
    monkeypatch.setattr(svd_module, "gram_svd", lambda a, k=None: calls.append(a.shape) or real(a, k))
    exact = esm(tensors, base, TensorContext("w"), layer_power=0.0, svd="exact")
    assert calls == []
    auto = esm(tensors, base, TensorContext("w"), layer_power=0.0)
    assert calls == [(96, 16), (96, 16)]  # one per task
    torch.testing.assert_close(auto, exact, rtol=1e-12, atol=1e-12)
    assert not torch.equal(auto, base)


@pytest.mark.parametrize("preset", ["vit", "roberta"])
def test_the_merge_is_affine_in_alpha_as_declared(preset):
    """The search shortcut (merge at α = 0 and 1, interpolate) is exact."""
    assert get_method("esm").search["alpha"].affine
    base, fts, data = _family(2, seed=11)
    stats = [collect_activation_statistics(m, d) for m, d in zip(fts, data, strict=True)]
    sds = [m.state_dict() for m in fts]

    def at(a):
        return merge_state_dicts(sds, base, "esm", preset=preset, statistics=stats, parameters={"alpha": a})

    zero, one = at(0.0), at(1.0)
    for a in (0.4, 1.7):
        got = at(a)
        for k in base:
            torch.testing.assert_close(got[k], zero[k] + a * (one[k] - zero[k]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"task_power": 1e9, "layer_power": 0.0}, "task_power=1e+09"),
        ({"eigen_power": 1e9, "layer_power": 0.0}, "eigen_power=1e+09"),
        ({"column_power": 1e9, "layer_power": 0.0}, "column_power=1e+09"),
        ({"layer_power": 1e9}, "layer_power=1e+09"),
    ],
)
def test_powers_that_overflow_are_refused_by_name(params, message):
    """Found by the recipe fuzzer: ratios of norms raised to huge powers are inf (or 0, then
    0/0), which reached the SVD as an internal error; now a ParameterError naming the power."""
    from alloykit.errors import ParameterError

    base, fts, data = _family(2, seed=7)
    fts_sd = [m.state_dict() for m in fts]
    stats = [collect_activation_statistics(m, d) for m, d in zip(fts, data, strict=True)]
    with pytest.raises(ParameterError, match=message.replace("+", r"\+")) as err:
        merge_state_dicts(fts_sd, base, "esm", statistics=stats, parameters=params)
    assert "overflow" in str(err.value)
    ok = merge_state_dicts(fts_sd, base, "esm", statistics=stats, parameters={"task_power": 4.0})
    assert all(bool(torch.isfinite(v).all()) for v in ok.values())


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_polar_of_the_live_columns_equals_the_svd_of_the_whole_factor(monkeypatch, dtype, rtol):
    """A tall matrix (d_out > T · d_in, as an MLP up-projection) pads each task's block of E past
    its d_in non-zero directions with zero columns: the merge through the polar factor of E's
    live columns (a Gram eigh) equals the SVD of the whole E, to float rounding. Where C lacks
    full column rank (fewer calibration rows than d_in), both null-space parts are LAPACK's
    choice, so the SVD of E is kept: the same bytes as without the shortcut."""
    import alloykit.methods.esm as esm_module

    g = torch.Generator().manual_seed(3)
    taken = []
    real = esm_module._live_columns_polar

    def spy(e_cat, c_columns):
        got = real(e_cat, c_columns)
        taken.append(got is not None)
        return got

    def both(deltas, entries):
        monkeypatch.setattr(esm_module, "_live_columns_polar", spy)
        fast = esm_matrix(deltas, entries, factor=1.5, **LEVELS)
        monkeypatch.setattr(esm_module, "_live_columns_polar", lambda e, c: None)
        return fast, esm_matrix(deltas, entries, factor=1.5, **LEVELS)

    # full-rank statistics: 40 > d_in rows; d_out = 96 asks r = 48 directions of 32 per task
    deltas = [torch.randn(96, 32, generator=g, dtype=dtype) for _ in range(2)]
    entries = [{"gram": (x.T @ x).to(dtype), "tokens": 40} for x in [torch.randn(40, 32, generator=g)] * 2]
    fast, whole = both(deltas, entries)
    assert taken == [True]
    torch.testing.assert_close(fast, whole, rtol=rtol, atol=rtol * float(whole.abs().max()))
    # 20 stored rows < d_in = 64: C is rank-deficient, no shortcut
    taken.clear()
    deltas = [torch.randn(64, 64, generator=g, dtype=dtype) for _ in range(2)]
    entries = [{"inputs": torch.randn(20, 64, generator=g, dtype=dtype), "tokens": 20} for _ in range(2)]
    fast, whole = both(deltas, entries)
    assert True not in taken
    assert torch.equal(fast, whole)


def test_the_factors_are_kept_without_their_padding():
    """E's blocks are padded to r = int(d_out/T) directions where fewer exist (an LM head: d_out =
    vocabulary, r = d_out/2, at most d_in directions each): only the columns that exist are
    stored, at their positions (signed zeros of directions with λ = 0 included), C's rows for
    them likewise, and the merge through them (never forming the padding) equals the SVD of the
    dense, padded E and C. When the live-column route declines (its Gram too ill conditioned),
    the SVD of the dense E is taken."""
    import alloykit.methods.esm as esm_module

    g = torch.Generator().manual_seed(5)
    # each task vector of rank 20 < d_in = 32: 12 of its 32 directions have λ = 0, so g = 0 and
    # their columns of E are signed zeros; d_out = 96 pads each block to r = 48
    f64 = torch.float64
    deltas = [torch.randn(96, 20, generator=g, dtype=f64) @ torch.randn(20, 32, generator=g, dtype=f64)]
    deltas.append(torch.randn(96, 20, generator=g, dtype=f64) @ torch.randn(20, 32, generator=g, dtype=f64))
    x = torch.randn(40, 32, generator=g, dtype=torch.float64)
    entries = [{"gram": x.T @ x, "tokens": 40}] * 2
    e, c = essential_factors(list(deltas), entries, **LEVELS)
    assert e.shape == (96, 96) and e.stored.shape == (96, 64)  # 2 × 32 directions of 2 × 48
    assert torch.equal(e.index, torch.cat([torch.arange(32), torch.arange(48, 80)]))
    dense = e.dense()
    assert torch.equal(dense[:, e.index], e.stored) and not bool(dense[:, 32:48].any())
    zeros = e.stored == 0
    assert bool(torch.signbit(e.stored[zeros]).any())  # (kept as they came)
    assert c.shape == (96, 32) and c.stored.shape == (64, 32) and torch.equal(c.index, e.index)
    assert not bool(c.dense()[32:48].any())  # C's rows for the padding
    monkeypatch = pytest.MonkeyPatch()
    try:
        # the live-column route never forms the padded matrices
        monkeypatch.setattr(esm_module.Padded, "dense", lambda self: pytest.fail("padding formed"))
        via_live = esm_matrix(list(deltas), entries, factor=1.5, **LEVELS)
        monkeypatch.undo()
        monkeypatch.setattr(esm_module, "gram_polar", lambda a, s_out=None, overwrite=False: None)
        declined = esm_matrix(list(deltas), entries, factor=1.5, **LEVELS)
        monkeypatch.setattr(esm_module, "_live_columns_polar", lambda pair, c: None)
        assert torch.equal(declined, esm_matrix(list(deltas), entries, factor=1.5, **LEVELS))
    finally:
        monkeypatch.undo()
    torch.testing.assert_close(via_live, declined, rtol=1e-10, atol=1e-10 * float(declined.abs().max()))


def _esm_params(**over):
    spec = get_method("esm")
    params = spec.resolve(2, None, {"layer_power": 2.0, **over}, [{}, {}], "w", 0.0)
    return params


@pytest.mark.parametrize(
    "case",
    [
        "tall, full-rank statistics (live columns)",
        "tall, fewer rows than inputs",
        "wide",
        "no statistics, tall (TSV-M)",
        "no statistics, wide, one task unchanged",
        "E wide (min_rank above d_out / T)",
        "no statistics, T·k above min(m, n)",
    ],
)
def test_the_reduction_pass_norm_equals_the_norm_of_the_formed_update(monkeypatch, case):
    """The inter-layer pass takes ‖ΔW‖_F from singular values (ESM: factor·σ̄(E)·σ̄(C)·√min(C's
    shape); TSV-M: ‖s‖₂) instead of forming ΔW; where those identities need shapes that do not
    hold (a wide E, T·k > min(m, n)) it forms ΔW. Same number to float64 rounding either way,
    and the polar factors are not computed where the identity holds."""
    import alloykit.methods.esm as esm_module

    g = torch.Generator().manual_seed(21)
    shape, rows, stats, over = {
        "tall, full-rank statistics (live columns)": ((40, 8), 30, True, {}),
        "tall, fewer rows than inputs": ((40, 8), 5, True, {}),
        "wide": ((6, 14), 30, True, {}),
        "no statistics, tall (TSV-M)": ((40, 8), 0, False, {}),
        "no statistics, wide, one task unchanged": ((6, 14), 0, False, {}),
        "E wide (min_rank above d_out / T)": ((1, 5), 30, True, {"min_rank": 1}),
        "no statistics, T·k above min(m, n)": ((1, 5), 0, False, {"min_rank": 1}),
    }[case]
    base = torch.randn(*shape, generator=g, dtype=DT)
    fts = [base + 0.1 * torch.randn(*shape, generator=g, dtype=DT) for _ in range(2)]
    if "unchanged" in case:
        fts[1] = base.clone()
    entries = tuple(
        {"inputs": torch.randn(rows, shape[1], generator=g, dtype=DT), "tokens": rows} if stats else None
        for _ in fts
    )
    params = _esm_params(**over)
    ctx = TensorContext("w", statistics=entries if stats else ())
    formed, branch = esm_module.esm_update(list(fts), base, ctx, params)
    identity_holds = "above" not in case
    if identity_holds:  # the norm path must not form the update
        for name in ("gram_polar", "_live_columns_polar", "tsv_m_matrix"):
            monkeypatch.setattr(esm_module, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} called"))
    norm, norm_branch = esm_module.esm_update(list(fts), base, ctx, params, norm_only=True)
    assert norm_branch == branch == ("essential" if stats else "tsv")
    assert norm.dim() == 0 and float(norm) > 0
    torch.testing.assert_close(norm, torch.linalg.matrix_norm(formed), rtol=1e-12, atol=0)


def test_the_plan_sizes_esm_jobs_by_their_quadratic_working_memory():
    """ESM holds d_out × T·d_in or d_out × d_out matrices (E's stored columns, the dense E and its
    SVD) for a matrix with statistics, so the plan's bytes for its jobs come from the method's
    shape-aware estimate, not from a factor of the tensor's size: smaller without statistics
    (TSV-M) and at float32 precision, and a budget below one job is refused naming that tensor."""
    from alloykit import merge
    from alloykit.calibration import Statistics
    from alloykit.errors import ParameterError
    from alloykit.methods.esm import _working_bytes

    g = torch.Generator().manual_seed(2)
    base = {"tall": torch.randn(64, 8, generator=g), "taller": torch.randn(256, 8, generator=g),
            "emb": torch.randn(64, 8, generator=g), "b": torch.randn(8, generator=g)}  # fmt: skip
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    x = torch.randn(30, 8, generator=g)
    entry = {"inputs": x, "tokens": 30}
    stats = [Statistics({"tall": entry, "taller": entry}, meta={"kind": "activations"}) for _ in fts]

    def costs(**params):
        res = merge(fts, base, "esm", None, statistics=stats, parameters=params, dry_run=True)
        return {j.name: j.cost for j in res.plan.jobs if j.merge}, res.plan

    c64, plan = costs()
    params = next(j.params for j in plan.jobs if j.name == "tall")
    io = (3 + 1) * 4  # three float32 inputs read, one float32 output, per element
    stat = 3 * 2 * x.numel() * 4  # the plan counts statistics 3 times, for each of the 2 models
    assert c64["tall"] == 64 * 8 * io + _working_bytes(params, (64, 8), 2, True) + stat
    assert c64["emb"] == 64 * 8 * io + _working_bytes(params, (64, 8), 2, False)
    assert c64["tall"] - stat > 2 * c64["emb"]  # the essential subspace needs more than TSV-M
    # E is stored without its padding: with T·d_in < d_out (an LM head, an MLP up-projection)
    # the estimate grows with d_out, not d_out²; the dense E (and its SVD) only where T·d_in ≥ d_out
    assert 3 * (c64["tall"] - stat) < c64["taller"] - stat < 6 * (c64["tall"] - stat)  # 4× d_out
    assert _working_bytes(params, (32000, 2048), 2, True) < 8 * 32000**2  # (the dense E alone)
    assert _working_bytes(params, (512, 400), 2, True) > 8 * 4 * 512**2
    c32, _ = costs(precision="float32")
    assert c32["tall"] < c64["tall"] and c32["b"] < c64["b"]
    with pytest.raises(ParameterError, match="'taller'"):
        merge(fts, base, "esm", None, statistics=stats, max_memory=c64["taller"] - 1, dry_run=True)
