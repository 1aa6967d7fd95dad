"""Solvers: from a similarity matrix over the N·n units of N models (model after model), the
merge and unmerge matrices of a group. Callable on their own.

* :func:`hungarian`: model 0 is the anchor; every other model's units are matched to the anchor's
  by a maximum-weight assignment (``scipy.optimize.linear_sum_assignment``) on the anchor-vs-model
  block. With blocks (heads, GroupNorm groups), two levels: an assignment inside every pair of
  blocks, then an assignment of blocks on the blocks' mean matched similarity (MuDSC
  ``group_permute_weight``); groups tied together (the q/k and v/o groups of one attention layer)
  share the block assignment, chosen on the sum of their block scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from alloykit.alignment.transforms import Transform


def _assign(score: np.ndarray) -> tuple[np.ndarray, float]:
    """Column matched to each row (maximum total), and the mean matched value."""
    rows, cols = linear_sum_assignment(score, maximize=True)
    order = np.empty(score.shape[0], dtype=np.int64)
    order[rows] = cols
    return order, float(score[rows, cols].mean()) if len(rows) else 0.0


def _check(sim: torch.Tensor, n: int, n_models: int) -> np.ndarray:
    if tuple(sim.shape) != (n * n_models, n * n_models):
        raise ValueError(f"similarity has shape {list(sim.shape)}, expected {n * n_models} × {n * n_models}")
    s = sim.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(s).all():
        raise ValueError("similarity holds NaN or Inf")
    return s


def hungarian(sim: torch.Tensor, n: int, n_models: int, blocks: int = 1) -> tuple[Transform, float]:
    """Permutations aligning every model to model 0 (see the module docstring). Returns the
    transform and the mean matched similarity."""
    (tr,), score = hungarian_tied([sim], n, n_models, blocks)
    return tr, score


def hungarian_tied(
    sims: Sequence[torch.Tensor], n: int | Sequence[int], n_models: int, blocks: int = 1
) -> tuple[list[Transform], float]:
    """Hungarian for groups that share one block assignment (``sims`` one per group, each with
    ``blocks`` blocks). Without blocks (``blocks=1``) the groups are solved independently."""
    sizes = list(n) if isinstance(n, Sequence) else [n] * len(sims)
    mats = [_check(s, k, n_models) for s, k in zip(sims, sizes, strict=True)]
    perms: list[list[torch.Tensor]] = [[torch.arange(k)] for k in sizes]
    scores = []
    for m in range(1, n_models):
        # per group: within-block assignments and block scores for anchor block s vs block t
        inner: list[dict[tuple[int, int], np.ndarray]] = []
        total = np.zeros((blocks, blocks))
        for s, k in zip(mats, sizes, strict=True):
            size = k // blocks
            a = s[:k, m * k : (m + 1) * k]
            found = {}
            for bs in range(blocks):
                for bt in range(blocks):
                    sub = a[bs * size : (bs + 1) * size, bt * size : (bt + 1) * size]
                    order, mean = _assign(sub)
                    found[bs, bt] = order
                    total[bs, bt] += mean
            inner.append(found)
        block_order, _ = _assign(total) if blocks > 1 else (np.zeros(1, dtype=np.int64), 0.0)
        for gi, (s, k) in enumerate(zip(mats, sizes, strict=True)):
            size = k // blocks
            perm = np.concatenate(
                [block_order[bs] * size + inner[gi][bs, block_order[bs]] for bs in range(blocks)]
            )
            perms[gi].append(torch.from_numpy(perm))
            a = s[:k, m * k : (m + 1) * k]
            scores.append(float(a[np.arange(k), perm].mean()))
    return [Transform.from_permutations(p) for p in perms], (float(np.mean(scores)) if scores else 0.0)


def matched_score(sim: torch.Tensor, transform: Transform) -> float:
    """Mean similarity between each merged unit's members across models (anchor vs each other
    model), for comparing an existing transform with a new solution."""
    perms = transform.permutations()
    n = transform.unmerge[0].shape[0]
    s = sim.detach().to(torch.float64)
    if perms is None:  # a zip: mean over pairs of members of each merged unit
        u = torch.cat([x.to(torch.float64) for x in transform.unmerge], dim=0)
        pair = u.T @ s @ u
        counts = u.sum(0)
        inside = pair.diagonal() - (u * (s.diagonal()[:, None])).sum(0)
        pairs = counts * (counts - 1)
        valid = pairs > 0
        return float((inside[valid] / pairs[valid]).mean()) if bool(valid.any()) else 0.0
    vals = []
    for m in range(1, len(perms)):
        block = s[:n, m * n : (m + 1) * n]
        vals.append(block[perms[0], perms[m]].mean())
    return float(torch.stack(vals).mean()) if vals else 0.0
