"""NuSLERP: spherical interpolation of two models (or of their task vectors), at a position set by
their weights, over the whole tensor, its rows or its columns."""

from __future__ import annotations

from typing import Any

import torch

from alloykit.methods.base import Param, TensorContext, merge_method

EPS = 1e-8  # colinear when 1 − cos² ≤ EPS² (mergekit's nuslerp eps)
NORM_FLOOR = 1e-7  # norms are clamped to at least this before normalising (mergekit's _normalize)


def _ignores(p: dict[str, Any]) -> dict[str, str]:
    if p["flatten"]:
        return {"row_wise": "with flatten: true the tensor is one vector; row_wise has no effect"}
    return {}


def interpolate(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool
) -> torch.Tensor:
    """sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1 per vector, in mergekit 0.1.5's operation order."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@merge_method(
    "nuslerp",
    params=[
        Param(
            "weight",
            float,
            1.0,
            per_model=True,
            help="w_1, w_2: the position is t = w_2 / (w_1 + w_2) (0.5 when the sum is about 0); "
            "a mergekit recipe must give them",
        ),
        Param(
            "flatten",
            bool,
            True,
            help="interpolate the whole tensor as one vector (mergekit's nuslerp_flatten)",
        ),
        Param(
            "row_wise",
            bool,
            False,
            help="without flatten: interpolate the vectors along the first axis (mergekit's "
            "nuslerp_row_wise); else those along the last axis",
        ),
    ],
    needs_base=False,
    presets={"mergekit": {}},
    default_preset="mergekit",
    min_models=2,
    max_models=2,
    memory_factor=5.0,
    elementwise=False,  # needs whole-vector norms and dot products
    # vectors along the last axis: slices of whole rows hold whole vectors
    rowwise=lambda p: not p["flatten"] and not p["row_wise"],
    ignores=_ignores,
)
def nuslerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    ctx: TensorContext,
    *,
    weight: list[float],
    flatten: bool,
    row_wise: bool,
) -> torch.Tensor:
    """NuSLERP: spherical interpolation of two models at t = w_2/(w_1 + w_2), or of their task vectors.

    v = sin((1−t)Ω)/sin Ω · v_1 + sin(tΩ)/sin Ω · v_2, cos Ω = ⟨v_1, v_2⟩/(‖v_1‖‖v_2‖)
    (Shoemake 1985), with t = w_2/(w_1 + w_2) (t = 0.5 when |w_1 + w_2| < 1e-6). Without a base,
    v_i = θ_i and θ = v; with a base, v_i = θ_i − θ_0 and θ = θ_0 + v.

    The vectors: the whole tensor (``flatten``, the default), else those along the last axis, or
    with ``row_wise`` those along the first axis (the tensor's first and last axes swapped).
    Where 1 − cos²Ω ≤ 1e-16 (colinear), v = (1−t)v_1 + t v_2. Norms are clamped to ≥ 1e-7 before
    normalising, cos Ω to [−1, 1]. Source: mergekit 0.1.5 ``merge_methods/nuslerp.py`` (the only
    reference; there is no paper), computed in the compute dtype with its operations in its
    order, so the ``mergekit`` preset gives its tensors bit for bit.

    Deviation: mergekit requires ``weight``; alloykit's default is 1.0 for both (t = 0.5), and a
    mergekit recipe without weights is refused. Exactly two models besides the optional base.
    """
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is None:
        return interpolate(t, tensors[0], tensors[1], row_wise=row_wise, flatten=flatten)
    return base + interpolate(t, tensors[0] - base, tensors[1] - base, row_wise=row_wise, flatten=flatten)
