"""NeuroMerging against a slow neuron-by-neuron loop written from the paper's equations, and
its properties."""

from __future__ import annotations

import pytest
import torch

from alloykit import merge, merge_state_dicts
from alloykit.errors import ParameterError
from alloykit.methods.neuromerging import orthogonal_part
from alloykit.methods.primitives import ModelTopK
from tests.conftest import make_base, make_finetunes

GIVEN = {"lambda2_rule": "given"}


def elect_mean(v: torch.Tensor, fallback: float) -> torch.Tensor:
    """TIES elect + disjoint mean over tasks (dim 0) for one vector of entries, loop by loop."""
    out = torch.zeros(v.shape[1])
    for j in range(v.shape[1]):
        total = float(v[:, j].sum())
        s = 1.0 if total > 0 else (-1.0 if total < 0 else fallback)
        kept = [float(x) for x in v[:, j] if (x > 0 if s > 0 else x < 0)]
        out[j] = sum(kept) / max(len(kept), 1)
    return out


def majority(v: torch.Tensor) -> float:
    m = float(v.sum(0).sign().sum().sign())
    return m if m != 0 else -1.0


def reference(base, fts, mask_rate=0.8, lambda1=0.0, lambda2=None, parallel="paper"):
    """The paper's equations, one neuron at a time, with the whole-model trim of MergeLM."""
    names = sorted(base)
    flat = torch.stack([torch.cat([(f[k] - base[k]).reshape(-1) for k in names]) for f in fts])
    d = flat.shape[1]
    removed = []
    if mask_rate > 0:
        kth = flat.abs().kthvalue(int(d * mask_rate), dim=1, keepdim=True).values
        mask = flat.abs() >= kth
        removed = [float((flat[t].abs() * ~mask[t]).sum() / flat[t].abs().sum()) for t in range(len(fts))]
        flat = flat * mask
    lam2 = 1 / (1 - max(removed, default=0.0)) if lambda2 is None else lambda2
    out, pos = {}, 0
    for k in names:
        n = base[k].numel()
        tau = flat[:, pos : pos + n].reshape(len(fts), *base[k].shape)
        pos += n
        if base[k].dim() <= 1:
            v = tau.reshape(len(fts), -1)
            out[k] = base[k] + lam2 * elect_mean(v, majority(v)).reshape(base[k].shape)
            continue
        w0 = base[k].reshape(base[k].shape[0], -1)
        tau = tau.reshape(len(fts), *w0.shape)
        a = torch.stack(
            [
                torch.stack([tau[t, r] @ w0[r] / (w0[r] @ w0[r]) for r in range(w0.shape[0])])
                for t in range(len(fts))
            ]
        )  # (T, m)
        a_bar = elect_mean(a, majority(a))
        update = torch.zeros_like(w0)
        for r in range(w0.shape[0]):
            par = a_bar[r] * w0[r] if parallel == "paper" else a_bar[r] * w0[r] / w0[r].norm()
            R = torch.stack([tau[t, r] - a[t, r] * w0[r] for t in range(len(fts))])  # (T, n)
            _, _, vh = torch.linalg.svd(R.double(), full_matrices=False)
            z = (R.double() @ vh.T).float()  # (T, ρ)
            z_bar = elect_mean(z, majority(z))
            orth = (z_bar.double() @ vh).float()
            update[r] = lambda1 * par + lam2 * orth
        out[k] = base[k] + update.reshape(base[k].shape)
    return out


def close(a, b, tol=2e-5):
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("mask_rate", [0.8, 0.5, 0.0])
def test_matches_a_neuron_by_neuron_loop_of_the_paper(mask_rate):
    base = make_base()
    fts = make_finetunes(base, n=3)
    out = merge_state_dicts(fts, base, "neuromerging", parameters={"mask_rate": mask_rate})
    close(out, reference(base, fts, mask_rate))


def test_lambda1_and_code_parallel_rule():
    base = make_base()
    fts = make_finetunes(base, n=2)
    params = {"mask_rate": 0.6, "lambda1": 0.7, **GIVEN, "lambda2": 1.3}
    close(
        merge_state_dicts(fts, base, "neuromerging", parameters=params), reference(base, fts, 0.6, 0.7, 1.3)
    )
    code = merge_state_dicts(fts, base, "neuromerging", preset="code", parameters=params)
    close(code, reference(base, fts, 0.6, 0.7, 1.3, parallel="unit"))


def test_no_trim_no_conflicts_reconstructs_the_mean_task_vector():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 7, generator=g)
    u = torch.randn(5, 7, generator=g)
    u -= ((u * w0).sum(1, keepdim=True) / (w0 * w0).sum(1, keepdim=True)) * w0  # u ⊥ w0, row by row
    base = {"w": w0, "b": torch.randn(7, generator=g)}
    coeffs = torch.rand(3, 2, generator=g) + 0.1  # c_t, d_t > 0: no sign conflicts anywhere
    fts = [{"w": w0 + 0.01 * (c * w0 + d * u), "b": base["b"] + 0.01 * (c + d)} for c, d in coeffs]
    out = merge_state_dicts(
        fts, base, "neuromerging", parameters={"mask_rate": 0.0, "lambda1": 1.0, **GIVEN, "lambda2": 1.0}
    )
    for k in base:
        mean = sum(f[k] - base[k] for f in fts) / 3
        torch.testing.assert_close(out[k], base[k] + mean, rtol=1e-5, atol=1e-6)


def test_orthogonal_part_is_invariant_to_singular_vector_signs():
    g = torch.Generator().manual_seed(1)
    perp = torch.randn(6, 3, 10, generator=g)
    _, s, vh = torch.linalg.svd(perp, full_matrices=False)
    v = vh.transpose(-1, -2)
    flips = torch.tensor([1.0, -1.0, -1.0])
    a = orthogonal_part(perp, v, s, 1.0)
    b = orthogonal_part(perp, v * flips, s, 1.0)
    torch.testing.assert_close(a, b)
    assert a.abs().sum() > 0


def test_energy_threshold_truncates_the_basis():
    g = torch.Generator().manual_seed(2)
    perp = torch.randn(4, 3, 8, generator=g)
    _, s, vh = torch.linalg.svd(perp, full_matrices=False)
    v = vh.transpose(-1, -2)
    one = orthogonal_part(perp, v, s, energy=1e-6)  # first direction only
    z = perp @ v
    for b in range(4):
        expected_coord = elect_mean(z[b], majority(z[b]))[0]
        torch.testing.assert_close(one[b], expected_coord * v[b, :, 0])


def test_trim_keeps_the_reference_count_per_task():
    # one task, distinct magnitudes: MergeLM keeps |τ| ≥ kthvalue(int(d·rate)), i.e. d − int(d·rate) + 1
    base = {"w": torch.zeros(100)}
    ft = {"w": torch.randperm(100, generator=torch.Generator().manual_seed(0)).float() + 1}
    out = merge_state_dicts(
        [ft], base, "neuromerging", parameters={"mask_rate": 0.75, **GIVEN, "lambda2": 1.0}
    )["w"]
    assert int((out != 0).sum()) == 100 - 75 + 1
    assert torch.equal(out[out != 0], ft["w"][ft["w"] >= 75])


def test_sigma_rule_by_hand():
    base = {"w": torch.zeros(4)}
    ft = {"w": torch.tensor([1.0, -2.0, 3.0, 4.0])}
    out = merge_state_dicts([ft], base, "neuromerging", parameters={"mask_rate": 0.5})["w"]
    # int(4·0.5) = 2 → threshold |−2| → removes |1| of L1 mass 10: σ = 0.1, λ2 = 1/0.9
    torch.testing.assert_close(out, torch.tensor([0.0, -2.0, 3.0, 4.0]) / 0.9)


def test_guards_zero_rows_zero_updates_single_task():
    base = make_base()
    base["layers.0.attn.weight"][2] = 0.0  # a dead neuron
    fts = make_finetunes(base, n=2)
    out = merge_state_dicts(fts, base, "neuromerging", parameters={"mask_rate": 0.5})
    assert all(torch.isfinite(v).all() for v in out.values())
    close(out, reference_guarded(base, fts))
    same = merge_state_dicts([base, base], base, "neuromerging", parameters={"mask_rate": 0.0})
    assert all(torch.equal(same[k], base[k]) for k in base)
    single = merge_state_dicts(
        fts[:1], base, "neuromerging", parameters={"mask_rate": 0.0, "lambda1": 1.0, **GIVEN, "lambda2": 1.0}
    )
    close(single, fts[0], tol=1e-5)


def reference_guarded(base, fts):
    """The loop above, with the dead row's update computed as fully orthogonal (a = 0)."""
    dead = "layers.0.attn.weight"
    alive = {k: v.clone() for k, v in base.items()}
    alive[dead][2] = 1.0  # placeholder so the loop's division is defined …
    ref = reference(
        base | {dead: alive[dead]}, [f | {dead: f[dead] - base[dead] + alive[dead]} for f in fts], 0.5
    )
    # … then recompute that one row directly: no parallel part, orthogonal part = elected coordinates
    names = sorted(base)
    flat = torch.stack([torch.cat([(f[k] - base[k]).reshape(-1) for k in names]) for f in fts])
    kth = flat.abs().kthvalue(int(flat.shape[1] * 0.5), dim=1, keepdim=True).values
    removed = max(
        float((flat[t].abs() * (flat[t].abs() < kth[t])).sum() / flat[t].abs().sum()) for t in range(2)
    )
    R = torch.stack([(f[dead][2] - base[dead][2]) for f in fts])
    R = R * (R.abs() >= kth)
    _, _, vh = torch.linalg.svd(R, full_matrices=False)
    z = R @ vh.T
    ref[dead] = ref[dead].clone()
    ref[dead][2] = (elect_mean(z, majority(z)) @ vh) / (1 - removed)
    return ref


def test_conv_kernels_are_one_neuron_per_output_channel():
    g = torch.Generator().manual_seed(3)
    base = {"conv.weight": torch.randn(4, 3, 2, 2, generator=g)}
    fts = [
        {"conv.weight": base["conv.weight"] + 0.05 * torch.randn(4, 3, 2, 2, generator=g)} for _ in range(2)
    ]
    out = merge_state_dicts(fts, base, "neuromerging", parameters={"mask_rate": 0.3})
    flat = merge_state_dicts(
        [{"w": f["conv.weight"].reshape(4, 12)} for f in fts],
        {"w": base["conv.weight"].reshape(4, 12)},
        "neuromerging",
        parameters={"mask_rate": 0.3},
    )
    assert out["conv.weight"].shape == (4, 3, 2, 2)
    torch.testing.assert_close(out["conv.weight"].reshape(4, 12), flat["w"])


def test_qr_and_exact_svd_routines_agree():
    base = make_base()
    fts = make_finetunes(base, n=3)
    a = merge_state_dicts(fts, base, "neuromerging", parameters={"svd": "qr", "block_rows": 5})
    b = merge_state_dicts(fts, base, "neuromerging", parameters={"svd": "exact"})
    close(a, b, tol=1e-5)


def test_approximate_threshold_error_is_bounded():
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(5000, generator=g) * 10 ** float(torch.rand(1, generator=g) * 3)]
    base = torch.zeros(5000)
    for approx in (False, True):
        red = ModelTopK(
            rank=lambda n, t, p: int(n * 0.7),
            active=lambda p: True,
            approximate=lambda p, a=approx: a,
            l1=True,
        )
        state = None
        params = {"density": [0.3]}
        for p in range(red.passes(params)):
            state = red.finish(p, state, red.map(p, state, tensors, base, None, params), params)
        if not approx:
            exact = state["threshold"][0]
            assert exact == float(tensors[0].abs().kthvalue(3500).values)
        else:
            approx_thr = state["threshold"][0]
    assert approx_thr <= exact < approx_thr * (1 + 2**-7)


def test_sigma_rule_refuses_a_fully_removed_task():
    from alloykit.methods.neuromerging import sigma_lambda2

    assert sigma_lambda2([0.2, 0.5]) == pytest.approx(2.0)
    with pytest.raises(ParameterError, match=r"removed all of a task vector's L1 mass"):
        sigma_lambda2([0.2, 1.0])


def test_through_files_and_recipes(toy):
    out = merge(
        toy["paths"], toy["base_path"], "neuromerging", toy["tmp"] / "o", parameters={"mask_rate": 0.7}
    ).output
    from alloykit.io import open_checkpoint

    r = open_checkpoint(out)
    mem = merge_state_dicts(toy["fts"], toy["base"], "neuromerging", parameters={"mask_rate": 0.7})
    assert all(torch.equal(r.read(k), mem[k]) for k in mem)
    close(mem, reference(toy["base"], toy["fts"], 0.7))


@pytest.mark.parametrize("preset", ["paper", "code"])
def test_a_bfloat16_compute_dtype_is_computed_in_float32(preset):
    """There is no bfloat16 QR/SVD on CPU (it used to fail with geqrf_cpu): a bfloat16 compute
    dtype gives the float32 merge rounded to bfloat16, which is what it writes by default."""
    base = make_base(dtype=torch.bfloat16)
    fts = make_finetunes(base, scale=0.3)  # differences across binades: not exact in bfloat16
    diff = fts[0]["layers.1.mlp.weight"].float() - base["layers.1.mlp.weight"].float()
    assert not torch.equal(diff, diff.bfloat16().float())
    kw = dict(preset=preset, parameters={"mask_rate": 0.5, "lambda1": 0.3})
    half = merge_state_dicts(fts, base, "neuromerging", dtype="bfloat16", **kw)
    full = merge_state_dicts(fts, base, "neuromerging", dtype="float32", out_dtype="float32", **kw)
    for k, v in full.items():
        assert half[k].dtype == torch.bfloat16
        assert torch.equal(half[k], v.to(torch.bfloat16)), k


def test_whole_model_trim_statistics_use_the_merge_pass_dtype():
    """With a bfloat16 compute dtype NeuroMerging's task vectors are float32 (above); the
    whole-model top-k histograms must see the same float32 |θ_t − θ_0|, not a bfloat16-rounded
    one, or the threshold would not match the values it trims."""
    from alloykit.methods import get_method
    from alloykit.methods.base import TensorContext

    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 32, generator=g).bfloat16()
    x = (base.float() + 0.3 * torch.randn(64, 32, generator=g)).bfloat16()
    assert not torch.equal(x.float() - base.float(), (x - base).float())  # bf16 would round
    method = get_method("neuromerging")
    params = method.resolve(1, global_params={"mask_rate": 0.5})
    half = method.reduction.map(0, None, [x], base, TensorContext("w", result_dtype=torch.bfloat16), params)
    full = method.reduction.map(
        0, None, [x.float()], base.float(), TensorContext("w", result_dtype=torch.float32), params
    )
    assert torch.equal(half["count"], full["count"]) and torch.equal(half["mass"], full["mass"])


def test_block_size_changes_no_byte():
    """Neurons are merged in blocks; the batched QR rounds by where a matrix sits in its batch,
    so blocks are whole multiples of 8 neurons. Odd sizes (3, 233: one row of a 700-row matrix
    of 3 × 90 updates left over) must give the bytes of one whole batch."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(700, 90, generator=g), "c": torch.randn(41, 11, 3, generator=g)}
    fts = [{k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    whole = merge_state_dicts(fts, base, "neuromerging", parameters={"block_rows": 4096})
    for rows in [0, 1, 3, 9, 233]:
        got = merge_state_dicts(fts, base, "neuromerging", parameters={"block_rows": rows})
        for k, v in whole.items():
            assert torch.equal(got[k], v), (rows, k)


def test_an_empty_matrix_merges_to_itself():
    """A (0, n) tensor has no neuron (its rows could not be shaped by -1: it used to fail)."""
    base = make_base()
    base["empty.weight"] = torch.zeros(0, 4)
    fts = make_finetunes(base)
    out = merge_state_dicts(fts, base, "neuromerging", parameters={"mask_rate": 0.5})
    assert out["empty.weight"].shape == (0, 4)
    close(out, reference({k: v for k, v in base.items() if k != "empty.weight"}, fts, 0.5))


@pytest.mark.parametrize("threshold", ["exact", "approximate"])
def test_whole_model_trim_histograms_in_blocks_of_entries(monkeypatch, threshold):
    """The whole-model trim's histograms are taken over blocks of entries (an embedding gets no
    tensor-sized float32 copies): with blocks of 7 entries, counts, L1 masses and the merge equal
    one block per tensor."""
    import alloykit.methods.primitives as primitives
    from alloykit.methods import get_method
    from alloykit.methods.base import TensorContext

    g = torch.Generator().manual_seed(5)
    base = torch.randn(50, 33, generator=g)
    xs = [base + 0.1 * torch.randn(50, 33, generator=g) for _ in range(2)]
    method = get_method("neuromerging")
    params = method.resolve(2, global_params={"mask_rate": 0.6, "threshold": threshold})
    ctx = TensorContext("w", result_dtype=torch.float32)
    whole = method.reduction.map(0, None, xs, base, ctx, params)
    models = make_finetunes(make_base())
    ref = merge_state_dicts(models[1:], models[0], "neuromerging", parameters={"threshold": threshold})
    monkeypatch.setattr(primitives, "_HISTOGRAM_BLOCK", 7)
    blocked = method.reduction.map(0, None, xs, base, ctx, params)
    assert torch.equal(whole["count"], blocked["count"]) and torch.equal(whole["mass"], blocked["mass"])
    mags = torch.stack([(x - base).abs().reshape(-1) for x in xs])  # an independent histogram
    keys = mags.view(torch.int32) >> 16
    assert torch.equal(blocked["count"][1], torch.bincount(keys[1], minlength=1 << 15))
    got = merge_state_dicts(models[1:], models[0], "neuromerging", parameters={"threshold": threshold})
    assert all(torch.equal(got[k], v) for k, v in ref.items())
