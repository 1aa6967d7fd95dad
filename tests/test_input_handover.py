"""The engine hands a job's inputs to the method (``Inputs``) and keeps no reference to them, so
that whole-tensor methods can let each θ_t go once its task vector is formed."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

import alloykit
from alloykit.methods import get_method
from alloykit.methods.base import REGISTRY, Inputs, TensorContext, merge_method, release
from tests.conftest import make_base, make_finetunes, save_folder


def _let_go(tensors) -> tuple[bool, bool]:
    """(handed over, every input freed once released)."""
    refs = [weakref.ref(t) for t in tensors]
    for t in range(len(tensors)):
        release(tensors, t)
    gc.collect()
    return isinstance(tensors, Inputs), all(r() is None for r in refs)


class _ProbePass:
    """A one-pass reduction that checks the handover in the reduction pass too."""

    def __init__(self, seen: dict) -> None:
        self.seen = seen

    def passes(self, params):
        return 1

    def map(self, index, state, tensors, base, ctx, params):
        self.seen["pass:" + ctx.name] = _let_go(tensors)
        return 0

    def fold(self, index, acc, partial):
        return 0

    def finish(self, index, state, acc, params):
        return {}


def test_the_engine_hands_over_the_only_references_and_still_reports_the_norms(tmp_path):
    seen: dict[str, tuple[bool, bool]] = {}

    @merge_method("handover_probe", params=[], needs_base=True, reduction=_ProbePass(seen))
    def probe(tensors, base, ctx):
        seen[ctx.name] = _let_go(tensors)
        return base.clone()

    try:
        base = make_base()
        fts = make_finetunes(base, 2)
        paths = [save_folder(sd, tmp_path / f"ft{i}") for i, sd in enumerate(fts)]
        res = alloykit.merge(paths, save_folder(base, tmp_path / "base"), "handover_probe")
    finally:
        REGISTRY.pop("handover_probe", None)
    assert len(seen) == 2 * len(base) and all(handed and freed for handed, freed in seen.values()), seen
    # ‖θ_t − θ_0‖ / ‖θ_0‖ is taken before the method lets the inputs go
    base_sq = sum(float(v.square().sum()) for v in base.values())
    for label, ft in zip(res.report.relative_delta_norm, fts, strict=True):
        expect = math.sqrt(sum(float((ft[k] - base[k]).square().sum()) for k in base) / base_sq)
        assert res.report.relative_delta_norm[label] == pytest.approx(expect, rel=1e-6)


def test_a_plain_list_is_never_emptied():
    xs = [torch.ones(2), torch.zeros(2)]
    release(xs, 0)
    assert xs[0] is not None
    handed = Inputs(xs)
    release(handed, 1)
    assert handed[1] is None and xs[1] is not None  # (Inputs copies the list it is made from)


CASES = [
    ("tsv_m", None, {}),
    ("iso_c", None, {}),
    ("iso_cts", None, {}),
    ("iso_cts", None, {"common_fraction": 1.0}),  # (its Iso-C path)
    ("ties", "mergekit", {"density": 0.4}),
    ("magnitude_prune", None, {"density": 0.4, "topk": "tensor"}),
    ("della", None, {}),
    ("esm", None, {}),  # (no statistics: TSV-M for a matrix, the mean otherwise)
]


@pytest.mark.parametrize("name,preset,params", CASES)
@pytest.mark.parametrize("shape", [(40, 24), (24,)])
def test_methods_let_go_of_inputs_handed_over_and_give_the_same_bytes(name, preset, params, shape):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g)
    fts = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]
    m = get_method(name)
    kw = m.resolve(3, preset=preset, global_params=params)
    plain = list(fts)
    expect = m.fn(plain, base, TensorContext("w"), **kw)
    assert all(a is b for a, b in zip(plain, fts, strict=True))  # the caller's list: untouched
    handed = Inputs(fts)
    got = m.fn(handed, base, TensorContext("w"), **kw)
    assert torch.equal(got, expect)
    assert all(t is None for t in handed), name


def test_consensus_reads_its_inputs_after_the_ties_trim():
    """Consensus with ``combine: ties`` trims (shared with TIES) and then reads θ_t again for the
    TALL masks: inputs handed over must survive the trim."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(30, 10, generator=g)
    fts = [base + 0.1 * torch.randn(30, 10, generator=g) for _ in range(3)]
    m = get_method("consensus")
    kw = m.resolve(3, global_params={"combine": "ties"})
    flat = torch.cat([(x - base).abs().reshape(-1) for x in fts])
    k = flat.numel() - int(flat.numel() * kw["density"][0])
    thr = float(flat.kthvalue(k).values)
    stats = {"threshold": [thr] * 3, "majority_sign": 1.0}
    expect = m.fn(list(fts), base, TensorContext("w", stats=stats), **kw)
    got = m.fn(Inputs(fts), base, TensorContext("w", stats=stats), **kw)
    assert torch.equal(got, expect)
