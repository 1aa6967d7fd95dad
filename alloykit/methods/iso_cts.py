"""Iso-CTS: isotropic merge of a common subspace plus task-specific subspaces."""

from __future__ import annotations

import torch

from alloykit.methods._svd import (
    CONV,
    LOWRANK_NITER,
    LOWRANK_OVERSAMPLE,
    MATRICES,
    PAPER_MATRICES,
    RANK_TOL,
    SVD,
    TopSVD,
    alpha_param,
    iso_cts_matrix,
    merge_tensor,
)
from alloykit.methods.base import Param, TensorContext, merge_method
from alloykit.methods.primitives import scale_search


@merge_method(
    "iso_cts",
    search=scale_search(4, "alpha"),
    params=[
        alpha_param("α, scales the merged update (tuned on validation data in the paper)"),
        Param(
            "common_fraction",
            float,
            0.8,
            ge=0.0,
            le=1.0,
            help="share of the r directions taken from Σ τ_t (the rest: task-specific)",
        ),
        RANK_TOL,
        MATRICES,
        CONV,
        SVD,
        LOWRANK_NITER,
        LOWRANK_OVERSAMPLE,
    ],
    needs_base=True,
    presets={"paper": {"matrices": PAPER_MATRICES}},
    default_preset="paper",
    memory_factor=5.0,
    widens_inputs=True,  # computes in float32 whatever it is given (see merge_tensor)
)
def iso_cts(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    alpha: float,
    common_fraction: float,
    rank_tol: float,
    matrices: str,
    conv: str,
    svd: str,
    lowrank_niter: int,
    lowrank_oversample: int,
) -> torch.Tensor:
    """Iso-CTS: θ = θ_0 + α σ̄ polar(U) polar(Vᵀ) over common and task-specific singular vectors.

    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", ICML 2025.

    Per m × n matrix, r = min(m, n):

    1. sizes: k_c = int(r·f) with f = ``common_fraction``; the task-specific total r − k_c is
       rounded (Python ``round``) to a multiple of T, k_c takes the rest, n_t = (r − k_c)/T;
    2. common subspace: the top k_c triplets U_c, s_c, V_cᵀ of Σ_t τ_t;
    3. task-specific: the top n_t triplets of each residual τ_t − U_c U_cᵀ τ_t;
    4. U, s, Vᵀ stack the T task blocks then the common block (r directions in all);
       ΔW = mean(s) · polar(U) polar(Vᵀ), polar(A) = P Qᵀ of A's thin SVD.

    Other tensors: the mean of the task vectors. α multiplies every update.

    Source: ``danielm1405/iso-merging``, ``src/utils/iso.py: iso_cts`` and
    ``config/method/iso_cts.yaml`` (``common_space_fraction: 0.8``). α: the code evaluates a
    grid 0.1 … 3.0 on validation data and has no fixed default; 1.0 is used (FusionBench's
    default). The ``paper`` preset averages tensors whose name contains ``text_projection``.

    Deviations, all in rounding or in cases the code does not handle: the residual is computed
    as τ_t − U_c(U_cᵀτ_t) (the code forms the m × m projector; same value, cheaper); with no
    task-specific triplet (f = 1, or r small) U_c V_cᵀ is used without the redundant polar step,
    so f = 1 gives exactly Iso-C; a task whose residual is exactly zero contributes no triplets
    (the code would add arbitrary singular vectors of a zero matrix); where the rounding in 1.
    would make k_c negative (the code would slice with a negative index), n_t = ⌊r/T⌋.
    Options off by default: ``rank_tol``, ``conv="svd"``, ``svd="lowrank"``.
    """
    top = TopSVD(svd, lowrank_niter, lowrank_oversample, ctx.generator)
    return merge_tensor(
        tensors,
        base,
        alpha=alpha,
        matrices=matrices,
        conv=conv,
        merge_matrix=lambda ds: iso_cts_matrix(
            ds, common_fraction=common_fraction, rank_tol=rank_tol, top_svd=top
        ),
        result_dtype=ctx.result_dtype,
    )
