"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere, scaled
by their mean norm."""

from __future__ import annotations

import torch

from alloykit.methods.base import Param, TensorContext, merge_method


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """(Σ α_i‖θ_i‖)·μ, μ the weighted Karcher mean of θ_i/‖θ_i‖, by mergekit 0.1.5's iteration
    (``karcher.karcher_merge_tensors``), operation for operation."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = []
    units = []
    for x in tensors:
        norm = torch.linalg.vector_norm(x.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(x) if norm.item() == 0.0 else (x / norm).to(x.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    valid_alphas = [alphas[i] for i in valid]
    alpha_sum = sum(valid_alphas)
    shares = [a / alpha_sum for a in valid_alphas]
    points = [units[i] for i in valid]

    mean = torch.zeros_like(points[0])
    for a, u in zip(shares, points, strict=True):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(shares, points, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)  # log_μ(u)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        # exp_μ(tangent), then back onto the sphere
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(
            mean.dtype
        )
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)

    scale = sum(a * norm for a, norm in zip(alphas, norms, strict=True))
    return scale * mean


@merge_method(
    "karcher",
    params=[
        Param("max_iter", int, 10, ge=0, help="iterations of the fixed-point (gradient) update"),
        Param(
            "tol",
            float,
            1e-5,
            gt=0.0,
            help="stop when the tangent step's norm is below it; also the norm under which a model "
            "counts as zero and the angle under which it is at the mean",
        ),
    ],
    needs_base=False,
    presets={"mergekit": {}},
    default_preset="mergekit",
    min_models=1,
    memory_factor=4.0,
    elementwise=False,  # whole-tensor norms and dot products
)
def karcher(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    ctx: TensorContext,
    *,
    max_iter: int,
    tol: float,
) -> torch.Tensor:
    """Karcher mean: θ = (1/N Σ ‖θ_i‖)·μ, μ = argmin_{‖μ‖=1} Σ d(μ, θ_i/‖θ_i‖)² (geodesic d).

    Each tensor is one flat vector; u_i = θ_i/‖θ_i‖ (norms in float32, float64 for float64
    inputs), equal weights α_i = 1/N. μ starts at the normalised Σ α_i u_i (u_1 if that is below
    ``tol``) and follows the fixed-point iteration of Karcher (1977), "Riemannian center of mass
    and mollifier smoothing": s = Σ α_i θ_i/sin θ_i · (u_i − cos θ_i μ), θ_i = arccos⟨μ, u_i⟩
    (terms with θ_i < tol skipped), μ ← cos‖s‖ μ + sin‖s‖ s/‖s‖, renormalised, for ``max_iter``
    steps or until ‖s‖ < tol. Models with ‖θ_i‖ ≤ tol are left out of μ (the weights of the rest
    renormalised) but still count in the scale; if none is left the result is 0.

    Source: mergekit 0.1.5 ``merge_methods/karcher.py`` (reference: arXiv 2603.04972), followed
    operation for operation in the compute dtype, so the ``mergekit`` preset gives its tensors bit
    for bit. The base model, if any, is not used: a mergekit recipe's ``base_model`` is one more
    input, as in mergekit. One model: itself. Deviation: ``tol`` must be > 0 (mergekit also
    accepts 0, where a model already at the mean gives 0/0 = NaN).
    """
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    return karcher_mean(tensors, alphas, max_iter, tol)
