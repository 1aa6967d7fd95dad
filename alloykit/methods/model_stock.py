"""Model Stock: move from the base towards the fine-tunes' average by a ratio set by the angle
between their task vectors."""

from __future__ import annotations

import math

import torch

from alloykit.methods.base import Param, TensorContext, merge_method

EPS = 1e-8  # the reference code's EPS (cosine denominator and ratio denominator)


def _rows(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """The vectors one ratio is computed for, along the last axis of a view of ``x``."""
    if granularity == "tensor":
        return x.reshape(-1)
    if granularity == "filter":
        return x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)
    return x.unsqueeze(0) if x.dim() <= 1 else x  # mergekit's filter_wise: vectors along the last axis


def _ratio_reference(offsets: list[torch.Tensor], average: str, scratch: torch.Tensor) -> torch.Tensor:
    """t per row, float64, as the reference code (``naver-ai/model-stock`` notebook, ported as
    FusionBench ``method/model_stock``: ``compute_angle`` / ``compute_ratio``)."""
    k = len(offsets)
    angles = []
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            v1, v2 = offsets[i].float(), offsets[j].float()
            buffer = scratch if scratch.dtype == torch.float32 else None  # products written there
            dot = torch.mul(v1, v2, out=buffer).sum(dim=-1)
            # math.sqrt(Σv1² · Σv2²) + EPS: the product in float32, the root and EPS in float64,
            # the quotient in float32 (a float32 tensor divided by a Python float)
            sq1 = torch.pow(v1, 2, out=buffer).sum(dim=-1)
            sq2 = torch.pow(v2, 2, out=buffer).sum(dim=-1)
            denom = (sq1 * sq2).double().sqrt() + EPS
            cos = (dot / denom.float()).clamp(-1.0, 1.0)
            cosines.append(cos.double())
            angles.append(torch.acos(cos).double() * (180.0 / math.pi))  # np.rad2deg
    if average == "angle":
        total = angles[0]
        for a in angles[1:]:
            total = total + a
        cos_theta = torch.cos((total / len(angles)) * (math.pi / 180.0))  # np.deg2rad, np.cos
    else:
        cos_theta = torch.stack(cosines).mean(dim=0)
    ratio = k * cos_theta / ((k - 1) * cos_theta + 1 + EPS)
    # Deviation: where no fine-tune changed the row, the base exactly (the reference gives it to
    # 1 ulp only: float32 acos(0) > π/2, so its cos θ is −4e-8 rather than 0).
    unchanged = torch.stack([(o != 0).any(dim=-1) for o in offsets]).any(dim=0).logical_not()
    return torch.where(unchanged, 0.0, ratio)


@merge_method(
    "model_stock",
    params=[
        Param(
            "granularity",
            str,
            "tensor",
            choices=("tensor", "filter", "last_axis"),
            help="one ratio per tensor (paper: layer-wise), per output unit (rows of out × rest), "
            "or per vector along the last axis (mergekit's filter_wise)",
        ),
        Param(
            "average",
            str,
            "angle",
            choices=("angle", "cosine"),
            help="N > 2 models: cos of the mean pairwise angle (reference code as FusionBench "
            "extends it) or the mean pairwise cosine (mergekit)",
        ),
        Param(
            "numerics",
            str,
            "reference",
            choices=("reference", "mergekit"),
            help="reference code: cos = dot/(√(Σa²Σb²)+1e-8), t = Nc/((N−1)c+1+1e-8) in float64; "
            "mergekit: cos = dot/max(‖a‖‖b‖, 1e-6), t = 0 where |1+(N−1)c| < 1e-6, in the compute dtype",
        ),
    ],
    needs_base=True,
    presets={
        "paper": {},
        "mergekit": {"granularity": "tensor", "average": "cosine", "numerics": "mergekit"},
    },
    default_preset="paper",
    min_models=2,
    memory_factor=4.0,
    widens_inputs=True,
    elementwise=False,  # needs whole-tensor (or whole-row) norms
    rowwise=lambda p: p["granularity"] != "tensor",  # one ratio per row: slices of whole rows
)
def model_stock(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    granularity: str,
    average: str,
    numerics: str,
) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): t·θ̄ + (1 − t)·θ_0, t = N cos θ / (1 + (N − 1) cos θ).

    θ = t·θ̄ + (1 − t)·θ_0, θ̄ = (1/N) Σ_t θ_t, t = N cos θ / (1 + (N − 1) cos θ)
    (Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models", ECCV).

    θ is the angle between the task vectors τ_t = θ_t − θ_0 of one layer (the paper assumes it is
    the same for every pair). Presets:

    * ``paper`` (default): the authors' code (``naver-ai/model-stock`` notebook: ``compute_angle``,
      ``compute_ratio``, ``merge``; FusionBench ``method/model_stock`` ports it): per tensor,
      cos = Σ τ_aτ_b / (√(Σ τ_a² Σ τ_b²) + 1e-8) in float32, clamped to [−1, 1], angle =
      acos (via degrees), t = N cos θ / ((N − 1) cos θ + 1 + 1e-8) in float64. The notebook merges
      two models; for N > 2, θ is the mean of the pairwise angles (FusionBench's extension).
    * ``mergekit``: mergekit 0.1.5 ``merge_methods/model_stock.py``: cos of each pair =
      ⟨τ_a, τ_b⟩ / max(‖τ_a‖‖τ_b‖, 1e-6), clamped, *averaged as cosines* over pairs (its author's
      reading of the paper for N > 2), t = 0 (the base) where |1 + (N − 1) cos θ| < 1e-6, all in
      the compute dtype. mergekit's ``filter_wise: true`` is ``granularity="last_axis"``.

    ``granularity``: ``tensor`` (the paper's layer-wise ratio), ``filter`` (one ratio per output
    unit: rows of the tensor as out × rest; 1-D tensors are one row), ``last_axis`` (mergekit's
    ``filter_wise``: per vector along the last axis, the same as ``filter`` for 2-D tensors).
    Zero task vectors give the base: t = 0 (``mergekit``: cos = 0; ``reference``: a deliberate
    deviation, the reference code's float32 acos(0) > π/2 makes t ≈ −1e-7, the base to 1 ulp).
    With N = 2 and cos θ → −1 the reference's t diverges (only its 1e-8 guards the division);
    mergekit returns the base there. Needs the base and at least two fine-tunes (mergekit: three
    inputs).
    """
    # Inputs may arrive as stored (bfloat16) with a float32 result wanted: each is widened where it
    # is used (exactly), and the tensor-sized products reuse one scratch buffer, so an
    # embedding-sized job holds the inputs, the task vectors and one float32 buffer while the
    # ratio is computed (the same bytes as widening everything first).
    work = ctx.result_dtype or torch.promote_types(tensors[0].dtype, base.dtype)
    w0 = _rows(base, granularity).to(work)
    offsets = []
    for x in tensors:  # x − w0, written over the widened copy of x (no second temporary)
        offsets.append(_rows(x, granularity).to(work, copy=True).sub_(w0))
    k = len(tensors)
    if w0.dtype != base.dtype:
        del w0  # a widened copy: made again once the task vectors are gone
    scratch = torch.empty_like(offsets[0])
    if numerics == "reference":
        ratio = _ratio_reference(offsets, average, scratch).unsqueeze(-1)
        del offsets
        mean = torch.zeros_like(scratch)
        for x in tensors:
            mean += _rows(x, granularity)  # widened inside the addition
        mean /= k
        w0 = _rows(base, granularity).to(work)
        # w̄·r + w0·(1 − r): r and 1 − r are Python floats in the reference, cast to the dtype
        mean *= ratio.to(work)
        mean += torch.mul(w0, (1.0 - ratio).to(work), out=scratch)
        return mean.reshape(base.shape)
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            dot = torch.mul(a, b, out=scratch).sum(dim=-1)
            cosines.append((dot / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    if average == "angle":
        cos_theta = torch.cos(torch.stack([torch.acos(c) for c in cosines]).mean(dim=0)).unsqueeze(-1)
    else:
        cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (k - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (k * cos_theta) / safe)
    mean = torch.zeros_like(scratch)  # Python's sum, as mergekit: 0 + w_1 + … (0 + −0.0 is +0.0)
    for x in tensors:
        mean += _rows(x, granularity)
    mean /= k
    w0 = _rows(base, granularity).to(work)
    mean *= t
    mean += torch.mul(1 - t, w0, out=scratch)
    return mean.reshape(base.shape)
