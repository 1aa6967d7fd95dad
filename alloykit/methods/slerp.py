"""SLERP: spherical linear interpolation between the base and one other model, per tensor."""

from __future__ import annotations

import torch

from alloykit.methods.base import Continuous, Param, TensorContext, merge_method

_CHUNK = 1024 * 1024  # mergekit's _CHUNK_ELEMENTS: the norms and the dot are summed in such chunks


@merge_method(
    "slerp",
    search={"t": Continuous(0.0, 1.0, grid=(0.1, 0.3, 0.5, 0.7, 0.9))},
    params=[
        Param(
            "t",
            float,
            0.5,
            help="interpolation position: 0 gives the base, 1 the other model (outside [0, 1] "
            "extrapolates, as mergekit allows; a mergekit recipe must give it)",
        ),
        Param(
            "dot_threshold",
            float,
            0.9995,
            ge=0.0,
            le=1.0,
            help="|cos Ω| above which plain linear interpolation is used",
        ),
        Param("eps", float, 1e-8, gt=0.0, help="norms at or below eps are taken as 1"),
    ],
    needs_base=True,
    presets={"paper": {}, "mergekit": {}},
    default_preset="paper",
    min_models=1,
    max_models=1,
    memory_factor=3.0,
    elementwise=False,  # needs the whole tensor's norms and dot product
)
def slerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    t: float,
    dot_threshold: float,
    eps: float,
) -> torch.Tensor:
    """Spherical interpolation from the base θ_0 to θ_1 at t, per flattened tensor (Shoemake 1985).

    θ = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1, cos Ω = ⟨θ_0, θ_1⟩ / (‖θ_0‖‖θ_1‖)
    (Shoemake 1985, "Animating rotation with quaternion curves"), each tensor flattened into one
    vector; where |cos Ω| > ``dot_threshold`` (0.9995), θ = (1−t)θ_0 + tθ_1.

    The base is θ_0 and exactly one other model θ_1, as mergekit's ``slerp`` (``base_model`` plus
    one model). Both presets are mergekit 0.1.5's arithmetic (``merge_methods/slerp.py: slerp``),
    which is the reference code LLM merges use: float32 (float64 for float64 inputs) whatever the
    compute dtype, norms as the norm of 1M-element chunk norms, dot of the normalised chunks,
    clamped to [−1, 1], norms ≤ eps replaced by 1; the result is stored in the compute dtype.
    t = 0 gives θ_0 and t = 1 gives θ_1 exactly. mergekit requires ``t`` (its recipes are refused
    without it); alloykit's own default is the midpoint, 0.5. Note: mergekit 0.1.5 computes in torch, not in
    numpy as its pre-0.1 versions did.
    """
    v0, v1 = base, tensors[0]
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=dtype, device=v0.device).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    step = _CHUNK  # mergekit: max(1, _CHUNK // rows), one row per tensor here
    norms_a, norms_b = [], []
    for start in range(0, a.shape[1], step):
        norms_a.append(torch.linalg.vector_norm(a[:, start : start + step].to(dtype), dim=1, keepdim=True))
        norms_b.append(torch.linalg.vector_norm(b[:, start : start + step].to(dtype), dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norms_a), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norms_b), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dots = []
    for start in range(0, a.shape[1], step):
        x = a[:, start : start + step].to(dtype) / norm_a
        y = b[:, start : start + step].to(dtype) / norm_b
        dots.append((x * y).sum(dim=1, keepdim=True))
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for start in range(0, a.shape[1], step):
        x = a[:, start : start + step].to(dtype)
        y = b[:, start : start + step].to(dtype)
        out[:, start : start + step] = coef_a * x + coef_b * y
    return out.reshape(v0.shape)
