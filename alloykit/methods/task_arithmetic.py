"""Task arithmetic: add the (weighted) sum of task vectors to the base."""

from __future__ import annotations

import torch

from alloykit.methods.base import Param, TensorContext, merge_method
from alloykit.methods.primitives import LAMBDA, WEIGHT, elect_and_combine, scale_search, stack_weights


@merge_method(
    "task_arithmetic",
    search=scale_search(1.5),
    params=[
        WEIGHT,
        LAMBDA,
        Param("normalize", bool, False, help="divide the sum by Σ w_t"),
    ],
    needs_base=True,
    presets={"paper": {}, "mergekit": {}},
    default_preset="paper",
    memory_factor=2.0,
    elementwise=True,
)
def task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    weight: list[float],
    lambda_: float,
    normalize: bool,
) -> torch.Tensor:
    """θ = θ_0 + λ Σ_t w_t τ_t with τ_t = θ_t − θ_0 (Ilharco et al. 2023, "Editing models with
    task arithmetic"); ``normalize`` divides Σ_t w_t τ_t by Σ_t w_t.

    The paper tunes λ on validation data (0.3–0.4 is typical for 8 ViT tasks); the default 1.0
    is mergekit's. Both presets are the same arithmetic, done in mergekit 0.1.5's order
    (stack, scale by w, sum, divide, scale by λ, add), so they give mergekit's tensors.
    """
    deltas = torch.stack([x - base for x in tensors])
    w = stack_weights(weight, deltas)
    deltas.mul_(w)
    mixed = elect_and_combine(deltas, w, consensus=None, aggregate="weighted_mean" if normalize else "sum")
    if lambda_ != 1:
        mixed *= lambda_
    return base + mixed
