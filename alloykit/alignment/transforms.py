"""Merge and unmerge matrices per group, and applying them to tensors.

For a group of n units in each of N models merged into n' units, model m has an unmerge matrix
U_m (n × n', 0/1: unit i goes into merged unit c) and a merge matrix M_m = U_m / colsum(U) where
colsum runs over all models' units of the merged unit (so a merged unit is the mean of its
members). Applied to one model's tensor along a piece of an axis: ``out`` axes (rows that
produce or carry the units) become (N·M_m)ᵀ θ, ``in`` axes (columns that read them) θ U_m; then the
models are averaged (ZipIt / MuDSC ``get_merged_state_dict``). For permutations U_m = P_m and
N·M_m = P_m: the merged Linear is (1/N) Σ_m P_qᵀ W_m P_p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alloykit.alignment.groups import GroupTable, PermGroup, Piece


@dataclass
class Transform:
    """One group's transform for N models (each matrix n × n')."""

    unmerge: list[torch.Tensor]
    merge: list[torch.Tensor]

    @property
    def width(self) -> int:
        return int(self.unmerge[0].shape[1])

    @property
    def n_models(self) -> int:
        return len(self.unmerge)

    @classmethod
    def from_unmerge(cls, unmerge: Sequence[torch.Tensor], eps: float = 0.0) -> Transform:
        """M_m = U_m / (colsum + ``eps``): ``eps`` = 1e-5 reproduces the MuDSC/ZipIt code."""
        u = [x.to(torch.float64) for x in unmerge]
        counts = torch.stack(u).sum(dim=(0, 1))
        if bool((counts == 0).any()):
            raise ValueError("a merged unit has no member")
        return cls(u, [x / (counts[None, :] + eps) for x in u])

    @classmethod
    def from_permutations(cls, perms: Sequence[torch.Tensor]) -> Transform:
        """``perms[m][c]`` = the unit of model m that goes into merged unit c (a bijection)."""
        n = len(perms[0])
        mats = []
        for p in perms:
            u = torch.zeros(n, n, dtype=torch.float64)
            u[torch.as_tensor(p, dtype=torch.long), torch.arange(n)] = 1.0
            mats.append(u)
        return cls.from_unmerge(mats)

    @classmethod
    def identity(cls, n: int, n_models: int) -> Transform:
        return cls.from_permutations([torch.arange(n)] * n_models)

    def permutations(self) -> list[torch.Tensor] | None:
        """``perms[m]`` when every U_m is a permutation matrix, else None."""
        out = []
        for u in self.unmerge:
            if u.shape[0] != u.shape[1] or not bool(((u == 0) | (u == 1)).all()):
                return None
            if not (bool((u.sum(0) == 1).all()) and bool((u.sum(1) == 1).all())):
                return None
            out.append(u.argmax(0))
        return out


def _apply_piece(t: torch.Tensor, piece: Piece, n: int, mat: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The piece of axis ``piece.axis`` laid out (outer, n, inner) at ``offset``, multiplied by
    ``mat`` (n × n') along n. Returns the new piece and its length."""
    seg = t.narrow(piece.axis, piece.offset, piece.outer * n * piece.inner)
    moved = seg.movedim(piece.axis, -1)
    lead = moved.shape[:-1]
    x = moved.reshape(*lead, piece.outer, n, piece.inner)
    y = torch.einsum("...oni,nm->...omi", x.to(mat.dtype), mat)
    width = mat.shape[1]
    y = y.reshape(*lead, piece.outer * width * piece.inner).movedim(-1, piece.axis)
    return y.to(t.dtype), piece.outer * width * piece.inner


def transform_tensor(t: torch.Tensor, entries: Sequence[tuple[Piece, int, torch.Tensor]]) -> torch.Tensor:
    """Apply ``(piece, n, matrix)`` entries (matrix n × n' along the piece) to one tensor: pieces
    on one axis are transformed and put back in place, the parts between them kept."""
    by_axis: dict[int, list[tuple[Piece, int, torch.Tensor]]] = {}
    for e in entries:
        by_axis.setdefault(e[0].axis, []).append(e)
    for axis, items in by_axis.items():
        items.sort(key=lambda e: e[0].offset)
        parts, pos = [], 0
        for piece, n, mat in items:
            if piece.offset > pos:
                parts.append(t.narrow(axis, pos, piece.offset - pos))
            new, _ = _apply_piece(t, piece, n, mat)
            parts.append(new)
            pos = piece.offset + piece.outer * n * piece.inner
        if pos < t.shape[axis]:
            parts.append(t.narrow(axis, pos, t.shape[axis] - pos))
        t = torch.cat(parts, dim=axis) if len(parts) > 1 else parts[0]
    return t


def model_entries(
    table: GroupTable, transforms: dict[str, Transform], model: int
) -> dict[str, list[tuple[Piece, int, torch.Tensor]]]:
    """Per tensor, model ``model``'s (piece, n, matrix) entries: N·M_m for ``out`` pieces, U_m for
    ``in`` pieces."""
    out: dict[str, list[tuple[Piece, int, torch.Tensor]]] = {}
    for g in table.groups:
        tr = transforms.get(g.name)
        if tr is None:
            continue
        n_models = tr.n_models
        for p in g.pieces:
            mat = tr.merge[model] * n_models if p.role == "out" else tr.unmerge[model]
            out.setdefault(p.param, []).append((p, g.size, mat))
    return out


def transform_state(
    state: dict[str, torch.Tensor], table: GroupTable, transforms: dict[str, Transform], model: int = 0
) -> dict[str, torch.Tensor]:
    """One model's state dict with its transforms applied (not averaged)."""
    entries = model_entries(table, transforms, model)
    return {k: transform_tensor(v, entries[k]) if k in entries else v for k, v in state.items()}


def merged_shape(shape: Sequence[int], entries: Sequence[tuple[Piece, int, torch.Tensor]]) -> tuple[int, ...]:
    out = list(shape)
    for piece, n, mat in entries:
        out[piece.axis] += piece.outer * piece.inner * (mat.shape[1] - n)
    return tuple(out)


# ----------------------------------------------------------------------------- random transforms


def random_permutation(group: PermGroup, generator: torch.Generator, block_perm: torch.Tensor | None = None):
    """A permutation of the group's units that maps whole blocks onto whole blocks (``block_perm``
    when given, so that tied groups move their heads together) and permutes within blocks."""
    g, k = group.blocks, group.block_size
    if block_perm is None:
        block_perm = torch.randperm(g, generator=generator)
    within = [torch.randperm(k, generator=generator) for _ in range(g)]
    return torch.cat([block_perm[b] * k + within[b] for b in range(g)])


def random_transforms(table: GroupTable, generator: torch.Generator) -> dict[str, Transform]:
    """A random block-respecting permutation per group, ties sharing their block permutation, as
    single-model transforms."""
    ties: dict[str, torch.Tensor] = {}
    out = {}
    for g in table.groups:
        bp = None
        if g.tie is not None:
            bp = ties.setdefault(g.tie, torch.randperm(g.blocks, generator=generator))
        out[g.name] = Transform.from_permutations([random_permutation(g, generator, bp)])
    return out


def aligned_mean(tensors: Sequence[torch.Tensor], transforms: Sequence[Sequence[tuple]]) -> torch.Tensor:
    """θ' = (1/N) Σ_m T_m(θ_m): each model's tensor with its transforms applied, then averaged
    (in float64, returned in the inputs' dtype). Tensors in no group are plainly averaged."""
    dtype = tensors[0].dtype
    acc = None
    for m, t in enumerate(tensors):
        entries = transforms[m] if transforms else ()
        x = transform_tensor(t.to(torch.float64), entries) if entries else t.to(torch.float64)
        acc = x if acc is None else acc + x
    return (acc / len(tensors)).to(dtype)
