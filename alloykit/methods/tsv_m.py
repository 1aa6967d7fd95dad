"""TSV-M: keep each task's top singular triplets, decorrelate them across tasks, sum."""

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
    merge_tensor,
    tsv_m_matrix,
)
from alloykit.methods.base import Param, TensorContext, merge_method
from alloykit.methods.primitives import scale_search


@merge_method(
    "tsv_m",
    search=scale_search(3, "alpha"),
    params=[
        alpha_param("α, scales the merged update (TSV paper: 1.0)"),
        Param(
            "min_rank",
            int,
            0,
            ge=0,
            help="at least this many triplets per task (0: reference code; 1: ESM's max(1, ·))",
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
    memory_factor=4.0,
    widens_inputs=True,  # computes in float32 whatever it is given (see merge_tensor)
)
def tsv_m(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    alpha: float,
    min_rank: int,
    rank_tol: float,
    matrices: str,
    conv: str,
    svd: str,
    lowrank_niter: int,
    lowrank_oversample: int,
) -> torch.Tensor:
    """TSV-M: θ = θ_0 + α polar(U) diag(s) polar(Vᵀ) over each task's top r/T singular triplets.

    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
    CVPR 2025.

    Per m × n matrix, r = min(m, n): each τ_t = U_t S_t V_tᵀ keeps its top k = int(r·(1/T))
    triplets; U = [U_1,k … U_T,k] (m × Tk), s = [s_1,k … s_T,k], Vᵀ = [V_1,kᵀ; …; V_T,kᵀ];
    U and Vᵀ are replaced by their polar factors (P Qᵀ of their own thin SVDs, which removes the
    interference between the tasks' singular vectors), and ΔW = polar(U) diag(s) polar(Vᵀ).
    Other tensors: the mean of the task vectors. α multiplies every update.

    Source: ``AntoAndGar/task_singular_vectors``, ``src/utils/TSVM_utils.py:
    compute_and_sum_svd_mem_reduction`` (method ``TSVM``; its zero-padded r-column U gives the
    same ΔW as the Tk-column concatenation used here, which is also the repo's
    ``get_tsv_merge``), with k = ``int(r * (1/T))`` as there (⌊r/T⌋ except T = 49). α: the
    paper's 1.0 (the code grid-searches 0.1 … 3.0 on validation data). The ``paper`` preset
    averages tensors whose name contains ``text_projection``, as the code does.

    Deliberate deviations: a task whose τ_t is exactly zero on a matrix contributes no triplets
    (the code would add the arbitrary singular vectors of a zero matrix); ``min_rank``,
    ``rank_tol`` (drop triplets with σ < rank_tol·σ_1 of their task, useful for rank-deficient,
    e.g. LoRA-merged, task vectors), ``conv="svd"`` and ``svd="lowrank"`` are options, off by
    default. When k = 0 (T > r, e.g. a 1 × d embedding) the matrix stays at the base, as in the
    code. Identical fine-tunes do not give that fine-tune back: their concatenated bases are
    rank-deficient and the polar factor of such a matrix is not unique (also in the code).
    """
    top = TopSVD(svd, lowrank_niter, lowrank_oversample, ctx.generator)
    return merge_tensor(
        tensors,
        base,
        alpha=alpha,
        matrices=matrices,
        conv=conv,
        merge_matrix=lambda ds: tsv_m_matrix(ds, min_rank=min_rank, rank_tol=rank_tol, top_svd=top),
        result_dtype=ctx.result_dtype,
    )
