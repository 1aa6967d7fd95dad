"""Multi-SLERP: a weighted barycentre of any number of models (or task vectors) on the sphere, by
one step of the exponential map from their normalised weighted mean."""

from __future__ import annotations

from typing import Any

import torch

from alloykit.errors import ParameterError
from alloykit.methods.base import Param, TensorContext, merge_method


def _check_weights(params: dict[str, Any], where: str) -> None:
    """Normalising by weights that (nearly) cancel divides by ~0."""
    w = params["weight"]
    total, size = sum(w), sum(abs(x) for x in w)
    if params["normalize_weights"] and len(w) > 1 and abs(total) <= 1e-6 * size:
        raise ParameterError(
            f"multislerp{where}: the weights {w} sum to {total:.3g}, about 0 next to their sizes "
            f"(Σ|w| = {size:.3g}); normalize_weights would divide by it. Give weights with a clear "
            "non-zero sum, or normalize_weights: false"
        )


@merge_method(
    "multislerp",
    params=[
        Param(
            "weight",
            float,
            1.0,
            per_model=True,
            help="w_i, each model's share of the barycentre (a mergekit recipe must give them)",
        ),
        Param("normalize_weights", bool, True, help="divide the weights by their sum"),
        Param("eps", float, 1e-8, gt=0.0, help="added to norms before dividing by them"),
    ],
    needs_base=False,
    presets={"mergekit": {}},
    default_preset="mergekit",
    min_models=1,
    memory_factor=5.0,
    elementwise=False,  # needs whole-tensor norms
    check=_check_weights,
)
def multislerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    ctx: TensorContext,
    *,
    weight: list[float],
    normalize_weights: bool,
    eps: float,
) -> torch.Tensor:
    """Multi-SLERP: θ = θ_0 + (Σ w_i‖v_i‖)·exp_μ(Σ w_i P_μ(u_i)), u_i = v_i/‖v_i‖ (Goddard 2024).

    Each tensor is one flat vector; v_i = θ_i − θ_0 with a base, v_i = θ_i (and no θ_0) without
    (C. Goddard, "Multi-SLERP", goddard.blog, 2024; mergekit 0.1.5 ``merge_methods/multislerp.py``,
    the reference code, whose operations and order are followed in the compute dtype):

    * w_i ← w_i / Σ w (``normalize_weights``), as a tensor of the compute dtype;
    * u_i = v_i / (‖v_i‖ + eps); μ = Σ w_i u_i / ‖Σ w_i u_i‖ (the projection point);
    * tangent vectors P_μ(u_i) = u_i − ⟨u_i, μ⟩μ; s = Σ w_i P_μ(u_i), a = ‖s‖ + eps;
    * exp_μ(s) = μ cos a + s sin a / a, scaled by Σ w_i‖v_i‖.

    One model: θ_1 itself. When ‖Σ w_i u_i‖ < eps (antipodal vectors whose weights cancel): with
    two models, the linear Σ w_i v_i (+ θ_0), as mergekit; with more, an error naming the tensor.
    Deviation: where every v_i is exactly 0 (a tensor no fine-tune changed), the same linear
    formula for any number of models (the base; mergekit raises for three or more), and empty
    tensors are returned empty. mergekit requires ``weight``; alloykit's default is 1.0, and a
    mergekit recipe without weights is refused.
    """
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked -= base
    if stacked.numel() == 0:
        return stacked[0] if base is None else stacked[0] + base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(weight, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2 or bool((norms == 0).all()):
            out = stacked[0] * w[0]
            for i in range(1, stacked.shape[0]):
                out = out + stacked[i] * w[i]
            return out if base is None else out + base
        raise ParameterError(
            f"multislerp (tensor {ctx.name!r}): the weighted sum of the unit vectors is zero "
            f"(weights {weight}); antipodal models whose weights cancel have no spherical mean. "
            "Give other weights"
        )
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    step = (tangents * w.view(-1, 1)).sum(0)
    step_norm = torch.norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = out * (norms.squeeze(-1) * w).sum()
    out = out.view(stacked.shape[1:])
    return out if base is None else out + base
