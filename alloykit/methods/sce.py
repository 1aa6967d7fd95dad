"""SCE (FuseChat): Select the entries where the task vectors vary most, Calculate per-model
weights from their energy, Erase entries whose sign disagrees with the majority, then fuse."""

from __future__ import annotations

import torch

from alloykit.methods.base import Param, TensorContext, merge_method


def select_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 at the top ``fraction`` of the entries with non-zero variance across models, by variance.

    k = int(#{Var ≠ 0} · fraction), picked by ``torch.topk`` (ties as topk breaks them), as
    mergekit 0.1.5 ``sce.sce_mask``; returned in the deltas' dtype."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    if fraction >= 1:
        return torch.ones_like(deltas[0])
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    if k == 0:
        return torch.zeros_like(var)
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask = torch.zeros_like(var)
    mask.view(-1)[indices] = 1
    return mask


def energy_weights(deltas: torch.Tensor) -> torch.Tensor:
    """η_t = mean(τ_t²) / Σ_s mean(τ_s²); 1/T when the sum is below 1e-6 (mergekit's ``sce_weight``)."""
    weights = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


@merge_method(
    "sce",
    params=[
        Param(
            "select_topk",
            float,
            1.0,
            ge=0.0,
            le=1.0,
            help="fraction of the entries with non-zero variance across the task vectors that is "
            "kept, those of largest variance (1: all)",
        ),
    ],
    needs_base=True,
    presets={"mergekit": {}},
    default_preset="mergekit",
    min_models=1,
    memory_factor=5.0,
    elementwise=False,  # variance ranks and per-model energies over the whole tensor
)
def sce(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    select_topk: float,
) -> torch.Tensor:
    """SCE (Wan et al. 2024, FuseChat): θ = θ_0 + Σ_t η_t e_t τ̂_t / max(Σ_t η_t e_t, 1e-6).

    θ = θ_0 + Σ_t η_t e_t ⊙ τ̂_t / max(Σ_t η_t e_t, 1e-6) (Wan et al. 2024, "FuseChat: Knowledge
    Fusion of Chat Models", §SCE; mergekit 0.1.5 ``merge_methods/sce.py``, whose operations and
    order are followed in the compute dtype):

    * Select: τ̂_t = m ⊙ τ_t, m = 1 on the top ``select_topk`` fraction (of the entries whose
      variance across the T task vectors is non-zero) by variance (population variance);
      ``select_topk`` = 1 keeps every entry, 0 none.
    * Calculate: η_t = mean(τ̂_t²) / Σ_s mean(τ̂_s²) (1/T when that sum is below 1e-6).
    * Erase: e_t = 1 where sign(τ̂_t) equals the majority sign, sign(Σ_t τ̂_t) with 0 → +
      (zeros never agree), else 0.

    mergekit's ``int8_mask`` changes only the dtype of its masks, not the result (a recipe's
    ``int8_mask`` is accepted and dropped). The range check on ``select_topk`` is alloykit's:
    mergekit treats values below 0 as 0 and above 1 as 1.
    """
    deltas = torch.stack([x - base for x in tensors], dim=0)
    if select_topk < 1:
        deltas = deltas * select_mask(deltas, select_topk).unsqueeze(0)
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    erase = deltas.sign() == majority
    weights = energy_weights(deltas)
    while weights.dim() < deltas.dim():
        weights = weights.unsqueeze(-1)
    kept = weights * erase
    merged = (deltas * kept).sum(dim=0)
    return base + merged / torch.sum(kept, dim=0).clamp(min=1e-6)
