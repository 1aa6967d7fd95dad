"""Activation matching: permute each model's units to the first model's by their activations."""

from __future__ import annotations

import torch

from alloykit.alignment.transforms import aligned_mean
from alloykit.methods.base import TensorContext, merge_method


@merge_method(
    "activation_matching",
    params=[],
    needs_base=False,
    presets={"paper": {}},
    default_preset="paper",
    min_models=2,
    memory_factor=2.0,
    alignment="activations",
)
def activation_matching(
    tensors: list[torch.Tensor], base: torch.Tensor | None, ctx: TensorContext
) -> torch.Tensor:
    """Activation matching (Ainsworth et al. 2023; REPAIR, Jordan et al. 2023; MuDSC's
    "A. Align"), then θ = (1/N) Σ_m P_m(θ_m).

    One pass over unlabeled data: per permutation group, the Pearson correlation of the N models'
    units (observed at the input of the group's last consumer, MuDSC's default hook, or at its
    producers' outputs), exact over batches of any size; then, per group independently,
    Hungarian (``scipy.optimize.linear_sum_assignment``) on the anchor-vs-model block. Heads and
    GroupNorm groups are matched block by block. Deviation from Git Re-Basin's own activation
    matching: Pearson correlation instead of the uncentred cross moment (as REPAIR and MuDSC).
    """
    return aligned_mean(tensors, ctx.transforms)
