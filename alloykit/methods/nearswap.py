"""NearSwap: take the other model's value where it is close to the base's, keep the base where
they are far apart."""

from __future__ import annotations

import torch

from alloykit.methods.base import Param, TensorContext, merge_method


@merge_method(
    "nearswap",
    params=[
        Param(
            "t",
            float,
            1e-4,
            ge=0.0,
            help="similarity threshold: entries with |θ_0 − θ_1| ≤ t take θ_1, farther ones lean to "
            "θ_0 (a mergekit recipe must give it)",
        ),
    ],
    needs_base=True,
    presets={"mergekit": {}},
    default_preset="mergekit",
    min_models=1,
    max_models=1,
    memory_factor=3.0,
    elementwise=True,
)
def nearswap(
    tensors: list[torch.Tensor], base: torch.Tensor, ctx: TensorContext, *, t: float
) -> torch.Tensor:
    """NearSwap: θ = w θ_1 + (1 − w) θ_0, w = clamp(t / max(|θ_0 − θ_1|, 1e-6), 0, 1), per entry.

    θ = w ⊙ θ_1 + (1 − w) ⊙ θ_0 with w = clamp(t / max(|θ_0 − θ_1|, 1e-6), 0, 1): where the
    two models are within t of each other θ_1 is taken whole, elsewhere the base dominates in
    proportion to the distance. The base θ_0 and exactly one other model θ_1. Source: mergekit
    0.1.5 ``merge_methods/nearswap.py`` (from alchemonaut's QuartetAnemoi-70B-t0.0001 model card;
    no paper), in the compute dtype with its operations, so the ``mergekit`` preset gives its
    tensors bit for bit. mergekit requires ``t`` (a recipe without it is refused); alloykit's
    default, 1e-4, is the value that model card names. Deviation: t < 0 (always the base in
    mergekit) is refused.
    """
    b = tensors[0]
    distance = torch.abs(base - b)
    w = (t / distance.clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * base
