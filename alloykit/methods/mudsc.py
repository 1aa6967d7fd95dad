"""MuDSC: alignment or zip on a mix of weight-space and activation-space similarity."""

from __future__ import annotations

import torch

from alloykit.alignment.transforms import aligned_mean
from alloykit.methods._alignment_params import SWEEPS, zip_params
from alloykit.methods.base import Grid, Param, TensorContext, merge_method

ALPHA = Param(
    "alpha",
    float,
    0.5,
    ge=0.0,
    le=1.0,
    help="balance factor: weight of the weight-space similarity (1: weights only, 0: activations only)",
)
# The reference's grid (mudsc_concept_merging.py), scored there on training data.
ALPHA_SEARCH = {"alpha": Grid(tuple(round(0.1 * i, 1) for i in range(1, 10)))}
DOC = """MuDSC, Merging under Dual-Space Constraints (Xu et al., "Training-Free Pretrained Model
    Merging", CVPR 2024; ``zju-vipa/training_free_model_merging``, ``WeightFusion``).

    Per permutation group: C = α·C_w + (1 − α)·C_act, C_act the Pearson correlation of the units'
    activations (computed once), C_w the Pearson correlation of their weight signatures (incoming
    and outgoing weights, bias, norm parameters) in the neighbours' current basis. Start from the
    activation solution, then sweep the groups in a seeded random order re-solving each on C; a
    sweep whose mean score is not above the best rolls back to the best, 5 such sweeps end it (at
    most 100). θ = (1/N) Σ_m T_m(θ_m). Heads and GroupNorm groups are solved block by block; the
    q/k and v/o groups of one attention layer share the head pairing (the reference code solves
    them apart, which can separate a head's q/k from its v). α is a declared search (the reference
    grid 0.1 … 0.9); default 0.5."""


@merge_method(
    "mudsc_align",
    params=[ALPHA, *SWEEPS, *zip_params(0.5, 1.0)[4:]],
    needs_base=False,
    presets={"paper": {}},
    default_preset="paper",
    min_models=2,
    memory_factor=2.0,
    alignment="mudsc_align",
    search=ALPHA_SEARCH,
)
def mudsc_align(
    tensors: list[torch.Tensor], base: torch.Tensor | None, ctx: TensorContext, **params: object
) -> torch.Tensor:
    return aligned_mean(tensors, ctx.transforms)


@merge_method(
    "mudsc_zip",
    params=[ALPHA, *SWEEPS, *zip_params(0.5, 1.0)],
    needs_base=False,
    presets={"paper": {}},
    default_preset="paper",
    min_models=2,
    memory_factor=2.0,
    alignment="mudsc_zip",
    search=ALPHA_SEARCH,
)
def mudsc_zip(
    tensors: list[torch.Tensor], base: torch.Tensor | None, ctx: TensorContext, **params: object
) -> torch.Tensor:
    return aligned_mean(tensors, ctx.transforms)


mudsc_align.fn.__doc__ = (
    DOC + "\n\n    Solver: Hungarian against the first model (MuDSC-align, suffix ``_act_iws_fs_useperm``)."
)
mudsc_zip.fn.__doc__ = (
    DOC + "\n\n    Solver: zip (MuDSC-zip, suffix ``_act_iws_fs``; ZipIt's a = 0.5, b = 1 as MuDSC sets)."
)
