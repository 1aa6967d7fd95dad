"""Alignment part 2: the zip solver (ZipIt), its block version, and MuDSC's dual-space loop."""

from __future__ import annotations

import copy

import pytest
import torch

import alloykit
from alloykit.alignment.solvers import hungarian_tied, zip_blocks, zip_units, zip_width
from alloykit.alignment.trace import trace_groups
from tests.test_alignment import ARCHITECTURES, IMG, MLP, _permuted_twin


def _corr(n_units: int, seed: int, samples: int = 50) -> torch.Tensor:
    x = torch.randn(n_units, samples, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.corrcoef(x)


def _members(tr) -> list[list[tuple[int, int]]]:
    """Per merged unit, its (model, unit) members."""
    out = []
    for c in range(tr.width):
        out.append([(m, int(i)) for m, u in enumerate(tr.unmerge) for i in torch.nonzero(u[:, c]).flatten()])
    return out


# ----------------------------------------------------------------------------- zip algebra


@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize("b", [1.0, 0.25, 0.0])
def test_zip_unmerge_has_one_member_row_each_and_respects_the_budget(n_models, b):
    n = 8
    tr, score = zip_units(_corr(n * n_models, 1), n, n_models, a=0.5, b=b)
    u = torch.cat(tr.unmerge)
    assert u.shape == (n * n_models, zip_width(n, n_models, None)) == (n * n_models, n)
    assert bool((u.sum(1) == 1).all()) and bool((u.sum(0) >= 1).all())  # one cluster per unit
    to_remove = n * n_models - n
    budget = int((to_remove // n_models) * b + 1e-4)
    for m in range(n_models if n_models == 2 else 0):
        # in-model fusions of model m: units of m beyond the first in each merged unit (with 3
        # models the reference counts by a node's first model, so fusions through a third model
        # are not budgeted: only N = 2 is checked this way)
        fused = sum(max(0, sum(1 for mm, _ in mem if mm == m) - 1) for mem in _members(tr))
        # the reference allows one merge past a budget of 0 (the ban comes after the decrement)
        assert fused <= max(budget, 1)
    assert 0 < score <= 1


def test_strict_budget_zero_gives_one_unit_per_model_in_every_cluster():
    lax, _ = zip_units(_corr(16, 1), 8, 2, a=0.5, b=0.0)
    strict, _ = zip_units(_corr(16, 1), 8, 2, a=0.5, b=0.0, strict=True)
    assert all(len({m for m, _ in mem}) == len(mem) == 2 for mem in _members(strict))
    # the reference's rule lets each model make one fusion before the ban
    assert sum(len({m for m, _ in mem}) < len(mem) for mem in _members(lax)) <= 2


def test_zip_by_hand():
    # 2 models × 2 units; model 0 unit 0 ≈ model 1 unit 1 (0.9), model 0 unit 1 ≈ model 1 unit 0 (0.8)
    s = torch.tensor(
        [[1.0, 0.1, 0.2, 0.9], [0.1, 1.0, 0.8, 0.3], [0.2, 0.8, 1.0, 0.0], [0.9, 0.3, 0.0, 1.0]],
        dtype=torch.float64,
    )
    tr, score = zip_units(s, 2, 2, a=0.5, b=1.0)
    assert _members(tr) == [[(0, 0), (1, 1)], [(0, 1), (1, 0)]]
    # after (0, 3) merged, its similarity to node 1 is min(0.1, 0.3)·0.5 = 0.05; the next merge is (1, 2)
    assert score == pytest.approx((0.9 + 0.8) / 2)
    (tr_p,), _ = hungarian_tied([s], 2, 2)
    assert _members(tr_p) == _members(tr)


def test_zip_width_follows_reduce():
    tr, _ = zip_units(_corr(18, 2), 6, 3, reduce=0.5)  # MuDSC's r = 0.5 with 3 models: 1.5× wider
    assert tr.width == 9
    merge = torch.stack([m.sum(0) for m in tr.merge]).sum(0)
    torch.testing.assert_close(merge, torch.ones(9, dtype=torch.float64))  # exact means (eps 0)
    tr, _ = zip_units(_corr(18, 2), 6, 3, reduce=0.5, eps=1e-5)
    assert float(torch.stack([m.sum(0) for m in tr.merge]).sum(0).max()) < 1.0  # the reference's +1e-5


@pytest.mark.parametrize("n_models", [2, 3])
def test_block_zip_never_splits_a_block(n_models):
    blocks, size = 3, 4
    n = blocks * size
    trs, _ = zip_blocks([_corr(n * n_models, 3)], n, n_models, blocks, a=0.5, b=1.0)
    (tr,) = trs
    mem = _members(tr)
    assert len(mem) == n
    for s in range(blocks):  # merged block s: units s·k … (s+1)·k − 1 come from one block per model
        units = [u for c in range(s * size, (s + 1) * size) for u in mem[c]]
        for m in range(n_models):
            assert len({i // size for mm, i in units if mm == m}) == 1


def test_tied_block_groups_share_the_block_pairing():
    n, blocks = 8, 2
    sims = [_corr(2 * n, 4), _corr(2 * n, 5)]
    for solver in (lambda: hungarian_tied(sims, n, 2, blocks)[0], lambda: zip_blocks(sims, n, 2, blocks)[0]):
        trs = solver()
        pairs = []
        for tr in trs:
            mem = _members(tr)
            pairs.append({s: {i // (n // blocks) for m, i in mem[s * 4] if m == 1} for s in range(blocks)})
        assert pairs[0] == pairs[1]


def test_nan_similarity_is_an_error_not_a_debugger():
    s = _corr(8, 6)
    s[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        zip_units(s, 4, 2)


# ----------------------------------------------------------------------------- MuDSC


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "vit_fused"])
@pytest.mark.parametrize("method", ["mudsc_align", "mudsc_zip", "zipit"])
def test_twin_recovery(name, method):
    factory, args, kwargs = ARCHITECTURES[name]
    torch.manual_seed(4)
    # default norms (no unit dead on the data): a dead unit correlates with nothing, so a zip may
    # fuse it with another dead unit, which BatchNorm's averaged shift can revive
    model = factory().eval()
    table = trace_groups(model, args, kwargs).table
    twin = _permuted_twin(model, table)
    data = [IMG[:2], IMG[2:]] if args[0].dim() == 4 else [torch.randn(40, 8), torch.randn(24, 8)]
    params = {"colsum_eps": 0.0}
    res = alloykit.merge(
        [model.state_dict(), twin],
        None,
        method,
        model=factory,
        data=data,
        example_inputs=args,
        parameters=params,
    )
    merged = copy.deepcopy(model)
    merged.load_state_dict(res.state_dict)
    with torch.no_grad():
        for batch in data:
            torch.testing.assert_close(merged(batch), model(batch), rtol=1e-5, atol=1e-5)


def test_mudsc_align_with_alpha_one_and_inner_products_is_weight_matching():
    torch.manual_seed(13)
    a, b = MLP(), MLP()
    x = torch.randn(8, 8)
    params = {"alpha": 1.0, "similarity": "inner", "init": "none", "colsum_eps": 0.0}
    mudsc = alloykit.merge(
        [a.state_dict(), b.state_dict()], None, "mudsc_align", model=MLP, example_inputs=x, parameters=params
    )
    rebasin = alloykit.merge(
        [a.state_dict(), b.state_dict()], None, "weight_matching", model=MLP, example_inputs=x
    )
    for k in rebasin.state_dict:
        torch.testing.assert_close(mudsc.state_dict[k], rebasin.state_dict[k])


def test_mudsc_align_with_alpha_zero_is_activation_matching():
    torch.manual_seed(14)
    a, b = MLP(), MLP()
    data = [torch.randn(32, 8), torch.randn(16, 8)]
    mudsc = alloykit.merge(
        [a.state_dict(), b.state_dict()],
        None,
        "mudsc_align",
        model=MLP,
        data=data,
        parameters={"alpha": 0.0, "colsum_eps": 0.0},
    )
    act = alloykit.merge([a.state_dict(), b.state_dict()], None, "activation_matching", model=MLP, data=data)
    for k in act.state_dict:
        torch.testing.assert_close(mudsc.state_dict[k], act.state_dict[k])


def test_mudsc_is_deterministic_with_a_seed_and_records_its_sweeps():
    torch.manual_seed(15)
    a, b = MLP(), MLP()
    data = [torch.randn(32, 8)]
    runs = [
        alloykit.merge([a.state_dict(), b.state_dict()], None, "mudsc_zip", model=MLP, data=data)
        for _ in range(2)
    ]
    for k in runs[0].state_dict:
        assert torch.equal(runs[0].state_dict[k], runs[1].state_dict[k])


def test_three_models_merge_to_the_original_width():
    torch.manual_seed(16)
    models = [MLP() for _ in range(3)]
    data = [torch.randn(48, 8)]
    for method in ("zipit", "mudsc_zip", "mudsc_align"):
        res = alloykit.merge([m.state_dict() for m in models], None, method, model=MLP, data=data)
        assert res.state_dict["fc1.weight"].shape == (16, 8) and res.state_dict["fc2.weight"].shape == (
            16,
            16,
        )
    wide = alloykit.merge(
        [m.state_dict() for m in models], None, "zipit", model=MLP, data=data, parameters={"width": 1.5}
    )
    assert wide.state_dict["fc1.weight"].shape == (24, 8) and wide.state_dict["fc2.weight"].shape == (24, 24)
