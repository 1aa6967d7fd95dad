"""TIES's model-majority sign pass fused into the merge pass gives the bytes of the separate pass."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import alloykit.methods.primitives as primitives
from alloykit.api import merge, merge_state_dicts
from alloykit.methods import get_method
from tests.conftest import save_folder


def weights_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors*"))}


@pytest.fixture
def separate_pass(monkeypatch):
    """Run TIES with the sign majority as its own pass (the engine before the fusion)."""

    def use(on: bool) -> None:
        monkeypatch.setattr(get_method("ties").reduction, "fuse_sign", not on)

    return use


def _models(dtype: torch.dtype, drift: float, seed: int = 0, n: int = 3):
    """Task vectors on a quarter grid (many exact cancellations, as in bf16 fine-tunes), shifted
    by ``drift`` to make the majority of elected signs positive or negative."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (24, 16), "a.bias": (24,), "b.weight": (7, 24), "emb": (50, 8)}
    base = {k: (torch.randn(s, generator=g) * 4).to(dtype) for k, s in shapes.items()}
    fts = []
    for _ in range(n):
        fts.append(
            {
                k: (base[k].float() + ((torch.randn(s, generator=g) + drift) * 2).round() / 4).to(dtype)
                for k, s in shapes.items()
            }
        )
    return base, fts


def _undecided(base, fts, density: float) -> int:
    """Entries where the kept task-vector entries cancel exactly (density 1: nothing trimmed)."""
    assert density == 1.0
    count = 0
    for k in base:
        taus = torch.stack([f[k].float() - base[k].float() for f in fts])
        count += int(((taus.sum(0) == 0) & (taus != 0).any(0)).sum())
    return count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("drift", [-0.6, 0.6])
@pytest.mark.parametrize(
    "params",
    [
        {"density": 1.0},
        {"density": 0.6, "lambda": 0.7},
        {"density": 1.0, "weight": [1.0, 0.5, 2.0], "sign": "weighted_sum", "aggregate": "weighted_mean"},
        {"density": 1.0, "weight": [0.3, 0.5, 0.2], "sign": "count", "aggregate": "sum"},
        {"density": 1.0, "weight": [0.0, 1.0, 0.5]},  # a zero weight: τ̂ counts in Σ τ̂, not in the merge
    ],
)
def test_fused_sign_pass_gives_the_bytes_of_the_separate_pass(tmp_path, separate_pass, dtype, drift, params):
    base, fts = _models(dtype, drift)
    if params["density"] == 1.0:
        assert _undecided(base, fts, 1.0) > 10  # the fallback matters somewhere
    outs = {}
    for fused in (True, False):
        separate_pass(not fused)
        out = tmp_path / f"out-{fused}"
        paths = [save_folder(f, tmp_path / f"ft{i}") for i, f in enumerate(fts)]
        res = merge(
            paths, save_folder(base, tmp_path / "base"), "ties", out, parameters=params, chunk_elements=100
        )
        assert res.report.reduction_passes == (2 if fused else 3)
        outs[fused] = weights_digest(out)
        outs[fused, "memory"] = merge_state_dicts(fts, base, "ties", parameters=params)
    assert outs[True] == outs[False]
    for k in outs[True, "memory"]:
        assert torch.equal(outs[True, "memory"][k], outs[False, "memory"][k]), k


def test_fused_pass_patches_entries_when_the_majority_is_negative_or_zero():
    # Entry 0 cancels exactly; the majority of elected signs is negative: −1 is kept there.
    base = {"w": torch.zeros(5), "v": torch.zeros(2)}
    a = {"w": torch.tensor([1.0, -2.0, -2.0, -2.0, -2.0]), "v": torch.tensor([3.0, -3.0])}
    b = {"w": torch.tensor([-1.0, -2.0, -2.0, -2.0, -2.0]), "v": torch.tensor([-3.0, 3.0])}
    out = merge_state_dicts([a, b], base, "ties", parameters={"density": 1.0})
    assert out["w"].tolist() == [-1.0, -2.0, -2.0, -2.0, -2.0]
    assert out["v"].tolist() == [-3.0, -3.0]
    # Every elected sum is zero: the majority is 0 and the reference keeps the negative entries.
    out = merge_state_dicts(
        [{"v": a["v"]}, {"v": b["v"]}], {"v": base["v"]}, "ties", parameters={"density": 1.0}
    )
    assert out["v"].tolist() == [-3.0, -3.0]
    # A positive majority leaves the +1 entries the merge pass wrote.
    a["w"], b["w"] = -a["w"], -b["w"]
    out = merge_state_dicts([a, b], base, "ties", parameters={"density": 1.0})
    assert out["v"].tolist() == [3.0, 3.0]


def test_approximate_threshold_takes_one_pass_and_changes_only_the_entries_near_it():
    g = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(300, 40, generator=g) * 4, "b": torch.randn(900, generator=g) * 4}
    fts = [{k: v + torch.randn(v.shape, generator=g) * (0.5 + t) for k, v in base.items()} for t in range(2)]
    res = {}
    for threshold in ("exact", "approximate"):
        params = {"density": 0.2, "threshold": threshold}
        res[threshold] = merge_state_dicts(fts, base, "ties", parameters=params)
    near = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in base.items()}
    for ft in fts:
        taus = {k: (ft[k] - base[k]).abs() for k in base}
        flat = torch.cat([v.reshape(-1) for v in taus.values()])
        exact = flat.kthvalue(flat.numel() - int(flat.numel() * 0.2)).values
        # the lower edge of exact's bucket: its float32 bit pattern with the low 16 bits cleared
        bits = torch.tensor([int(exact.view(torch.int32)) & ~0xFFFF], dtype=torch.int32)
        edge = bits.view(torch.float32)[0]
        assert edge <= exact < edge * (1 + 2**-7)
        for k in base:
            near[k] |= (taus[k] >= edge) & (taus[k] < exact)
    changed = sum(int((res["exact"][k] != res["approximate"][k]).sum()) for k in base)
    assert changed > 0  # the approximation is visible here ...
    for k in base:  # ... and only where some task vector lies between the two thresholds
        differs = res["exact"][k] != res["approximate"][k]
        assert not (differs & ~near[k]).any(), k
    assert sum(int(v.sum()) for v in near.values()) < 0.01 * 2 * 12900
    passes = get_method("ties").reduction.passes
    params = {"topk": "model", "zero_sign": "model_majority"}
    assert passes({**params, "threshold": "approximate"}) == 1
    assert passes({**params, "threshold": "exact"}) == 2


def test_the_plan_counts_the_whole_tensor_sort_of_the_exact_per_tensor_trim(tmp_path):
    """The exact per-tensor top-k sorts one task vector at a time before the stack of them is
    formed (|δ| float32, int64 indices, the sorter's 64-bit keys: 20 bytes an element, plus one
    boolean mask per task), so the job's planned bytes, the merge's 4 working copies per input,
    cover it; the plan does not change with the density."""
    base, fts = _models(torch.float32, 0.0)
    paths = [save_folder(f, tmp_path / f"ft{i}") for i, f in enumerate(fts)]
    b = save_folder(base, tmp_path / "base")
    costs = {}
    for density in (1.0, 0.5):
        params = {"density": density}
        res = merge(paths, b, "ties", tmp_path / "o", preset="mergekit", parameters=params, dry_run=True)
        costs[density] = {j.name: j.cost for j in res.plan.jobs if j.merge}
    assert costs[0.5] == costs[1.0]
    inputs = len(fts) + 1
    for name, cost in costs[0.5].items():
        numel = base[name].numel()
        # the inputs as read (float32) and the output, then (k + 1) float32 copies × (1 + 4)
        assert cost == numel * (inputs * 4 + 4 + inputs * 4 * (1 + 4)), name
        assert cost - numel * (inputs * 4 + 4) >= numel * (20 + len(fts)), name  # the sort fits


@pytest.mark.parametrize("density", [0.6, 1.0])
@pytest.mark.parametrize("chunk", [0, 4096])
def test_fused_sign_pass_with_seven_tasks_gives_the_bytes_of_the_separate_pass(monkeypatch, density, chunk):
    """From 5 tasks on, torch adds a column's terms in an order that depends on where the column
    falls (aligned groups or the ragged end of a row): the −1 fallback's values must be merged
    where the merge pass merged them, or an elected sum that was exactly 0 is not 0 once re-added
    elsewhere. Float32 inputs off the grid, so the orders give different roundings; several
    cache blocks (the last one ragged) and engine chunks; the majority is negative, so the
    fallback's values are the ones written."""
    monkeypatch.setattr(primitives, "CACHE_BLOCK", 256)
    g = torch.Generator().manual_seed(1)
    base = {"emb": torch.randn(300, 257, generator=g), "b": torch.randn(333, generator=g)}
    fts = [
        {k: v + ((torch.randn(v.shape, generator=g) - 0.6) * 2).round() / 64 for k, v in base.items()}
        for _ in range(7)
    ]
    outs = {}
    for fused in (True, False):
        monkeypatch.setattr(get_method("ties").reduction, "fuse_sign", fused)
        outs[fused] = merge_state_dicts(
            fts, base, "ties", parameters={"density": density}, chunk_elements=chunk
        )
    for k in base:
        assert torch.equal(outs[True][k], outs[False][k]), k
