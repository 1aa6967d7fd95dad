"""Iso-C: task arithmetic with a flat (isotropic) spectrum of singular values."""

from __future__ import annotations

import torch

from alloykit.methods._svd import (
    CONV,
    FULL_SVD,
    MATRICES,
    PAPER_MATRICES,
    RANK_TOL,
    TopSVD,
    alpha_param,
    iso_c_matrix,
    merge_tensor,
)
from alloykit.methods.base import TensorContext, merge_method
from alloykit.methods.primitives import scale_search


@merge_method(
    "iso_c",
    search=scale_search(4, "alpha"),
    params=[
        alpha_param("α, scales the merged update (tuned on validation data in the paper)"),
        RANK_TOL,
        MATRICES,
        CONV,
        FULL_SVD,
    ],
    needs_base=True,
    presets={"paper": {"matrices": PAPER_MATRICES}},
    default_preset="paper",
    memory_factor=4.0,
    widens_inputs=True,  # computes in float32 whatever it is given (see merge_tensor)
)
def iso_c(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    alpha: float,
    rank_tol: float,
    matrices: str,
    conv: str,
    svd: str,
) -> torch.Tensor:
    """Iso-C: θ = θ_0 + α σ̄ U Vᵀ, where Σ_t τ_t = U diag(σ) Vᵀ and σ̄ = mean(σ) (flat spectrum).

    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", ICML 2025.

    The task-arithmetic sum keeps its singular vectors and its nuclear norm, but every one of
    its r = min(m, n) directions gets the same singular value. Other tensors: the mean of the
    task vectors. α multiplies every update.

    Source: ``danielm1405/iso-merging``, ``src/utils/iso.py: iso_c`` (the sum of the task
    vectors; the copy in ``AntoAndGar/task_singular_vectors`` uses their mean, i.e. α/T). α: the
    code evaluates α on a grid 0.1 … 3.0 and keeps the best on validation data; it has no fixed
    default, so 1.0 (FusionBench's ``iso_c`` default) is used. The ``paper`` preset averages
    tensors whose name contains ``text_projection``, as the code does.

    Options: ``rank_tol`` drops the directions with σ < rank_tol·σ_1 before averaging (off by
    default; when Σ τ_t is rank-deficient, e.g. LoRA-merged fine-tunes, the reference method
    gives its arbitrary null-space directions the value σ̄); ``conv="svd"`` decomposes kernels
    reshaped to out × rest (the code averages them). Zero task vectors give the base.

    Speed: ``svd="auto"`` (default) computes σ̄·U Vᵀ = σ̄·polar(Σ τ_t) from one eigendecomposition
    of the float64 Gram matrix where σ₁/σ_r ≤ 10⁴ (more accurate than the reference's float32
    SVD there, and 2-4× faster on tall matrices), else from ``torch.linalg.svd`` as the code does;
    ``svd="exact"`` always takes the SVD.
    """
    return merge_tensor(
        tensors,
        base,
        alpha=alpha,
        matrices=matrices,
        conv=conv,
        # (summed: the one matrix given is merge_tensor's own sum, free to overwrite)
        merge_matrix=lambda ds: iso_c_matrix(ds, rank_tol=rank_tol, top_svd=TopSVD(svd), owned=True),
        summed=True,
        result_dtype=ctx.result_dtype,
    )
