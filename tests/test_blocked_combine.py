"""Whole-tensor jobs combine their task vectors in blocks of entries, and DELLA ranks rows in
blocks: the bytes do not depend on the block size (tiny blocks against one block)."""

from __future__ import annotations

import pytest
import torch

import alloykit.methods._sparsify as sparsify
import alloykit.methods.primitives as primitives
from alloykit import merge_state_dicts
from alloykit.methods._sparsify import magprune_probabilities

CASES = [
    ("della", "paper", {}),
    ("della", "mergekit", {"density": 0.5, "epsilon": 0.1}),
    ("della_linear", "paper", {"density": 0.4, "epsilon": 0.2, "aggregate": "weighted_mean"}),
    ("breadcrumbs", "mergekit", {"density": 0.6}),
    ("breadcrumbs_ties", "mergekit", {"density": 0.6, "aggregate": "weighted_mean"}),
    ("dare", "mergekit", {"density": 0.4}),
    ("dare", "mergekit_ties", {"density": 0.4}),
    ("ties", "mergekit", {"density": 0.3, "weight": [0.2, 0.5, 1.0], "lambda": 0.8}),
    ("ties", "paper", {"topk": "tensor", "density": 0.4, "zero_sign": "positive", "aggregate": "mean"}),
]


def _models(dtype: torch.dtype) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(4)
    shapes = {"emb": (30, 17), "conv": (4, 3, 5), "b": (17,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    fts = [{n: v + 0.05 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(3)]
    fts[0]["emb"][5] = base["emb"][5]  # a row one model leaves alone: zero task-vector entries
    return {n: v.to(dtype) for n, v in base.items()}, [{n: v.to(dtype) for n, v in f.items()} for f in fts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,preset,params", CASES)
def test_blocks_give_the_bytes_of_one_block(monkeypatch, method, preset, params, dtype):
    base, fts = _models(dtype)
    kw = dict(parameters=params, preset=preset, seed=3)
    whole = merge_state_dicts(fts, base, method, **kw)
    monkeypatch.setattr(primitives, "COMBINE_BLOCK", 7)
    monkeypatch.setattr(sparsify, "_RANK_BLOCK", 20)  # one row of 17 per block, a conv row of 15
    blocked = merge_state_dicts(fts, base, method, **kw)
    for k, v in whole.items():
        assert torch.equal(blocked[k], v), k


@pytest.mark.parametrize("convention", ["reference", "mergekit"])
def test_ranks_are_the_inverse_of_the_sort_order(convention):
    """MAGPRUNE's ranks, scattered from one argsort, equal the double argsort of the definition."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 13, generator=g)
    x[2, :5] = 0.0  # ties: the order among them is argsort's, in both computations
    p = magprune_probabilities(x, 0.5, 0.2, convention)
    ranks = torch.argsort(x.abs(), dim=1).argsort(dim=1) + 1  # 1 … n per row
    expected = (0.5 - 0.2) + (ranks.float() - 1) / 12 * 0.4
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)


def test_combine_in_blocks_covers_every_entry_once():
    stacked = torch.arange(2 * 23, dtype=torch.float32).reshape(2, 23)
    base = torch.full((23,), 0.5)
    out = primitives.combine_in_blocks(stacked, base, lambda part, b: b + part.sum(0), block=5)
    assert torch.equal(out, base + stacked.sum(0))


@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
def test_magprune_draws_its_mask_in_blocks_and_can_write_over_delta(monkeypatch, rescale):
    """MAGPRUNE draws its Bernoulli mask a block of entries at a time and applies it at once:
    the result is the formula's with one whole draw from the same generator (m⊙δ/p, m⊙δ·‖δ‖₁/‖m⊙δ‖₁
    or m⊙δ), and ``inplace`` writes it over δ itself."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 13, generator=g)
    p = magprune_probabilities(x, 0.5, 0.2, "reference")
    m = torch.bernoulli(p, generator=torch.Generator().manual_seed(7))
    masked = x * m
    expected = {
        "inverse": masked / p,
        "l1": masked * (x.abs().sum() / masked.abs().sum()),
        "none": masked,
    }[rescale]
    monkeypatch.setattr(sparsify, "_RANK_BLOCK", 10)  # 12 blocks of the mask, the last one short
    kw = dict(rescale=rescale, convention="reference")
    got = sparsify.magprune(x, 0.5, 0.2, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(got, expected)
    work = x.clone()
    over = sparsify.magprune(work, 0.5, 0.2, generator=torch.Generator().manual_seed(7), inplace=True, **kw)
    assert torch.equal(over, expected) and torch.equal(work, expected)
    with pytest.raises(ValueError, match="in place needs a contiguous torch.float32 tensor"):
        sparsify.magprune(x.double(), 0.5, 0.2, generator=g, inplace=True, **kw)


def test_task_vector_written_into_a_stack_slot_rounds_as_one_subtraction(monkeypatch):
    """``task_vector(x, base, dtype, out=slot)`` (DELLA's and TIES's stacks): narrower inputs are
    widened exactly before the subtraction (bf16 − bf16 into float32 is not rounded to bf16), a
    wider input is subtracted first and rounded once into a narrower slot, and blocks of 7
    entries change nothing."""
    monkeypatch.setattr(primitives, "COMBINE_BLOCK", 7)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 11, generator=g)
    base = torch.randn(30, 11, generator=g).bfloat16()
    cases = [
        (x.bfloat16(), base, torch.float32, x.bfloat16().double() - base.double()),
        (x.bfloat16(), base.float(), torch.float32, x.bfloat16().double() - base.double()),
        (x, base, torch.bfloat16, x - base.float()),  # float32 subtraction, then one rounding
        (x.double(), base.float(), torch.float32, x.double() - base.double()),
        (x, base.float(), torch.float32, x.double() - base.double()),
    ]
    for a, b, dtype, exact in cases:
        slot = torch.empty(30, 11, dtype=dtype)
        got = primitives.task_vector(a, b, dtype, out=slot)
        assert got.data_ptr() == slot.data_ptr()
        assert torch.equal(got, exact.to(dtype)), (a.dtype, b.dtype, dtype)
    with pytest.raises(ValueError, match="out is torch.bfloat16, expected torch.float32"):
        primitives.task_vector(x, base, torch.float32, out=torch.empty(30, 11, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"density": 0.5, "lambda": 0.7, "weight": [0.5, 1.0, 2.0]},
        {"density": [0.1, 0.9, 1.0], "sign": "count", "aggregate": "sum"},
        {"density": 0.4, "zero_sign": "positive", "sign": "weighted_sum", "aggregate": "weighted_mean"},
        {"density": 0.3, "weight": [-0.5, 1.0, 1.0]},
        {"threshold": "approximate"},
    ],
)
def test_ties_whole_model_trim_in_cache_blocks_gives_the_bytes_of_one_block(monkeypatch, params, dtype):
    """The paper preset forms, trims and merges its task vectors a cache block at a time (the
    model-majority fallback's entries gathered over the blocks, a ragged last block): the bytes
    of one block per job, chunked by the engine or not."""
    base, fts = _models(dtype)
    g = torch.Generator().manual_seed(9)
    base["big"] = torch.randn(41, 29, generator=g).to(dtype)
    for i, f in enumerate(fts):  # deltas on a grid of 1/8: exact zero sums at the election
        noise = torch.randn(41, 29, generator=g) - 0.3 * i
        f["big"] = (base["big"].float() + (noise * 2).round() / 8).to(dtype)
    for chunk in (0, 500):
        kw = dict(parameters=params, preset="paper", chunk_elements=chunk)
        monkeypatch.setattr(primitives, "CACHE_BLOCK", 1 << 20)
        whole = merge_state_dicts(fts, base, "ties", **kw)
        monkeypatch.setattr(primitives, "CACHE_BLOCK", 64)
        blocked = merge_state_dicts(fts, base, "ties", **kw)
        for k, v in whole.items():
            assert torch.equal(blocked[k], v), (chunk, k)
