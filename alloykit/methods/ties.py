"""TIES-Merging: trim each task vector, elect a sign per entry, merge the agreeing entries."""

from __future__ import annotations

from typing import Any

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


def _elected(
    tensors: list[torch.Tensor], base: torch.Tensor, state: Any, params: dict[str, Any]
) -> torch.Tensor:
    """Elected sign before the zero fallback (used by the model-wide majority pass)."""
    ctx = TensorContext("", stats=state)
    raw = trim_task_vectors(
        tensors,
        base,
        ctx,
        params["density"],
        params["topk"],
        params["topk_rule"],
        params["rescale"],
    )
    weighted = raw * stack_weights(params["weight"], raw)
    if params["sign"] == "sum":
        return raw.sum(dim=0).sign()
    if params["sign"] == "count":
        return weighted.sign().sum(dim=0).sign()
    return weighted.sum(dim=0).sign()


PAPER = {}  # the declared defaults are the reference code's
MERGEKIT = {
    "density": 1.0,
    "topk": "tensor",
    "topk_rule": "exact",
    "sign": "weighted_sum",
    "zero_sign": "positive",
    "aggregate": "weighted_mean",
}


@merge_method(
    "ties",
    search=scale_search(4),
    params=[
        WEIGHT,
        density_param(0.2, "fraction of entries of each task vector kept (paper: top 20 %)"),
        LAMBDA,
        Param(
            "topk",
            str,
            "model",
            choices=("model", "tensor"),
            help="trim over the whole model per task (paper) or per tensor (mergekit)",
        ),
        Param(
            "topk_rule",
            str,
            "kthvalue",
            choices=("kthvalue", "exact"),
            help="per-tensor trim: |δ| ≥ k-th value (reference code) or exactly k (mergekit)",
        ),
        Param(
            "sign",
            str,
            "sum",
            choices=("sum", "weighted_sum", "count"),
            help="elect sign(Σ τ̂_t), sign(Σ w_t τ̂_t) or the majority of signs",
        ),
        Param(
            "zero_sign",
            str,
            "model_majority",
            choices=("model_majority", "positive"),
            help="sign used where the elected sum is 0",
        ),
        Param(
            "aggregate",
            str,
            "mean",
            choices=("mean", "weighted_mean", "sum"),
            help="disjoint mean (paper), Σ w τ̂ / Σ w over agreeing (mergekit), or sum",
        ),
        Param(
            "rescale",
            str,
            "none",
            choices=("none", "l1"),
            help="restore each trimmed task vector's L1 norm (mergekit's rescale)",
        ),
    ],
    needs_base=True,
    presets={"paper": PAPER, "mergekit": MERGEKIT},
    default_preset="paper",
    reduction=ModelTopK(elected_sign=_elected),
    memory_factor=4.0,
    elementwise=trims_elementwise,
    ignores=topk_rule_ignored,
)
def ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    weight: list[float],
    density: list[float],
    lambda_: float,
    topk: str,
    topk_rule: str,
    sign: str,
    zero_sign: str,
    aggregate: str,
    rescale: str,
) -> torch.Tensor:
    """θ = θ_0 + λ · merge_t(trim(τ_t)) (Yadav et al. 2023, "TIES-Merging", NeurIPS).

    1. Trim: keep the top ``density`` of |τ_t| (per task over the whole model, or per tensor).
    2. Elect: γ = sign(Σ_t τ̂_t) per entry; where that sum is 0, the reference code uses the sign
       of the sum of all elected signs over the model (``model_majority``), mergekit uses +.
    3. Disjoint merge over the tasks whose sign(w_t τ̂_t) = γ: mean over them (paper),
       Σ w_t τ̂_t / Σ w_t (mergekit's ``normalize``) or the plain sum.

    Presets: ``paper`` (default) follows the authors' code (``prateeksr/TIES-Merging``, also
    FusionBench): whole-model trim with ``|τ| ≥ kthvalue(d − int(d·density))`` (so ties at the
    threshold keep a few more than k), unweighted sign sum, disjoint mean, density 0.2.
    ``mergekit`` gives mergekit 0.1.5's ``ties``: per-tensor exact top-k by ``argsort``, sign of
    the weighted sum with 0 → +, weight-normalised mean, density 1.0. The paper tunes λ on
    validation data; the default is 1.0. Weights multiply τ̂_t before election in every preset
    (with unit weights, as in the paper, this changes nothing). ``topk_rule`` is ignored when
    ``topk="model"`` (the whole-model threshold always follows the reference code).
    """
    raw = trim_task_vectors(tensors, base, ctx, density, topk, topk_rule, rescale)
    w = stack_weights(weight, raw)
    deltas = raw if all(x == 1 for x in weight) else raw * w  # (× 1 is exact: skip the copy)
    if zero_sign == "positive":
        fallback = 1.0
    else:
        majority = ctx.stats["majority_sign"]
        # Reference code: a zero elected sign takes the model majority; if that is 0 too, its
        # where(γ > 0, τ > 0, τ < 0) keeps the negative entries, i.e. behaves as γ = −1.
        fallback = majority if majority != 0 else -1.0
    mixed = elect_and_combine(
        deltas, w, consensus="sign", sign=sign, zero_sign=fallback, aggregate=aggregate, raw=raw
    )
    if lambda_ != 1:
        mixed *= lambda_
    return base + mixed
