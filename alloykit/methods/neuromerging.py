"""NeuroMerging: merge each neuron's update as a part along its pre-trained weights and a part
across them (Fang et al., "To See a World in a Spark of Neuron", EMNLP 2025)."""

from __future__ import annotations

from typing import Any

import torch

from alloykit.errors import ParameterError
from alloykit.methods.base import Param, TensorContext, merge_method
from alloykit.methods.primitives import ModelTopK, add_base_

_BLOCK_ENTRIES = 1 << 20  # entries per task vector in one block of neurons (block_rows=0)


def _mask_rank(numel: int, task: int, params: dict[str, Any]) -> int | None:
    """MergeLM's ``mask_smallest_magnitude_param_values``: threshold = kthvalue(int(d·rate)),
    keep |τ| ≥ it. (The reference code fails for int(d·rate) = 0; here that keeps all.)"""
    rate = params["mask_rate"]
    return max(1, int(numel * rate)) if rate > 0 else None


def disjoint_mean(values: torch.Tensor, task_dim: int, majority_dims: tuple[int, ...] | None) -> torch.Tensor:
    """TIES elect + disjoint mean over ``task_dim`` (the reference's ``inner_ties_kernel``).

    γ = sign(Σ_t v_t); where γ = 0 it takes the sign of Σ γ over ``majority_dims`` of γ (all of
    them when None); where that is 0 too the reference's ``where(γ > 0, v > 0, v < 0)`` keeps
    the negative entries, i.e. behaves as −1. Mean over the kept (non-zero) entries."""
    elected = values.sum(task_dim).sign()
    if majority_dims is None:
        majority = elected.sum().sign()
    else:
        majority = elected.sum(dim=majority_dims, keepdim=True).sign()
    majority = torch.where(majority == 0, -1.0, majority)
    elected = torch.where(elected == 0, majority, elected).unsqueeze(task_dim)
    keep = torch.where(elected > 0, values > 0, values < 0)
    selected = values * keep
    return selected.sum(task_dim) / keep.sum(task_dim).clamp(min=1)


def neuron_basis(rows: torch.Tensor, routine: str = "qr") -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors V (b, n, ρ) and singular values S (b, ρ) of each (T, n) matrix of
    ``rows`` (b, T, n), ρ = min(T, n). ``exact`` calls the batched SVD directly (the reference
    code; slow on CPU for wide matrices); ``qr`` first reduces each Rᵀ = QR (n × T), then takes
    the SVD of the small T × T factor: the same factorisation to float32 rounding, ~60× faster."""
    if routine == "exact":
        _, s, vh = torch.linalg.svd(rows, full_matrices=False)
        return vh.transpose(-1, -2), s
    q, r = torch.linalg.qr(rows.transpose(-1, -2))  # (b, n, k), (b, k, T) with k = min(n, T)
    _, s, wh = torch.linalg.svd(r.transpose(-1, -2), full_matrices=False)  # Rᵀ of r: (b, T, k)
    return q @ wh.transpose(-1, -2), s


def orthogonal_part(perp: torch.Tensor, v: torch.Tensor, s: torch.Tensor, energy: float) -> torch.Tensor:
    """ψ⊥ for a block of neurons. ``perp`` (b, T, n) are the tasks' orthogonal updates, ``v``
    (b, n, ρ) and ``s`` (b, ρ) their right singular vectors and values. Coordinates Z = R V are
    elected and averaged per coordinate (majority fallback over the neuron's coordinates), then
    ψ⊥ = Σ_{j<q} z̄_j v_j with q the smallest rank holding ``energy`` of Σ s² (code's rule).
    Flipping the sign of any v_j leaves ψ⊥ unchanged (z_j and z̄_j flip with it)."""
    z = perp @ v  # (b, T, ρ)
    z_bar = disjoint_mean(z, task_dim=1, majority_dims=(1,))  # (b, ρ)
    sq = s.square()
    total = sq.sum(dim=1, keepdim=True)
    cum = torch.cumsum(sq, dim=1) / torch.where(total > 0, total, 1.0)
    rho = s.shape[1]
    q = torch.clamp((cum < energy).sum(dim=1) + 1, max=rho)
    q = torch.where(total.squeeze(1) > 0, q, rho)  # all-zero updates: nothing to truncate
    z_bar = z_bar * (torch.arange(rho, device=q.device) < q.unsqueeze(1))
    return (v @ z_bar.unsqueeze(-1)).squeeze(-1)


def _row_blocks(rows: int, block: int) -> list[slice]:
    """Blocks of ``block`` rows rounded down to a multiple of 8 (at least 8). The batched QR
    rounds according to where each matrix sits in the batch's buffer (its alignment); with
    blocks of 8 matrices every row sits as it would in one whole batch, so the block size
    changes no bit of the result."""
    block = max(8, block - block % 8)
    return [slice(start, start + block) for start in range(0, rows, block)]


def trimmed_rows(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    thresholds: list[float | None],
    rows: slice,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The trimmed task vectors τ_t = θ_t − θ_0 (|τ_t| < threshold_t set to 0) of ``rows`` of
    (m, n) matrices, stacked (T, b, n) in ``dtype``. Every entry depends on its inputs only, so a
    block of rows has the bytes of the same rows of the whole tensor."""
    out = torch.empty((len(tensors), *base[rows].shape), dtype=dtype, device=base.device)
    for t, (x, thr) in enumerate(zip(tensors, thresholds, strict=True)):
        out[t].copy_(x[rows]).sub_(base[rows])  # in the wider dtype (out= would subtract in the inputs')
        if thr is not None:
            out[t] *= out[t].abs().float() >= thr
    return out


def neuronal_update(
    tensors: list[torch.Tensor],
    w0: torch.Tensor,
    thresholds: list[float | None],
    *,
    dtype: torch.dtype,
    lambda1: float,
    lambda2: float,
    parallel: str,
    energy: float,
    svd: str,
    block_rows: int,
) -> torch.Tensor:
    """λ1 ψ∥ + λ2 ψ⊥ for one matrix: ``tensors`` the T fine-tuned (m, n) matrices, ``w0`` the
    pre-trained one, ``thresholds`` each task's trim threshold (None: no trim), in ``dtype``.

    The inputs may be narrower than ``dtype`` (bfloat16 as stored). Everything is computed in
    blocks of ``block_rows`` rows, the trimmed task vectors of a block formed when needed (twice:
    for the projections, then for the orthogonal parts): each row's sums are the same whatever
    the block, and no (T, m, n) task vectors, (m, n) product or widened copy of w0 is held."""
    if block_rows == 0:  # about 1M entries per task: a few MB per block, and faster than larger ones
        block_rows = max(1, _BLOCK_ENTRIES // max(1, w0.shape[1]))
    blocks = _row_blocks(w0.shape[0], block_rows)
    norm_sq = torch.cat([w0[r].to(dtype).square().sum(-1) for r in blocks])  # (m,)
    safe = torch.where(norm_sq > 0, norm_sq, 1.0)
    dots = torch.empty((len(tensors), w0.shape[0]), dtype=dtype, device=w0.device)
    for r in blocks:
        tau = trimmed_rows(tensors, w0, thresholds, r, dtype)
        w = w0[r].to(dtype)
        for t in range(len(tensors)):
            dots[t, r] = (tau[t] * w).sum(-1)
    a = torch.where(norm_sq > 0, dots / safe, 0.0)  # (T, m); zero rows: no parallel part
    del dots
    a_bar = disjoint_mean(a, task_dim=0, majority_dims=None)  # (m,) majority over the layer
    out = torch.zeros(w0.shape, dtype=dtype, device=w0.device)
    if lambda1 != 0:  # (else ψ∥ is not formed: it would only be multiplied by 0)
        for r in blocks:
            w = w0[r].to(dtype)
            if parallel == "paper":
                out[r] = lambda1 * (a_bar[r].unsqueeze(1) * w)  # ā · w0 (projection formula)
            else:  # ā · w0/‖w0‖ (code)
                unit = (a_bar[r] / safe[r].sqrt()).unsqueeze(1)
                out[r] = lambda1 * (unit * w * (norm_sq[r] > 0).unsqueeze(1))
    if lambda2 == 0:
        return out
    for r in blocks:
        tau = trimmed_rows(tensors, w0, thresholds, r, dtype)
        perp = tau.sub_(a[:, r].unsqueeze(-1) * w0[r].to(dtype)).transpose(0, 1)  # (b, T, n)
        v, s = neuron_basis(perp, svd)
        out[r] += lambda2 * orthogonal_part(perp, v, s, energy)
    return out


def sigma_lambda2(removed_l1: list[float]) -> float:
    """λ2 = 1/(1 − σ), σ = max_t ‖τ_t removed by the trim‖₁ / ‖τ_t‖₁ (the no-validation rule)."""
    sigma = max(removed_l1) if removed_l1 else 0.0
    if sigma >= 1.0:
        raise ParameterError(
            "neuromerging: the trim removed all of a task vector's L1 mass "
            "(σ = 1), so λ2 = 1/(1 − σ) is undefined; lower mask_rate or give "
            "lambda2 with lambda2_rule='given'"
        )
    return 1.0 / (1.0 - sigma)


@merge_method(
    "neuromerging",
    params=[
        Param(
            "mask_rate",
            float,
            0.8,
            ge=0.0,
            lt=1.0,
            help="fraction of each task vector zeroed by the whole-model magnitude trim",
        ),
        Param(
            "threshold",
            str,
            "exact",
            choices=("exact", "approximate"),
            help="whole-model trim threshold: exact (2 passes) or the histogram bucket edge (1 pass)",
        ),
        Param("lambda1", float, 0.0, help="λ1, scales the parallel part ψ∥"),
        Param(
            "lambda2_rule",
            str,
            "sigma",
            choices=("sigma", "given"),
            help="λ2 = 1/(1 − σ) without validation data (paper), or the given lambda2",
        ),
        Param("lambda2", float, 1.0, help="λ2 when lambda2_rule='given'"),
        Param(
            "parallel",
            str,
            "paper",
            choices=("paper", "unit"),
            help="ψ∥ = ā·w0 (paper) or ā·w0/‖w0‖ (released code)",
        ),
        Param(
            "energy",
            float,
            1.0,
            gt=0.0,
            le=1.0,
            help="energy kept by the per-neuron orthogonal basis (1 = all directions)",
        ),
        Param(
            "point_lambda",
            str,
            "lambda2",
            choices=("lambda2", "mean"),
            help="scale of 1-D/0-D parameters: λ2 (Lite code) or (λ1 + λ2)/2 (Full code)",
        ),
        Param(
            "svd",
            str,
            "qr",
            choices=("qr", "exact"),
            help="per-neuron SVD: QR-reduced (fast) or torch.linalg.svd on each T × n",
        ),
        Param(
            "block_rows",
            int,
            0,
            ge=0,
            help="neurons per batched SVD, a multiple of 8 (bounds memory; 0: about 1M entries)",
        ),
    ],
    needs_base=True,
    presets={"paper": {}, "code": {"parallel": "unit", "svd": "exact"}},
    default_preset="paper",
    reduction=ModelTopK(
        rank=_mask_rank,
        active=lambda p: p["mask_rate"] > 0,
        approximate=lambda p: p["threshold"] == "approximate",
        l1=True,
        wide={"mask_rate": "the magnitude mask keeps one fraction of each task vector over the whole model"},
    ),
    memory_factor=6.0,
    widens_inputs=True,
)
def neuromerging(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    mask_rate: float,
    threshold: str,
    lambda1: float,
    lambda2_rule: str,
    lambda2: float,
    parallel: str,
    energy: float,
    point_lambda: str,
    svd: str,
    block_rows: int,
) -> torch.Tensor:
    """θ = θ_0 + λ1 ψ∥ + λ2 ψ⊥ per neuron (row) of every matrix; TIES for 1-D parameters.

    1. Trim (whole model, per task, before anything else): zero the ``mask_rate`` smallest |τ_t|
       (MergeLM's rule: |τ| ≥ kthvalue(int(d·rate)) is kept). Code default 0.8; the released
       LLaMA-2 scripts use 0.95.
    2. For neuron k with pre-trained weights w0 and trimmed update τ_t: a_t = ⟨τ_t, w0⟩/‖w0‖²,
       τ⊥_t = τ_t − a_t w0.
    3. ψ∥ = ā w0, ā the TIES elect + disjoint mean of a_t over tasks (a zero sign takes the
       layer's majority). The released code rebuilds ā·w0/‖w0‖ (``parallel="unit"``); they
       differ only when λ1 ≠ 0.
    4. ψ⊥: thin SVD of R = [τ⊥_1; …; τ⊥_T] = U S Vᵀ, coordinates Z = R V elected and averaged
       per coordinate (a zero sign takes the neuron's majority), ψ⊥ = Σ_{j<q} z̄_j v_j, q from
       ``energy`` (1 → all directions, the code's default).
    5. λ1 = 0 and λ2 = 1/(1 − σ) without validation data (Algorithm 1), σ = max_t of the share
       of ‖τ_t‖₁ the trim removed — our reading of σ, which the available material does not
       define beyond "masked" (see docs/methods.md); ``lambda2_rule="given"`` uses ``lambda2``.

    Tensor classes: 2-D (linear layers, embeddings, LM heads: one neuron per row); ≥ 3-D (conv
    kernels) reshaped to (out channels, rest), one neuron per output channel; 1-D and 0-D (norm
    weights, biases, scalars): TIES elect + disjoint mean (the code's ``ties_kernel``, majority
    over the tensor), scaled by λ2 (Lite code) or (λ1 + λ2)/2 (Full code). The code only
    handles the LLaMA names it lists; these rules by rank are ours and cover every tensor.
    Guards the code lacks: zero pre-trained rows get no parallel part (the whole update is
    orthogonal); zero updates give zero; a single task reproduces its trimmed update at λ = 1.
    Presets: ``paper`` (default), ``code`` (unit parallel vector, direct batched SVD).
    A bfloat16/float16 compute dtype is computed in float32 (there is no half-precision QR or
    SVD on CPU) and the result rounded to it: the bytes of a float32 merge written in that dtype.
    """
    stats = ctx.stats or {}
    thresholds = stats.get("threshold") or [None] * len(tensors)
    # Inputs may arrive as stored (bfloat16) with a float32 result wanted: widened here, exactly,
    # one block of rows at a time (an embedding-sized tensor gets no stacked task vectors).
    # A half-precision compute dtype is computed in float32 (LAPACK has no bfloat16 QR/SVD) and
    # the result rounded to it.
    wanted = ctx.result_dtype or torch.promote_types(tensors[0].dtype, base.dtype)
    dtype = wanted if wanted.itemsize >= 4 else torch.float32
    lam2 = sigma_lambda2(stats.get("removed_l1", [])) if lambda2_rule == "sigma" else lambda2
    if base.numel() == 0:  # (a (0, n) matrix has no neuron; its rows cannot be shaped by -1)
        return base.to(wanted, copy=True)
    if base.dim() <= 1:
        scale = lam2 if point_lambda == "lambda2" else (lambda1 + lam2) / 2
        points = [x.reshape(1, -1) for x in tensors]
        flat = trimmed_rows(points, base.reshape(1, -1), thresholds, slice(None), dtype)
        flat = flat.reshape(len(tensors), -1)
        mean = disjoint_mean(flat, task_dim=0, majority_dims=None).reshape(base.shape)
        return (base.to(dtype) + scale * mean).to(wanted)
    w0 = base.reshape(base.shape[0], -1)  # (widened block by block)
    update = neuronal_update(
        [x.reshape(w0.shape) for x in tensors],
        w0,
        thresholds,
        dtype=dtype,
        lambda1=lambda1,
        lambda2=lam2,
        parallel=parallel,
        energy=energy,
        svd=svd,
        block_rows=block_rows,
    )
    del w0
    # float32 update += base, widened a block at a time; a narrower update (bfloat16 compute
    # with float32 inputs, never the engine's case) is promoted as before
    merged = (
        add_base_(update.reshape(base.shape), base)
        if update.dtype == torch.promote_types(update.dtype, base.dtype)
        else base + update.reshape(base.shape)
    )
    return merged.to(wanted)
