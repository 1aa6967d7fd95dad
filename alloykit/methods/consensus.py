"""Consensus merging (TALL masks): keep only the entries that at least k tasks rely on."""

from __future__ import annotations

from typing import Any

import torch

from alloykit.methods.base import Param, TensorContext, merge_method
from alloykit.methods.primitives import (
    LAMBDA,
    ModelTopK,
    density_param,
    elect_and_combine,
    scale_search,
    stack_weights,
    trim_task_vectors,
)


def tall_masks(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    multi: torch.Tensor,
    tall_mask_lambda: list[float],
    compare: str,
) -> torch.Tensor:
    """(T, …) bool: m_t = |θ_0 − θ_t| > λ_t · |θ_MTL − θ_t| with θ_MTL = θ_0 + τ_MTL, i.e.
    |τ_t| > λ_t |τ_MTL − τ_t| (``>=`` with ``compare="inclusive"``), computed on the weights as
    the reference code does (``generate_task_masks``)."""
    theta_mtl = base + multi
    out = torch.empty((len(tensors), *base.shape), dtype=torch.bool, device=base.device)
    for t, x in enumerate(tensors):
        own = (base - x).abs()
        rest = (theta_mtl - x).abs() * tall_mask_lambda[t]
        out[t] = own > rest if compare == "strict" else own >= rest
    return out


def _ties_vector(tensors: list[torch.Tensor], base: torch.Tensor, ctx: TensorContext, params: dict) -> Any:
    """TIES-merged task vector of the reference code (``ties_merging``): whole-model top-k
    trim, sign of the sum, model-majority fallback for a zero sign, disjoint sum or mean."""
    raw = trim_task_vectors(tensors, base, ctx, params["density"], "model", "kthvalue")
    majority = ctx.stats["majority_sign"]
    # As in ties.py: a zero majority makes where(γ > 0, τ > 0, τ < 0) keep negative entries.
    fallback = majority if majority != 0 else -1.0
    ones = stack_weights([1.0] * len(tensors), raw)
    return elect_and_combine(
        raw, ones, consensus="sign", sign="sum", zero_sign=fallback, aggregate=params["aggregate"], raw=raw
    )


def _elected(tensors: list[torch.Tensor], base: torch.Tensor, state: Any, params: dict[str, Any]) -> Any:
    """Elected sign before the zero fallback, for the model-wide majority pass."""
    raw = trim_task_vectors(
        tensors, base, TensorContext("", stats=state), params["density"], "model", "kthvalue"
    )
    return raw.sum(dim=0).sign()


class ConsensusStats(ModelTopK):
    """With ``combine="ties"``: the TIES reference code's whole-model statistics (per-task top-k
    thresholds, then the sum of elected signs); none with ``combine="ta"``."""

    def __init__(self) -> None:
        super().__init__(
            elected_sign=_elected,
            wide={"density": "combine: ties trims each task vector over the whole model, with one density"},
        )

    def _threshold_passes(self, params: dict[str, Any]) -> int:
        return 2 if params["combine"] == "ties" else 0

    def passes(self, params: dict[str, Any]) -> int:
        return 3 if params["combine"] == "ties" else 0


@merge_method(
    "consensus",
    search=scale_search(1.5),
    params=[
        Param(
            "tall_mask_lambda",
            float,
            0.4,
            per_model=True,
            ge=0.0,
            help="λ_t of task t's TALL mask (reference code: tuned per task on validation data over 0.2–0.6)",
        ),
        Param(
            "k",
            int,
            2,
            ge=0,
            help="keep entries that at least k TALL masks select (2: drop catastrophic and selfish "
            "weights; 1: only catastrophic; 0: plain TA/TIES)",
        ),
        LAMBDA,
        Param(
            "combine",
            str,
            "ta",
            choices=("ta", "ties"),
            help="multi-task vector: task arithmetic Σ τ_t, or TIES (TALL masks built from it too)",
        ),
        density_param(0.2, "combine='ties': fraction of each task vector kept by the whole-model trim"),
        Param(
            "aggregate",
            str,
            "sum",
            choices=("sum", "mean"),
            help="combine='ties': disjoint sum (consensus code) or disjoint mean of agreeing entries",
        ),
        Param(
            "compare",
            str,
            "strict",
            choices=("strict", "inclusive"),
            help="TALL mask |τ_t| > λ_t|τ_MTL − τ_t| (reference code) or ≥ (the formula as written)",
        ),
    ],
    needs_base=True,
    presets={"paper": {}},
    default_preset="paper",
    reduction=ConsensusStats(),
    memory_factor=4.0,
    elementwise=True,
)
def consensus(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    tall_mask_lambda: list[float],
    k: int,
    lambda_: float,
    combine: str,
    density: list[float],
    aggregate: str,
    compare: str,
) -> torch.Tensor:
    """θ = θ_0 + λ · (1[Σ_t m_t ≥ k] ⊙ τ_MTL): keep what ≥ k tasks' TALL masks select (Wang et al. 2024).

    Consensus TA / Consensus TIES of "Localizing task information for improved model merging and
    compression" (ICML 2024).

    τ_MTL is the multi-task vector: Σ_t τ_t (``combine="ta"``) or the TIES merge of the τ_t
    (``combine="ties"``: whole-model top-``density`` trim, sign of the sum with the model-majority
    fallback, disjoint ``aggregate``). Task t's TALL mask is m_t = |τ_t| > λ_t |τ_MTL − τ_t|,
    computed per entry as the reference code does, from the weights
    (|θ_0 − θ_t| > λ_t |(θ_0 + τ_MTL) − θ_t|); the consensus mask keeps the entries at least k
    tasks select. Every rule is per entry, so the method streams in slices; with
    ``combine="ties"`` the trim thresholds and the majority sign are whole-model statistics
    (three streaming passes, exact, as in ``ties``).

    Source: ``nik-dim/tall_masks`` (``src/eval/aggregation.py::create_task_vector``,
    ``src/utils/tallmask_utils.py``, ``config/method/consensus.yaml``), reimplemented the same
    way in ``AntoAndGar/task_singular_vectors``: k = ``prun_thre_k`` = 2; TIES variant = TIES
    with top 20 % and disjoint *sum* (``merge_func="dis-sum"``), the TALL masks built against
    that TIES vector, the consensus mask applied to the merged vector (after TIES, not before).
    The TALL-mask comparison is strict (``>``) in the code; ``compare="inclusive"`` gives the ≥
    of the formula as usually written. The code picks λ_t per task from {0.2, …, 0.6} by
    validation accuracy and λ (the scale α) by validation too; without data we default to
    λ_t = 0.4 (the middle of that grid) and λ = 1.0 (as ``task_arithmetic``).

    With k = 0 (or λ_t = 0 and k = 1) this is task arithmetic (``combine="ta"``) or TIES with a
    disjoint sum; with one model and k = 2 nothing is kept and the base comes back.
    """
    params = {"density": density, "aggregate": aggregate}
    if combine == "ties":
        multi = _ties_vector(tensors, base, ctx, params)
    else:
        multi = torch.stack([x - base for x in tensors]).sum(dim=0)
    if k > 0:
        votes = tall_masks(tensors, base, multi, tall_mask_lambda, compare).sum(dim=0)
        multi = multi * (votes >= k)
    if lambda_ != 1:
        multi = lambda_ * multi
    return base + multi
