"""Aligners: from N models (and data, for activation methods) to a transform per group.

* :func:`identity` — every unit stays where it is: plain weight averaging.
* :func:`activation_matching` — per group, Hungarian on the cross-model correlation of the units'
  activations (Git Re-Basin's activation matching on Pearson correlation, as REPAIR and MuDSC's
  "A. Align"); each group independently, tied groups sharing their head assignment.
* :func:`weight_matching` — Git Re-Basin weight matching: coordinate descent over groups in a
  random order (one seeded generator, as MuDSC's loop), each group solved by Hungarian on the inner
  products of unit signatures expressed in the neighbours' current basis, until a whole sweep
  improves no group by more than 1e-12 (at most ``max_sweeps``).
* :func:`dual_space` — MuDSC (Xu et al., CVPR 2024, ``zju-vipa/training_free_model_merging``
  ``WeightFusion.iter_transform``): optionally start from the activation solution, then sweep the
  groups in a seeded random order, each solved (Hungarian or zip) on α·C_w + (1 − α)·C_act with C_w
  recomputed from the current neighbours; a sweep whose mean score does not beat the best rolls
  back to the best, and ``patience`` such sweeps in a row end the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alloykit.alignment.groups import GroupTable, PermGroup, Piece
from alloykit.alignment.similarity import signatures, similarity
from alloykit.alignment.solvers import hungarian_tied, matched_score
from alloykit.alignment.transforms import Transform, merged_shape, model_entries


@dataclass
class Alignment:
    """Groups and their transforms: what the engine hands, tensor by tensor, to a merge method."""

    table: GroupTable
    transforms: dict[str, Transform]
    n_models: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._entries = [model_entries(self.table, self.transforms, m) for m in range(self.n_models)]

    def entries(self, name: str) -> tuple[list[tuple[Piece, int, torch.Tensor]], ...]:
        """Per model, the (piece, n, matrix) entries that apply to tensor ``name``."""
        return tuple(e.get(name, []) for e in self._entries)

    def merged_shape(self, name: str, shape: Sequence[int]) -> tuple[int, ...]:
        return merged_shape(shape, self._entries[0].get(name, []))

    def params(self) -> set[str]:
        return {p.param for g in self.table.groups for p in g.pieces}


def solve_units(table: GroupTable) -> list[list[PermGroup]]:
    """Groups solved together: each tie (groups sharing a head axis) is one unit."""
    units: dict[str, list[PermGroup]] = {}
    for g in table.groups:
        units.setdefault(g.tie or g.name, []).append(g)
    return list(units.values())


def identity(table: GroupTable, n_models: int) -> dict[str, Transform]:
    return {g.name: Transform.identity(g.size, n_models) for g in table.groups}


def _solve(unit: list[PermGroup], sims: list[torch.Tensor], n_models: int) -> tuple[list[Transform], float]:
    return hungarian_tied(sims, [g.size for g in unit], n_models, unit[0].blocks)


def activation_matching(
    table: GroupTable, correlation: Callable[[str], torch.Tensor], n_models: int
) -> tuple[dict[str, Transform], dict[str, float]]:
    """Hungarian on each group's activation correlation; returns transforms and scores."""
    out, scores = {}, {}
    for unit in solve_units(table):
        trs, score = _solve(unit, [correlation(g.name) for g in unit], n_models)
        for g, tr in zip(unit, trs, strict=True):
            out[g.name] = tr
            scores[g.name] = score
    return out, scores


def weight_matching(
    table: GroupTable,
    states: Sequence[dict[str, torch.Tensor]],
    *,
    kind: str = "inner",
    max_sweeps: int = 100,
    seed: int = 0,
    tol: float = 1e-12,
    log: list[dict[str, Any]] | None = None,
) -> dict[str, Transform]:
    """Git Re-Basin weight matching (module docstring)."""
    n_models = len(states)
    transforms = identity(table, n_models)
    units = solve_units(table)
    g = torch.Generator().manual_seed(seed)
    for sweep in range(max_sweeps):
        order = torch.randperm(len(units), generator=g).tolist()
        improved = False
        for i in order:
            unit = units[i]
            sims = [similarity(signatures(states, table, grp, transforms), kind) for grp in unit]
            old = sum(matched_score(s, transforms[grp.name]) for s, grp in zip(sims, unit, strict=True))
            trs, _ = _solve(unit, sims, n_models)
            new = sum(matched_score(s, tr) for s, tr in zip(sims, trs, strict=True))
            if new > old + tol:
                for grp, tr in zip(unit, trs, strict=True):
                    transforms[grp.name] = tr
                improved = True
        if log is not None:
            log.append({"sweep": sweep + 1, "improved": improved})
        if not improved:
            break
    return transforms


def _solve_with(
    solver: str, unit: list[PermGroup], sims: list[torch.Tensor], n_models: int, zip_options: dict[str, Any]
) -> tuple[list[Transform], float]:
    from alloykit.alignment.solvers import zip_blocks, zip_units

    sizes = [g.size for g in unit]
    if solver == "hungarian":
        trs, score = hungarian_tied(sims, sizes, n_models, unit[0].blocks)
        eps = zip_options.get("eps", 0.0)
        if eps:
            trs = [Transform.from_unmerge(t.unmerge, eps=eps) for t in trs]
        return trs, score
    if unit[0].blocks > 1 or len(unit) > 1:
        return zip_blocks(sims, sizes, n_models, unit[0].blocks, **zip_options)
    tr, score = zip_units(sims[0], sizes[0], n_models, **zip_options)
    return [tr], score


def dual_space(
    table: GroupTable,
    states: Sequence[dict[str, torch.Tensor]],
    activation: Callable[[str], torch.Tensor] | None,
    *,
    solver: str = "zip",
    alpha: float = 0.5,
    kind: str = "pearson",
    max_sweeps: int = 100,
    patience: int = 5,
    seed: int = 0,
    init: bool = True,
    zip_options: dict[str, Any] | None = None,
    log: list[dict[str, Any]] | None = None,
) -> dict[str, Transform]:
    """MuDSC (module docstring). ``activation`` gives each group's activation correlation (None:
    weight space only); ``init``: start from the activation solution (else from no transforms:
    the first sweep's signatures use only the groups already solved in it). α = 0 returns the
    activation solution."""
    zip_options = dict(zip_options or {})
    n_models = len(states)
    units = solve_units(table)
    transforms: dict[str, Transform] = {}
    score: dict[str, float] = {g.name: 0.0 for g in table.groups}
    if activation is not None and (init or alpha <= 0):
        for unit in units:
            trs, sc = _solve_with(solver, unit, [activation(g.name) for g in unit], n_models, zip_options)
            for g, tr in zip(unit, trs, strict=True):
                transforms[g.name] = tr
                score[g.name] = sc
        if log is not None:
            log.append({"sweep": 0, "score": sum(score.values()) / max(len(score), 1)})
    if alpha <= 0 and activation is not None:
        return transforms
    gen = torch.Generator().manual_seed(seed)
    best: dict[str, Transform] | None = None
    best_score, stall = 0.0, 0
    for sweep in range(max_sweeps):
        for i in torch.randperm(len(units), generator=gen).tolist():
            unit = units[i]
            sims = []
            for g in unit:
                c = similarity(signatures(states, table, g, transforms), kind)
                if activation is not None:
                    c = alpha * c + (1 - alpha) * activation(g.name)
                sims.append(c)
            trs, sc = _solve_with(solver, unit, sims, n_models, zip_options)
            for g, tr in zip(unit, trs, strict=True):
                transforms[g.name] = tr
                score[g.name] = sc
        total = sum(score.values()) / max(len(score), 1)
        if log is not None:
            log.append({"sweep": sweep + 1, "score": total})
        if best is not None and best_score >= total:
            stall += 1
            if stall >= patience:
                break
            transforms = dict(best)
        else:
            stall = 0
            best = dict(transforms)
            best_score = total
    return dict(best) if best is not None else transforms


def timed(seconds: dict[str, float], key: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - self.t

    return _T()
