"""Weight averaging of models trained separately, with no alignment (the baseline of the
permutation-alignment papers; for models fine-tuned from one base, ``linear`` is the same)."""

from __future__ import annotations

import torch

from alloykit.alignment.transforms import aligned_mean
from alloykit.methods.base import TensorContext, merge_method


@merge_method(
    "weight_average",
    params=[],
    needs_base=False,
    presets={"paper": {}},
    default_preset="paper",
    min_models=2,
    memory_factor=2.0,
    alignment="identity",
)
def weight_average(
    tensors: list[torch.Tensor], base: torch.Tensor | None, ctx: TensorContext
) -> torch.Tensor:
    """θ = (1/N) Σ_m θ_m over the raw models: every unit stays where it is (identity transforms),
    through the same pipeline as the alignment methods (tracing, self-check, BN reset/REPAIR)."""
    return aligned_mean(tensors, ctx.transforms)
