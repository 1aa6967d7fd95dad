"""The self-check run before any alignment: permuting a group's units (whole blocks onto whole
blocks) must leave the model's outputs unchanged, and moving a unit across blocks must change them.
A failure names the group, so a wrong trace never reaches a merge."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from alloykit.alignment.groups import GroupTable
from alloykit.alignment.transforms import Transform, random_permutation, transform_state
from alloykit.errors import AlloykitError


class SelfCheckError(AlloykitError):
    """A permutation group does not leave the model's function unchanged (or a block is not real)."""


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values") and not isinstance(out, list | tuple):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _tensors(v)]
    return []


def _run(model: torch.nn.Module, state: dict[str, torch.Tensor], args: Sequence[Any], kwargs: dict) -> list:
    model.load_state_dict(state)
    with torch.no_grad():
        return [t.detach().double() for t in _tensors(model(*args, **kwargs))]


def _same(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float) -> float:
    """Largest relative difference (over each output's own scale)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        scale = max(float(x.abs().max()) if x.numel() else 0.0, 1e-6)
        worst = max(worst, float((x - y).abs().max()) / scale if x.numel() else 0.0)
    return worst


def self_check(
    model: torch.nn.Module,
    table: GroupTable,
    args: Sequence[Any],
    kwargs: dict | None = None,
    *,
    seed: int = 0,
    rtol: float = 1e-4,
    negative: bool = True,
) -> dict[str, float]:
    """Permute each group on its own (block-respecting) and require unchanged outputs, then all
    groups together; with ``negative``, a permutation that moves one unit into another block of a
    blocked group must change them. Returns each check's largest relative output difference."""
    kwargs = kwargs or {}
    work = copy.deepcopy(model).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reference = _run(work, state, args, kwargs)
    g = torch.Generator().manual_seed(seed)
    report: dict[str, float] = {}
    ties: dict[str, torch.Tensor] = {}
    together: dict[str, Transform] = {}
    for group in table.groups:
        bp = None
        if group.tie is not None:
            bp = ties.setdefault(group.tie, torch.randperm(group.blocks, generator=g))
        perm = random_permutation(group, g, bp)
        tr = Transform.from_permutations([perm])
        together[group.name] = tr
        tied = [o for o in table.groups if group.tie is not None and o.tie == group.tie and o is not group]
        alone = {group.name: tr}
        for o in tied:  # a tied group cannot move its heads alone: its partners follow the blocks
            k = o.block_size
            alone[o.name] = Transform.from_permutations(
                [torch.cat([bp[b] * k + torch.arange(k) for b in range(o.blocks)])]
            )
        diff = _same(reference, _run(work, transform_state(state, table, alone), args, kwargs), rtol)
        report[group.name] = diff
        if diff > rtol:
            shown = ", ".join(p.describe(group.size) for p in group.pieces[:4])
            more = " …" if len(group.pieces) > 4 else ""
            raise SelfCheckError(
                f"self-check failed for group {group.name!r} ({group.size} units: {shown}{more}): "
                f"permuting it changed the model's outputs by {diff:.2e} (relative). The trace is wrong for "
                "this model; exclude the group (GroupTable.without) or give a hand-written spec"
            )
    diff = _same(reference, _run(work, transform_state(state, table, together), args, kwargs), rtol)
    report["all groups"] = diff
    if diff > rtol:
        raise SelfCheckError(
            f"self-check failed with all groups permuted together: outputs changed by {diff:.2e}"
        )
    if negative:
        for group in table.groups:
            if group.blocks < 2:
                continue
            k = group.block_size
            perm = torch.arange(group.size)
            perm[0], perm[k] = k, 0  # unit 0 of block 0 swaps with unit 0 of block 1
            crossed = {group.name: Transform.from_permutations([perm])}
            diff = _same(reference, _run(work, transform_state(state, table, crossed), args, kwargs), rtol)
            report[f"{group.name} (across blocks)"] = diff
            # the change can be small (near-uniform attention of a fresh model), but it is not
            # rounding: rounding stays below 1e-6 here, a real block change above it
            if diff <= 1e-6:
                raise SelfCheckError(
                    f"self-check: group {group.name!r} is in {group.blocks} blocks, but moving a unit "
                    "across blocks left the outputs unchanged; the block structure is not real"
                )
    return report
