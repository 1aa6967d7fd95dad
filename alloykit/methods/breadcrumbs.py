"""Model Breadcrumbs: drop each task vector's largest outliers and its smallest entries, then add
(``breadcrumbs``) or TIES-merge (``breadcrumbs_ties``) what is left."""

from __future__ import annotations

from typing import Any

import torch

from alloykit.methods._sparsify import outlier_mask_rows, outlier_mask_tensor
from alloykit.methods.base import Param, TensorContext, merge_method
from alloykit.methods.primitives import (
    LAMBDA,
    WEIGHT,
    density_param,
    rescale_l1,
    scale_search,
    weighted_merge,
)

# Declared defaults are the paper preset's. density: the reference code's hyper-parameter search
# starts at β = 0.15 kept (range 0.05–0.20; find_best_hyperparam.py, method middle_keep); γ = 0.01
# is mergekit's default and the top of the reference's search range (0.001–0.01).
PARAMS = [
    WEIGHT,
    density_param(0.15, "fraction of each task vector kept after dropping the outliers"),
    Param(
        "gamma",
        float,
        0.01,
        per_model=True,
        ge=0.0,
        le=1.0,
        help="fraction of entries dropped from the top of |τ| (outliers) before the small ones",
    ),
    LAMBDA,
    Param(
        "scope",
        str,
        "row",
        choices=("row", "tensor"),
        help="masks per row along the last axis, two top-k passes (reference code), or over the "
        "whole tensor by one sort (mergekit)",
    ),
    Param(
        "rescale",
        str,
        "none",
        choices=("none", "l1"),
        help="restore each masked task vector's L1 norm (mergekit's rescale)",
    ),
    Param(
        "aggregate",
        str,
        "sum",
        choices=("sum", "weighted_mean"),
        help="Σ w τ̂ (paper), or Σ w τ̂ / Σ w (mergekit's normalize; over agreeing entries for _ties)",
    ),
]
MERGEKIT = {"density": 1.0, "gamma": 0.01, "scope": "tensor", "rescale": "none", "aggregate": "sum"}


def _elementwise(p: dict[str, Any]) -> bool:
    """Masks need whole tensors (ranks), unless nothing is masked."""
    if p["scope"] == "tensor":
        return all(d >= 1 for d in p["density"])
    return all(d >= 1 for d in p["density"]) and all(g == 0 for g in p["gamma"])


def _rowwise(p: dict[str, Any]) -> bool:
    """Row masks (topk along each row) with no whole-tensor L1 rescale: each output row depends
    on the same rows of the inputs only, so the engine may stream whole rows."""
    return p["scope"] == "row" and p["rescale"] == "none"


def _masked(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    density: list[float],
    gamma: list[float],
    scope: str,
    rescale: str,
) -> torch.Tensor:
    """(T, …) task vectors, each masked (and optionally L1-rescaled), in the compute dtype."""
    out = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
    for i, x in enumerate(tensors):
        d = x - base
        if scope == "tensor":
            mask = outlier_mask_tensor(d, density[i], gamma[i])
        else:
            mask = outlier_mask_rows(d, density[i], gamma[i])
        if mask is not None:
            d = rescale_l1(d, mask) if rescale == "l1" else d * mask
        out[i] = d
    return out


def _combine(
    masked: torch.Tensor, base: torch.Tensor, weight: list[float], lambda_: float, aggregate: str, ties: bool
) -> torch.Tensor:
    return weighted_merge(masked, base, weight, lambda_, elect=ties, aggregate=aggregate)


_DOC = """

    Mask (per model t, per tensor): drop the γ_t fraction of entries of largest |τ_t| (outliers),
    then keep the ``density`` fraction of largest |τ_t| among the rest; the others become 0.

    * ``scope="row"`` (paper preset; ``rezazzr/breadcrumbs``, ``src/task_vectors.py:
      TaskVectorMiddleKeep``): per row along the last axis, int(n·γ) dropped and int(n·density)
      kept with ``torch.topk``; 1-D tensors are one row, 0-D ones are kept whole. Deviation:
      tensors of 3 or more dimensions are taken as out × rest rows. With density 1 and γ > 0 the
      outliers are still dropped.
    * ``scope="tensor"`` (mergekit 0.1.5 ``sparsify.magnitude_outliers``): over the whole tensor,
      exactly int(density·N) entries kept by one ascending ``torch.sort``; when that and int(γ·N)
      outliers do not fit, fewer outliers are dropped. density ≥ 1 keeps τ unchanged (γ ignored).

    ``rescale="l1"`` multiplies a masked τ by ‖τ‖₁/‖masked τ‖₁ (mergekit's ``rescale``, off by
    default in both presets). Weights multiply the masked τ_t (the paper has none; unit weights
    change nothing). λ: the reference code's α (its search starts at 0.2); default 1.0, mergekit's.
    Defaults: paper preset density 0.15 (the reference's search start; range 0.05–0.20) and
    γ = 0.01; ``mergekit`` preset density 1.0, γ 0.01, ``normalize`` false (``aggregate="sum"``),
    even for ``breadcrumbs_ties``, as mergekit.
    """


def _memory_factor(params: dict[str, Any]) -> float:
    """Working copies per input: the masks sort |τ| (the whole tensor, or top-k per row), holding
    int64 indices and the sort's buffers beside the float32 copies: ~8 while any density < 1."""
    return 8.0 if any(d < 1 for d in params["density"]) or any(g > 0 for g in params["gamma"]) else 4.0


@merge_method(
    "breadcrumbs",
    search=scale_search(4),
    params=PARAMS,
    needs_base=True,
    presets={"paper": {}, "mergekit": MERGEKIT},
    default_preset="paper",
    memory_factor=_memory_factor,
    elementwise=_elementwise,
    rowwise=_rowwise,
)
def breadcrumbs(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    lambda_: float,
    scope: str,
    rescale: str,
    aggregate: str,
) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): θ = θ_0 + λ Σ_t w_t m_t ⊙ τ_t, outliers masked.

    θ = θ_0 + λ Σ_t w_t m_t ⊙ τ_t (Davari & Belilovsky 2024, "Model Breadcrumbs", ECCV).

    ``aggregate="weighted_mean"`` divides the sum by Σ_t w_t (|Σ w| < 1e-8 → 1), as mergekit's
    ``normalize``."""
    masked = _masked(tensors, base, density, gamma, scope, rescale)
    return _combine(masked, base, weight, lambda_, aggregate, ties=False)


@merge_method(
    "breadcrumbs_ties",
    search=scale_search(4),
    params=PARAMS,
    needs_base=True,
    presets={"paper": {}, "mergekit": MERGEKIT},
    default_preset="paper",
    memory_factor=_memory_factor,
    elementwise=_elementwise,
    rowwise=_rowwise,
)
def breadcrumbs_ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    lambda_: float,
    scope: str,
    rescale: str,
    aggregate: str,
) -> torch.Tensor:
    """Breadcrumbs masks (Davari & Belilovsky 2024), then a TIES sign election: mergekit's variant.

    θ = θ_0 + λ Σ_t [sign(w_t τ̂_t) = γ] w_t τ̂_t with τ̂_t = m_t ⊙ τ_t (the paper has no TIES
    variant; this is mergekit's ``breadcrumbs_ties``).

    Election as mergekit: γ = sign(Σ_t w_t τ̂_t) per entry, 0 → +; entries whose sign(w_t τ̂_t)
    differs (and zeros) are left out. ``aggregate="weighted_mean"`` divides by the Σ w_t of the
    agreeing entries (0 → 1). Both presets elect this way; they differ in the mask only."""
    masked = _masked(tensors, base, density, gamma, scope, rescale)
    return _combine(masked, base, weight, lambda_, aggregate, ties=True)


breadcrumbs.fn.__doc__ = (breadcrumbs.fn.__doc__ or "") + _DOC
breadcrumbs_ties.fn.__doc__ = (breadcrumbs_ties.fn.__doc__ or "") + _DOC
