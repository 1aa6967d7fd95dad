"""ZipIt!: zip each group's units across (and within) models by activation correlation."""

from __future__ import annotations

import torch

from alloykit.alignment.transforms import aligned_mean
from alloykit.methods._alignment_params import zip_params
from alloykit.methods.base import TensorContext, merge_method


@merge_method(
    "zipit",
    params=zip_params(0.3, 0.125),
    needs_base=False,
    presets={"paper": {}, "mudsc": {"zip_a": 0.5, "zip_b": 1.0}},
    default_preset="paper",
    min_models=2,
    memory_factor=2.0,
    alignment="zip",
)
def zipit(
    tensors: list[torch.Tensor], base: torch.Tensor | None, ctx: TensorContext, **params: object
) -> torch.Tensor:
    """ZipIt! (Stoica et al., ICLR 2024; ``gstoica27/ZipIt:matching_functions.match_tensors_zipit``):
    per group, the Pearson correlation of the N models' units on data, then greedy matching that
    may also fuse units inside one model (budget ``zip_b``, decay ``zip_a``), down to the merged
    width; θ = (1/N) Σ_m T_m(θ_m) with producers merged as means and consumers summed over fused
    units (ZipIt's "unmerge"). Heads and GroupNorm groups are zipped block by block (MuDSC's group
    zip). Defaults: ZipIt's a = 0.3, b = 0.125; preset ``mudsc``: MuDSC's a = 0.5, b = 1 (its
    "activation + zip" baseline). No partial zipping (every group is zipped).
    """
    return aligned_mean(tensors, ctx.transforms)
