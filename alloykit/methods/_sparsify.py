"""Sparsifiers of the mergekit family: Model Breadcrumbs' outlier-and-small-value masks and
DELLA's MAGPRUNE (rank-linear keep probabilities), each in the authors' reference-code form and in
mergekit 0.1.5's form (``mergekit/sparsify.py``).

Shared by :mod:`alloykit.methods.breadcrumbs` and :mod:`alloykit.methods.della`. Notation: δ is
one model's task vector for one tensor.
"""

from __future__ import annotations

import torch

from alloykit.errors import ParameterError
from alloykit.methods.primitives import restore_l1_

# ----------------------------------------------------------------------------- Breadcrumbs


def outlier_mask_tensor(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """mergekit's ``magnitude_outliers`` mask over the whole tensor (``None``: keep everything).

    With N = numel, k = int(density·N), n_top = int(γ·N): sort |δ| ascending (as float32, with
    ``torch.sort``) and keep the entries ranked n_bot … n_bot + k − 1, n_bot = max(0, N − k − n_top).
    So exactly k entries are kept; when k + n_top > N fewer than n_top outliers are dropped."""
    if density >= 1:
        return None
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    order = torch.sort(delta.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bot : n_bot + keep]] = 1
    return mask.reshape(delta.shape)


def outlier_mask_rows(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """The Breadcrumbs reference code's mask (``rezazzr/breadcrumbs``, ``src/task_vectors.py:
    TaskVectorMiddleKeep`` with ``remove_first=True``), row by row (``None``: keep everything).

    Along the last axis (n entries per row): drop the int(n·γ) largest |δ| (``torch.topk``), then
    keep the int(n·density) largest |δ| of what is left (the dropped entries, now 0, rank last).
    1-D tensors are one row; 0-D tensors are kept whole, as in the reference. Tensors of 3 or more
    dimensions (conv kernels) are taken as out × rest rows: a deliberate deviation, the reference
    would take rows along the kernel's last spatial axis."""
    if delta.dim() == 0:
        return None
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() >= 3 else delta
    n = rows.shape[-1]
    if density >= 1 and int(n * gamma) == 0:
        return None
    axis = rows.dim() - 1
    remove = torch.ones(rows.shape, dtype=delta.dtype, device=delta.device)
    _, top = torch.topk(rows.abs(), int(n * gamma))
    remove.scatter_(axis, top, 0.0)
    kept = torch.zeros(rows.shape, dtype=delta.dtype, device=delta.device)
    _, top = torch.topk((rows * remove).abs(), int(n * density))
    kept.scatter_(axis, top, 1.0)
    return (kept * remove).reshape(delta.shape)


# ----------------------------------------------------------------------------- DELLA / MAGPRUNE


def check_magprune_window(densities: list[float], epsilons: list[float], where: str) -> None:
    """mergekit's rule: when 0 < density < 1, both density − ε and density + ε must lie in (0, 1)
    (keep probabilities must be probabilities)."""
    for i, (d, e) in enumerate(zip(densities, epsilons, strict=True)):
        if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
            raise ParameterError(
                f"{where}, model {i}: density {d!r} ± epsilon {e!r} = [{d - e:.6g}, {d + e:.6g}] is not "
                "allowed; expected 0 < density − epsilon and density + epsilon < 1"
            )


def magprune_work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype MAGPRUNE computes in on CPU, in both codes: bfloat16 stays, the rest is float32."""
    return dtype if dtype == torch.bfloat16 else torch.float32


_RANK_BLOCK = 1 << 20  # entries ranked at a time (their int64 sort order is 8 bytes each)


def _as_rows(delta: torch.Tensor, rows: str) -> torch.Tensor:
    if delta.dim() < 2:
        return delta.reshape(1, -1)
    if delta.dim() > 2 and rows == "out":
        return delta.reshape(delta.shape[0], -1)
    return delta  # 2-D, or mergekit's ranking along dim 1 of an N-D tensor


def magprune_probabilities(
    delta: torch.Tensor, density: float, epsilon: float, convention: str
) -> torch.Tensor:
    """Keep probabilities of MAGPRUNE, shaped like the rows :func:`magprune` works on.

    Per row, rank |δ| ascending (``argsort``; r = 1 … n), r̂ = (r − min r)/(max r − min r) and
    p = (density − ε) + r̂·2ε: the smallest entry is kept with probability density − ε, the largest
    with density + ε. ``convention``:

    * ``"reference"`` (``declare-lab/della``, ``mergekit/sparsify.py: rank_magnitude``): ranks
      1 … n converted to the work dtype, p = (d − ε) + r̂·(2ε); tensors of 3 or more dimensions
      as out × rest rows (the reference handles only 1-D and 2-D tensors).
    * ``"mergekit"`` (mergekit 0.1.5 ``della_magprune``): 0-based ranks converted, then + 1,
      r̂ clamped to [0, 1], p = (d − ε) + r̂·2·ε; N-D tensors ranked along dim 1.

    In float32 both give the same numbers; in bfloat16 the rank rounding differs. A row of one
    entry (0/0 in both codes) gets r̂ = ½, i.e. p = density."""
    work = magprune_work_dtype(delta.dtype)
    rows = _as_rows(delta, "out" if convention == "reference" else "dim1")
    n = rows.shape[1]
    # The rank of each entry is the inverse of its row's argsort permutation: scattered from the
    # sort order (linear) instead of a second argsort, in blocks of rows so that the int64 sort
    # order never covers the whole tensor (each row's sort is the same whatever the block).
    if convention == "reference":
        rank_values = torch.arange(1, n + 1, device=delta.device).to(work)  # (order + 1).to(work)
    else:
        rank_values = torch.arange(n, device=delta.device).to(work) + 1  # order.to(work) + 1
    rank_values = rank_values.view(1, n, *([1] * (rows.dim() - 2)))
    ranks = torch.empty(rows.shape, dtype=work, device=delta.device)
    per_row = max(1, rows[0].numel()) if rows.shape[0] else 1
    step = max(1, _RANK_BLOCK // per_row)
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        order = torch.argsort(block.abs(), dim=1, descending=False)
        ranks[start : start + step].scatter_(1, order, rank_values.expand(order.shape))
        del order
    lo = ranks.amin(dim=1, keepdim=True)  # (= min/max(...).values; amin/amax skip the indices)
    hi = ranks.amax(dim=1, keepdim=True)
    scaled = ranks.sub_(lo).div_(hi - lo)  # in place: (ranks − lo) / (hi − lo)
    if convention == "reference":
        scaled.masked_fill_(hi <= lo, 0.5)  # torch.where(hi > lo, scaled, 0.5)
        return scaled.mul_(2 * epsilon).add_(density - epsilon)  # (d − ε) + r̂·(2ε)
    scaled.clamp_(0, 1).masked_fill_(hi <= lo, 0.5)
    return scaled.mul_(2).mul_(epsilon).add_(density - epsilon)  # (d − ε) + r̂·2·ε


def magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: str,
    convention: str,
    generator: torch.Generator,
    inplace: bool = False,
) -> torch.Tensor:
    """δ with entries dropped by MAGPRUNE and the survivors rescaled; returned in δ's dtype.

    density ≥ 1 keeps δ, density ≤ 0 gives zeros (mergekit's rule; the reference would fail).
    m ~ Bernoulli(p) drawn with ``generator``; ``rescale``: ``inverse`` (m⊙δ/p, the paper's
    1/(1 − p_drop), reference code), ``l1`` (m⊙δ·‖δ‖₁/‖m⊙δ‖₁, mergekit), ``none``.

    With ``inplace`` (δ already in the work dtype, contiguous) the result is written over δ.
    The mask is drawn one block of entries at a time and applied at once, never held whole:
    CPU Bernoulli draws take the generator's numbers entry after entry, so the blocks draw the
    mask one whole draw would (the l1 norms are still summed over the whole tensor)."""
    if density >= 1 or delta.numel() == 0:
        return delta
    if density <= 0:
        return delta.zero_() if inplace else torch.zeros_like(delta)
    work = magprune_work_dtype(delta.dtype)
    if inplace and (work != delta.dtype or not delta.is_contiguous()):
        raise ValueError(f"MAGPRUNE in place needs a contiguous {work} tensor, got {delta.dtype}")
    probs = magprune_probabilities(delta, density, epsilon, convention).to(work)
    rows = _as_rows(delta, "out" if convention == "reference" else "dim1")
    if not inplace:
        rows = rows.to(work, memory_format=torch.contiguous_format, copy=True)
    l1_before = rows.abs().sum() if rescale == "l1" else None
    flat, flat_probs = rows.view(-1), probs.view(-1)
    if flat.numel() <= _RANK_BLOCK:  # one draw of the probabilities as shaped, as the codes draw
        parts = [(rows, probs)]
    else:
        blocks = range(0, flat.numel(), _RANK_BLOCK)
        parts = [(flat[i : i + _RANK_BLOCK], flat_probs[i : i + _RANK_BLOCK]) for i in blocks]
    for part, part_probs in parts:
        # δ·m (= m·δ, the codes' order: a product is the same either way), then ÷ p for inverse
        part.mul_(torch.bernoulli(part_probs, generator=generator))
        if rescale == "inverse":
            part.div_(part_probs)
    if l1_before is not None:
        restore_l1_(rows, l1_before)
    return rows.to(delta.dtype).reshape(delta.shape)
