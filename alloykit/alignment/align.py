"""Aligners: from N models (and data, for activation methods) to a transform per group.

* :func:`identity` — every unit stays where it is: plain weight averaging.
* :func:`activation_matching` — per group, Hungarian on the cross-model correlation of the units'
  activations (Git Re-Basin's activation matching on Pearson correlation, as REPAIR and MuDSC's
  "A. Align"); each group independently, tied groups sharing their head assignment.
* :func:`weight_matching` — Git Re-Basin weight matching: coordinate descent over groups in a
  random order (seeded per sweep), each group solved by Hungarian on the inner products of unit
  signatures expressed in the neighbours' current basis, until a whole sweep improves no group by
  more than 1e-12 (at most ``max_sweeps``).
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
    for sweep in range(max_sweeps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + sweep)
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


def timed(seconds: dict[str, float], key: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - self.t

    return _T()
