"""Weighted averaging of whole models (model soup when the weights are equal)."""

from __future__ import annotations

from typing import Any

import torch

from alloykit.errors import ParameterError
from alloykit.methods.base import Param, TensorContext, merge_method


def _check_weights(params: dict[str, Any], where: str) -> None:
    """Normalising by weights that (nearly) cancel divides by ~0 and blows the merge up."""
    w = params["weight"]
    total, size = sum(w), sum(abs(x) for x in w)
    if params["normalize"] and abs(total) <= 1e-6 * size:
        raise ParameterError(
            f"linear{where}: the weights {w} sum to {total:.3g}, about 0 next to their sizes "
            f"(Σ|w| = {size:.3g}); normalizing would divide by it. Give weights with a clear "
            "non-zero sum, or normalize: false"
        )


@merge_method(
    "linear",
    params=[
        Param("weight", float, 1.0, per_model=True, help="weight of each model"),
        Param("normalize", bool, True, help="divide by the sum of the weights"),
    ],
    needs_base=False,
    presets={"paper": {}, "mergekit": {}},
    default_preset="paper",
    memory_factor=1.0,
    elementwise=True,
    check=_check_weights,
)
def linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    ctx: TensorContext,
    *,
    weight: list[float],
    normalize: bool,
) -> torch.Tensor:
    """Weighted average θ = Σ_i w_i θ_i / Σ_i w_i (Wortsman et al. 2022, "Model soups").

    Accumulates in float32 (float64 for float64 inputs) with ``addcmul`` in model order and
    divides once, as mergekit 0.1.5's ``linear`` does, so both presets give mergekit's tensors.
    ``normalize=False`` returns Σ_i w_i θ_i. The base model, if any, is not used.
    """
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(weight, dtype=dtype, device=first.device)
    result = torch.zeros_like(first, dtype=dtype)
    shape = (1,) * first.dim()
    for x, wi in zip(tensors, w.unbind(0), strict=True):
        result.addcmul_(x, wi.reshape(shape))
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)
