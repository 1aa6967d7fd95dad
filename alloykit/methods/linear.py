"""Weighted averaging of whole models (model soup when the weights are equal)."""

from __future__ import annotations

import torch

from alloykit.errors import ParameterError
from alloykit.methods.base import Param, TensorContext, merge_method


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
    w = torch.tensor(weight, dtype=dtype)
    if normalize and float(w.sum()) == 0.0:
        raise ParameterError(f"linear: the weights {weight} sum to 0; cannot normalize")
    result = torch.zeros_like(first, dtype=dtype)
    shape = (1,) * first.dim()
    for x, wi in zip(tensors, w.unbind(0), strict=True):
        result.addcmul_(x, wi.reshape(shape))
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)
