"""MagMax: per entry, keep the task-vector value of largest magnitude."""

from __future__ import annotations

import torch

from alloykit.methods.base import Param, TensorContext, merge_method
from alloykit.methods.primitives import scale_search


@merge_method(
    "magmax",
    search=scale_search(2),
    params=[Param("lambda", float, 0.5, help="λ, scales the selected task vector (reference scripts: 0.5)")],
    needs_base=True,
    presets={"paper": {}},
    default_preset="paper",
    memory_factor=2.0,
    elementwise=True,
)
def magmax(
    tensors: list[torch.Tensor], base: torch.Tensor, ctx: TensorContext, *, lambda_: float
) -> torch.Tensor:
    """θ = θ_0 + λ · τ_max, τ_max = per entry the τ_t of largest |τ_t| (Marczak et al. 2024, "MagMax").

    "MagMax: Leveraging Model Merging for Seamless Continual Learning" (ECCV 2024).

    Source: ``merge_max_abs`` in ``src/merging/task_vectors.py`` of ``danielm1405/magmax``: the
    task vectors are folded in model order with ``where(|τ_t| >= |best|, τ_t, best)``, so on a
    tie in magnitude (e.g. +a and −a) the later model wins. λ = 0.5 is the fixed coefficient of
    the reference scripts (``merge_8datasets.py``, ``merge_splitted.py``). The paper applies it
    to sequentially fine-tuned models; the rule itself needs nothing but the task vectors.
    """
    best = tensors[0] - base
    for x in tensors[1:]:
        tau = x - base
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    if lambda_ != 1:
        best = lambda_ * best
    return base + best
