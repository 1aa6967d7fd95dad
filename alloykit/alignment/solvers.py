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
    """The similarity as numpy, in its own precision (float32 stays float32: the greedy choices
    then match a float32 reference exactly; alloykit's own similarities are float64)."""
    if tuple(sim.shape) != (n * n_models, n * n_models):
        raise ValueError(f"similarity has shape {list(sim.shape)}, expected {n * n_models} × {n * n_models}")
    keep = torch.float32 if sim.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float64
    s = sim.detach().to(keep).cpu().numpy()
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


# ----------------------------------------------------------------------------- zip (ZipIt, MuDSC)


def zip_width(n: int, n_models: int, reduce: float | None) -> int:
    """Merged width n' = int(N·n·(1 − r) + 1e-4); r defaults to 1 − 1/N (the original width)."""
    r = 1.0 - 1.0 / n_models if reduce is None else reduce
    return int(n * n_models * (1 - r) + 1e-4)


def _zip_core(
    s: np.ndarray,
    origin: np.ndarray,
    steps: int,
    a: float,
    budget: np.ndarray,
    *,
    allowed: np.ndarray | None = None,
    group: np.ndarray | None = None,
    group_budget: np.ndarray | None = None,
    active: np.ndarray,
    members: list[list[int]],
    values: list[float],
    banned: np.ndarray,
    relaxed: list[int],
    strict: bool = False,
) -> None:
    """``steps`` greedy merges on the (symmetric, diagonal −∞) similarity ``s`` over the active
    nodes, in place. A removed node keeps its row and column at −∞, which gives the same argmax
    (the first maximum in row-major order) as the reference code's shrinking matrix. Budget bans
    are kept in ``banned``; if they leave no pair (every remaining node of one model), the best
    banned pair is merged instead (the reference code would merge a node with itself)."""
    neg = -np.inf
    n_models = len(budget)
    # strict: a node's models as a bit set; two nodes sharing a model whose budget is spent may
    # not merge (with N > 2 the reference's "origin" misses fusions made through a third model)
    sets = (1 << origin.astype(np.int64)) if strict else None
    for _ in range(steps):
        ok = ~banned if allowed is None else (allowed & ~banned)
        if strict:
            spent = sum(1 << m for m in range(n_models) if budget[m] <= 0)
            ok = ok & ((sets[:, None] & sets[None, :] & spent) == 0)
        view = np.where(ok, s, neg)
        flat = int(np.argmax(view))
        i, j = divmod(flat, s.shape[1])
        if not np.isfinite(view[i, j]):
            view = s if allowed is None else np.where(allowed, s, neg)
            flat = int(np.argmax(view))
            i, j = divmod(flat, s.shape[1])
            relaxed.append(1)
            if not np.isfinite(view[i, j]):
                raise ValueError("no pair left to merge")
        values.append(float(s[i, j]))
        if j < i:
            i, j = j, i
        oi, oj = origin[i], origin[j]
        members[i] += members[j]
        members[j] = []
        # complete linkage, then decay (a > 0) or a ban between the new node and both models
        s[:, i] = np.minimum(s[:, i], s[:, j])
        if a <= 0:
            same = active & ((origin == oi) | (origin == oj))
            s[same, i] = neg
        else:
            s[:, i] *= a
        s[:, j] = neg
        s[i, :] = np.minimum(s[i, :], s[j, :])
        if a <= 0:
            s[i, same] = neg
        else:
            s[i, :] *= a
        s[j, :] = neg
        s[i, i] = neg
        # a ban is a −∞ in the reference code's matrix: the minimum carries it to the new node
        banned[:, i] |= banned[:, j]
        banned[i, :] |= banned[j, :]
        active[j] = False
        if strict:
            shared = int(sets[i] & sets[j])
            for m in range(n_models):
                if shared >> m & 1:
                    budget[m] -= 1
            sets[i] |= sets[j]
        elif oi == oj:  # a merge inside one model spends its budget; at 0 such merges are banned
            budget[oi] -= 1
            if budget[oi] <= 0:
                sel = active & (origin == oi)
                banned[np.ix_(sel, sel)] = True
        if group is not None and group[i] == group[j]:
            group_budget[group[i]] -= 1
            if group_budget[group[i]] <= 0:
                sel = active & (group == group[i])
                banned[np.ix_(sel, sel)] = True


def _unmerge_from(members: list[list[int]], order: list[int], n: int, n_models: int) -> list[torch.Tensor]:
    u = torch.zeros(n * n_models, len(order), dtype=torch.float64)
    for c, node in enumerate(order):
        u[members[node], c] = 1.0
    return list(u.split(n, dim=0))


def zip_units(
    sim: torch.Tensor,
    n: int,
    n_models: int,
    *,
    a: float = 0.5,
    b: float = 1.0,
    reduce: float | None = None,
    strict: bool = False,
    eps: float = 0.0,
) -> tuple[Transform, float]:
    """ZipIt's greedy matching (``match_tensors_zipit``; MuDSC ``default_fusion_weight``) on the
    similarity of the N·n units: repeatedly merge the most similar pair of nodes (complete linkage:
    a merged node's similarity is the minimum of its members'), decayed by ``a`` after each merge
    (a ≤ 0: the new node may not merge with either model again), until n' = ``zip_width`` nodes
    remain. Merges inside one model are limited to int((to_remove // N)·``b``) per model; as in
    the reference code the ban applies once a budget has dropped to ≤ 0, so with b = 0 each model
    still makes one in-model merge — ``strict`` bans them from the start. Returns the transform
    and the mean similarity of the merged pairs.

    ``eps``: added to the merge matrices' column sums (the reference code's 1e-5; 0 gives exact
    means). Deviation: with a ≤ 0 the ban uses each node's current model, where the reference
    code indexes the original row ranges of the shrunken matrix."""
    s = _check(sim, n, n_models).copy()
    big = n * n_models
    np.fill_diagonal(s, -np.inf)
    width = zip_width(n, n_models, reduce)
    origin = np.repeat(np.arange(n_models), n)
    to_remove = big - width
    budget = np.full(n_models, int((to_remove // n_models) * b + 1e-4))
    banned = np.zeros((big, big), dtype=bool)
    active = np.ones(big, dtype=bool)
    members = [[i] for i in range(big)]
    values: list[float] = []
    relaxed: list[int] = []
    _zip_core(
        s,
        origin,
        to_remove,
        a,
        budget,
        active=active,
        members=members,
        values=values,
        banned=banned,
        relaxed=relaxed,
        strict=strict,
    )
    order = [i for i in range(big) if active[i]]
    unmerge = _unmerge_from(members, order, n, n_models)
    score = sum(values) / max(len(values), 1e-7)
    return Transform.from_unmerge(unmerge, eps=eps), score


def zip_blocks(
    sims: Sequence[torch.Tensor],
    n: int | Sequence[int],
    n_models: int,
    blocks: int,
    *,
    a: float = 0.5,
    b: float = 1.0,
    b_group: float = 1.0,
    reduce: float | None = None,
    strict: bool = False,
    eps: float = 0.0,
) -> tuple[list[Transform], float]:
    """Zip in blocks (MuDSC ``default_group_fusion_weight``): every block of the anchor is paired
    with one block of each other model (Hungarian on the blocks' mean matched similarity; tied
    groups pair on the sum of their scores), then each block set is zipped on its own — merges
    restricted to its N·k units — down to int(N·k·(1 − r)) units, with the per-model budget and a
    per-block budget int(to_remove·b_group // (N·g)); merged units come out block set by block
    set, so merged block s is block set s."""
    sizes = list(n) if isinstance(n, Sequence) else [n] * len(sims)
    mats = [_check(sm, k, n_models) for sm, k in zip(sims, sizes, strict=True)]
    pairing = [[bs] for bs in range(blocks)]  # per anchor block: the block of each model, flat ids
    for m in range(1, n_models):
        total = np.zeros((blocks, blocks))
        for s, k in zip(mats, sizes, strict=True):
            size = k // blocks
            a_blk = s[:k, m * k : (m + 1) * k]
            for bs in range(blocks):
                for bt in range(blocks):
                    _, mean = _assign(a_blk[bs * size : (bs + 1) * size, bt * size : (bt + 1) * size])
                    total[bs, bt] += mean
        order, _ = _assign(total)
        for bs in range(blocks):
            pairing[bs].append(int(order[bs]) + m * blocks)
    transforms, scores = [], []
    for s0, k in zip(mats, sizes, strict=True):
        size = k // blocks
        big = k * n_models
        s = s0.copy()
        np.fill_diagonal(s, -np.inf)
        origin = np.repeat(np.arange(n_models), k)
        group = np.repeat(np.arange(n_models * blocks), size)
        per_set = int(size * n_models * (1 - (1.0 - 1.0 / n_models if reduce is None else reduce)) + 1e-4)
        width = blocks * per_set
        to_remove = big - width
        budget = np.full(n_models, int((to_remove // n_models) * b + 1e-4))
        group_budget = np.full(n_models * blocks, int(to_remove * b_group // (n_models * blocks) + 1e-4))
        banned = np.zeros((big, big), dtype=bool)
        active = np.ones(big, dtype=bool)
        members = [[i] for i in range(big)]
        values: list[float] = []
        relaxed: list[int] = []
        for bset in pairing:
            inside = np.isin(group, bset)
            allowed = inside[:, None] & inside[None, :]
            _zip_core(
                s,
                origin,
                size * n_models - per_set,
                a,
                budget,
                allowed=allowed,
                group=group,
                group_budget=group_budget,
                active=active,
                members=members,
                values=values,
                banned=banned,
                relaxed=relaxed,
                strict=strict,
            )
        order = [i for bset in pairing for g in bset for i in range(big) if active[i] and group[i] == g]
        transforms.append(Transform.from_unmerge(_unmerge_from(members, order, k, n_models), eps=eps))
        scores.append(sum(values) / max(len(values), 1e-7))
    return transforms, float(np.mean(scores))
