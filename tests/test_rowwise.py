"""Row-wise methods are streamed in slices of whole rows: same bytes as whole-tensor jobs."""

from __future__ import annotations

import pytest
import torch

from alloykit import merge, merge_state_dicts
from tests.conftest import save_folder

SHAPES = {
    "embed.weight": (40, 6),
    "conv.weight": (5, 3, 4),  # rows of 12: out × rest
    "mlp.weight": (9, 7),
    "norm.weight": (6,),  # 1-D: one row, never sliced
}


def _models(dtype: torch.dtype, n: int = 3) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    fts = []
    for i in range(n):
        ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        if i == 1:  # rows that one fine-tune leaves alone, and ties in |τ|
            ft["embed.weight"][3:7] = base["embed.weight"][3:7]
        fts.append({k: v.to(dtype) for k, v in ft.items()})
    return {k: v.to(dtype) for k, v in base.items()}, fts


ROWWISE = [
    ("breadcrumbs", {"density": 0.5, "gamma": 0.2}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.1}),
    ("model_stock", {"granularity": "filter"}),
    ("model_stock", {"granularity": "last_axis", "numerics": "mergekit", "average": "cosine"}),
    ("nuslerp", {"flatten": False, "weight": [0.3, 0.7]}),
]


def _n_models(method: str) -> int:
    return 2 if method == "nuslerp" else 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,params", ROWWISE)
def test_slices_of_whole_rows_give_the_whole_tensor_bytes(tmp_path, method, params, dtype):
    base, fts = _models(dtype, _n_models(method))
    expected = merge_state_dicts(fts, base, method, parameters=params)  # whole tensors
    paths = [save_folder(sd, tmp_path / f"ft{i}") for i, sd in enumerate(fts)]
    base_path = save_folder(base, tmp_path / "base")
    for chunk, workers in ((4, 1), (13, 1), (25, 2), (100, 2)):
        result = merge(paths, base_path, method, parameters=params, chunk_elements=chunk, workers=workers)
        sliced = [j for j in result.plan.jobs if j.length is not None]
        assert sliced, "nothing was sliced"
        for job in result.plan.jobs:
            shape = job.out.shape
            if job.length is None:
                assert job.view is None
                continue
            row = job.out.numel // shape[0]
            assert len(shape) >= 2
            assert job.start % row == 0 and job.length % row == 0  # whole rows only
            assert job.view == (job.length // row, *shape[1:])
            assert job.length == min(max(1, chunk // row) * row, job.out.numel - job.start)
        for k, v in expected.items():
            assert torch.equal(result.state_dict[k], v), (k, chunk, workers)


def test_rows_longer_than_a_chunk_are_one_row_per_job(tmp_path):
    base, fts = _models(torch.float32)
    res = merge(fts, base, "breadcrumbs", parameters={"density": 0.5}, chunk_elements=5, dry_run=True)
    embed = [j for j in res.plan.jobs if j.name == "embed.weight"]
    assert len(embed) == 40 and all(j.view == (1, 6) for j in embed)
    conv = [j for j in res.plan.jobs if j.name == "conv.weight"]
    assert [j.view for j in conv] == [(1, 3, 4)] * 5
    assert [j.view for j in res.plan.jobs if j.name == "norm.weight"] == [None]


@pytest.mark.parametrize(
    "method,params",
    [
        ("breadcrumbs", {"density": 0.5, "rescale": "l1"}),  # L1 norm of the whole tensor
        ("breadcrumbs", {"density": 0.5, "scope": "tensor"}),  # one sort over the whole tensor
        ("model_stock", {}),  # one ratio per tensor
        ("nuslerp", {"flatten": True}),
        ("nuslerp", {"flatten": False, "row_wise": True}),  # vectors along the first axis
    ],
)
def test_whole_tensor_settings_are_not_sliced(method, params):
    base, fts = _models(torch.float32, _n_models(method))
    res = merge(fts, base, method, parameters=params, chunk_elements=5, dry_run=True)
    assert all(j.length is None for j in res.plan.jobs)
    assert len(res.plan.jobs) == len(SHAPES)


def test_a_row_wise_mask_is_per_row_not_per_slice():
    """Two rows of a slice keep int(n·density) entries each, as the whole tensor does: a mask
    taken over the slice as one vector would keep them from one row."""
    base = {"w": torch.zeros(4, 4)}
    ft = {"w": torch.tensor([[8.0, 7, 6, 5], [1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], [9, 0, 0, 0]])}
    other = {"w": torch.zeros(4, 4)}
    params = {"density": 0.5, "gamma": 0.0, "weight": [1.0, 1.0]}
    out = merge_state_dicts([ft, other], base, "breadcrumbs", parameters=params, chunk_elements=8)
    expected = torch.tensor([[8.0, 7, 0, 0], [0, 0, 3, 4], [0, 0, 0.3, 0.4], [9, 0, 0, 0]])
    # the last row ties at zero: topk takes one of its zeros, which changes nothing
    assert torch.equal(out["w"], expected)
