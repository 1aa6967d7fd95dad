"""Weight-space similarity of units: each unit's signature is everything that touches it (incoming
weights, bias, norm scale and shift, and its outgoing weights in every consumer), expressed in
the current merged basis of the neighbouring groups (MuDSC ``get_weight_vectors``; Git Re-Basin
``weight_matching``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alloykit.alignment.groups import GroupTable, PermGroup, Piece
from alloykit.alignment.transforms import Transform, transform_tensor

KINDS = ("pearson", "cosine", "inner")


def _neighbour_entries(
    table: GroupTable, transforms: dict[str, Transform], group: PermGroup, model: int
) -> dict[str, list[tuple[Piece, int, torch.Tensor]]]:
    """Other groups' transforms of one model, as used in signatures: the merge matrix (×N) on
    ``in`` axes and the unmerge matrix on ``out`` axes, as MuDSC's code does (the two coincide for
    permutations)."""
    out: dict[str, list[tuple[Piece, int, torch.Tensor]]] = {}
    for g in table.groups:
        tr = transforms.get(g.name)
        if g.name == group.name or tr is None:
            continue
        for p in g.pieces:
            mat = tr.merge[model] * tr.n_models if p.role == "in" else tr.unmerge[model]
            out.setdefault(p.param, []).append((p, g.size, mat))
    return out


def signatures(
    states: Sequence[dict[str, torch.Tensor]],
    table: GroupTable,
    group: PermGroup,
    transforms: dict[str, Transform],
) -> torch.Tensor:
    """(N·n) × D: each model's units' signatures, stacked model after model."""
    rows = []
    for m, state in enumerate(states):
        entries = _neighbour_entries(table, transforms, group, m)
        parts = []
        for p in group.pieces:
            if p.param in group.unsigned:
                continue
            t = state[p.param].to(torch.float64)
            seg = t.narrow(p.axis, p.offset, p.outer * group.size * p.inner)
            others = [e for e in entries.get(p.param, []) if e[0].axis != p.axis]
            seg = transform_tensor(seg, others) if others else seg
            moved = seg.movedim(p.axis, 0).reshape(p.outer, group.size, p.inner, -1)
            parts.append(moved.permute(1, 0, 2, 3).reshape(group.size, -1))
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0)


def similarity(vectors: torch.Tensor, kind: str = "pearson", eps: float = 1e-7) -> torch.Tensor:
    """O × O similarity of the rows: Pearson correlation over their coordinates (MuDSC's
    ``_correlation``: Σ ⊘ max(σσᵀ, 1e-7) with population statistics), cosine (rows normalised,
    norms clamped at 1e-8: MuDSC's ``_cossim``), or the raw inner product (Git Re-Basin)."""
    v = vectors.to(torch.float64)
    if kind == "pearson":
        mean = v.mean(dim=1)
        cov = v @ v.T / v.shape[1] - torch.outer(mean, mean)
        std = torch.diagonal(cov).clamp(min=0).sqrt()
        return cov / torch.clamp(torch.outer(std, std), min=eps)
    if kind == "cosine":
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-8)
        return v @ v.T
    if kind == "inner":
        return v @ v.T
    raise ValueError(f"similarity {kind!r} is not one of {KINDS}")
