"""Magnitude pruning of task vectors, then task arithmetic (TIES without sign election)."""

from __future__ import annotations

import torch

from alloykit.methods.base import Param, TensorContext, merge_method
from alloykit.methods.primitives import (
    LAMBDA,
    WEIGHT,
    ModelTopK,
    density_param,
    elect_and_combine,
    scale_search,
    stack_weights,
    topk_rule_ignored,
    trim_task_vectors,
    trims_elementwise,
)


@merge_method(
    "magnitude_prune",
    search=scale_search(3),
    params=[
        WEIGHT,
        density_param(0.2, "fraction of entries of each task vector kept"),
        LAMBDA,
        Param(
            "topk",
            str,
            "tensor",
            choices=("tensor", "model"),
            help="trim per tensor, or per task over the whole model",
        ),
        Param(
            "topk_rule",
            str,
            "exact",
            choices=("exact", "kthvalue"),
            help="per-tensor trim: exactly k entries, or |δ| ≥ k-th value",
        ),
        Param(
            "rescale",
            str,
            "none",
            choices=("none", "l1"),
            help="restore each trimmed task vector's L1 norm",
        ),
        Param("normalize", bool, False, help="divide by Σ w_t"),
    ],
    needs_base=True,
    presets={"paper": {}},
    default_preset="paper",
    reduction=ModelTopK(),
    memory_factor=3.0,
    elementwise=trims_elementwise,
    ignores=topk_rule_ignored,
)
def magnitude_prune(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    weight: list[float],
    density: list[float],
    lambda_: float,
    topk: str,
    topk_rule: str,
    rescale: str,
    normalize: bool,
) -> torch.Tensor:
    """θ = θ_0 + λ Σ_t w_t trim(τ_t): each task vector keeps its ``density`` largest-|τ| entries.

    The trimming baseline of the TIES paper's ablations (trim, no election), and mergekit's
    generalized task arithmetic with ``sparsification_method: magnitude`` and no consensus.
    """
    raw = trim_task_vectors(tensors, base, ctx, density, topk, topk_rule, rescale, release_inputs=True)
    w = stack_weights(weight, raw)
    mixed = elect_and_combine(raw * w, w, consensus=None, aggregate="weighted_mean" if normalize else "sum")
    if lambda_ != 1:
        mixed *= lambda_
    return base + mixed
