"""Git Re-Basin weight matching: permute each model's units to the first model's by their weights."""

from __future__ import annotations

import torch

from alloykit.alignment.transforms import aligned_mean
from alloykit.methods.base import Param, TensorContext, merge_method


@merge_method(
    "weight_matching",
    params=[
        Param(
            "similarity",
            str,
            "inner",
            choices=("inner", "pearson", "cosine"),
            help="unit signatures compared by raw inner product (Git Re-Basin) or Pearson/cosine (MuDSC)",
        ),
        Param("max_sweeps", int, 100, ge=1, help="coordinate-descent sweeps over the groups at most"),
        Param("seed", int, 0, ge=0, help="seed of the group order in each sweep"),
    ],
    needs_base=False,
    presets={"paper": {}},
    default_preset="paper",
    min_models=2,
    memory_factor=2.0,
    alignment="weights",
)
def weight_matching(
    tensors: list[torch.Tensor], base: torch.Tensor | None, ctx: TensorContext, **params: object
) -> torch.Tensor:
    """Git Re-Basin weight matching (Ainsworth, Hayase & Srinivasa, ICLR 2023;
    ``samuela/git-re-basin:src/weight_matching.py``), then θ = (1/N) Σ_m P_m(θ_m).

    Each permutation group (derived from the model by tracing) is solved by Hungarian on
    A = Σ θ_anchor θ_mᵀ over every tensor that touches the group, with the other axes already
    permuted (the unit signatures of :mod:`alloykit.alignment.similarity`), coordinate descent
    over the groups in a random order seeded per sweep, until a sweep improves no group by more
    than 1e-12. N > 2 models: each model is matched to the first. Attention heads and GroupNorm
    groups are matched block by block (the q/k and v/o groups of a layer share the head
    matching). Data-free.
    """
    return aligned_mean(tensors, ctx.transforms)
