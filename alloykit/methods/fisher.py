"""Fisher merging: a per-entry weighted average, each model weighted by its diagonal Fisher."""

from __future__ import annotations

from typing import Any

import torch

from alloykit.errors import ParameterError
from alloykit.methods.base import Param, TensorContext, merge_method


class FisherNorms:
    """With ``normalize``: each model's Fisher norm over the whole model, √(Σ_params ‖F_t‖²), in
    one pass (the statistics only are needed; the tensors come along)."""

    def passes(self, params: dict[str, Any]) -> int:
        return 1 if params["normalize"] else 0

    def map(self, index: int, state: Any, tensors: list[torch.Tensor], base: torch.Tensor | None,
            ctx: TensorContext, params: dict[str, Any]) -> torch.Tensor:  # fmt: skip
        out = torch.zeros(len(tensors), dtype=torch.float64, device=tensors[0].device)
        for t, entry in enumerate(ctx.statistics):
            if entry is not None:
                out[t] = entry["fisher"].double().square().sum()
        return out

    def fold(self, index: int, acc: Any, partial: Any) -> Any:
        return partial if acc is None else acc + partial

    def finish(self, index: int, state: Any, acc: Any, params: dict[str, Any]) -> Any:
        return {"fisher_norm": [] if acc is None else acc.sqrt().tolist()}


def _check_weights(params: dict[str, Any], where: str) -> None:
    """Every λ_t = 0 leaves Σ_t c_t (F_t + ε) = 0: each entry would be 0/0."""
    if all(w == 0 for w in params["weight"]):
        raise ParameterError(
            f"fisher{where}: every model's weight is 0, so the Fisher-weighted average divides 0 by "
            "0; give at least one model a weight above 0"
        )


@merge_method(
    "fisher",
    params=[
        Param("weight", float, 1.0, per_model=True, ge=0.0, help="λ_t, scales model t's Fisher"),
        Param("floor", float, 1e-6, ge=0.0, help="ε added to every Fisher entry (reference: 1e-6)"),
        Param(
            "normalize",
            bool,
            True,
            help="weigh each model by 1/‖F_t‖ over the whole model (normalised to sum 1) first",
        ),
    ],
    needs_base=False,
    presets={"paper": {}},
    default_preset="paper",
    reduction=FisherNorms(),
    memory_factor=4.0,
    elementwise=False,
    statistics="fisher",
    check=_check_weights,
)
def fisher(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    ctx: TensorContext,
    *,
    weight: list[float],
    floor: float,
    normalize: bool,
) -> torch.Tensor:
    """θ = Σ_t c_t (F_t + ε) θ_t / Σ_t c_t (F_t + ε) per entry (Matena & Raffel, "Merging Models
    with Fisher-Weighted Averaging", NeurIPS 2022).

    F_t: model t's diagonal Fisher from ``alloykit calibrate --kind fisher`` (per-example
    squared gradients of log p(y|x) on labelled data: the empirical Fisher, or the expected one
    over the model's own predictive distribution). c_t = λ_t, times (with ``normalize``)
    (1/(‖F_t‖ + ε)) / Σ_s (1/(‖F_s‖ + ε)) with ‖F_t‖ the L2 norm over the whole model, as in
    MergeLM/FusionBench's ``merging_with_fisher_weights`` (``normalize_fisher_weight``,
    ``minimal_fisher_weight`` = ε). Tensors without a Fisher (buffers such as running
    statistics) are averaged. Computed in float64.
    """
    wd = torch.float64
    entries = ctx.statistics
    if not entries or entries[0] is None:
        return torch.stack([t.to(wd) for t in tensors]).mean(0).to(tensors[0].dtype)
    coef = torch.tensor(weight, dtype=wd, device=tensors[0].device)
    if normalize:
        inv = 1.0 / (torch.as_tensor(ctx.stats["fisher_norm"], dtype=wd, device=coef.device) + floor)
        coef = coef * inv / inv.sum()
    shape = (len(tensors),) + (1,) * tensors[0].dim()
    f = torch.stack([e["fisher"].to(wd) for e in entries]) + floor
    w = coef.reshape(shape) * f
    theta = torch.stack([t.to(wd) for t in tensors])
    return ((w * theta).sum(0) / w.sum(0)).to(tensors[0].dtype)
