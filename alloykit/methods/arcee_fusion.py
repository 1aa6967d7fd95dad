"""Arcee Fusion: take the other model's changes only where they matter most, by a KL-weighted
importance above an outlier threshold of its distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alloykit.methods.base import TensorContext, merge_method

SAMPLE = 1_000_000  # quantiles of larger tensors are estimated from this many entries (mergekit's)


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ_1 − θ_0| ⊙ KL(softmax θ_1 ‖ softmax θ_0) per vector along the last axis (ε = 1e-8 added
    to both distributions), as mergekit's ``_compute_importance``."""
    diff = (x - base).abs()
    p = F.softmax(x, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl


def threshold(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """median + 1.5·(Q3 − Q1) of ``scores``: each quantile q the entry at index ⌊q·(n − 1)⌋ of
    the sorted scores (q·(n − 1) in float32), as mergekit's ``DynamicThresholdFusion``. Above
    1M entries, the quantiles are those of 1M entries drawn with replacement by ``generator``."""
    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE:
        picks = torch.randint(flat.numel(), (SAMPLE,), generator=generator).to(flat.device)
        flat = flat[picks]
    ordered, _ = torch.sort(flat)
    q = torch.tensor([0.25, 0.5, 0.75], device=ordered.device)
    q1, median, q3 = ordered[(q * (ordered.numel() - 1)).long()]
    return median + 1.5 * (q3 - q1)


@merge_method(
    "arcee_fusion",
    params=[],
    needs_base=True,
    presets={"mergekit": {}},
    default_preset="mergekit",
    min_models=1,
    max_models=1,
    memory_factor=5.0,
    elementwise=False,  # softmax along the last axis, quantiles over the whole tensor
)
def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
    """Arcee Fusion: θ = θ_0 + [s ≥ median(s) + 1.5·IQR(s)] ⊙ (θ_1 − θ_0), s = |θ_1 − θ_0| ⊙ KL.

    s = |θ_1 − θ_0| ⊙ KL(p ‖ q), p = softmax(θ_1) + 1e-8, q = softmax(θ_0) + 1e-8 along the last
    axis (one KL per vector); the change θ_1 − θ_0 is kept where s ≥ median + 1.5·(Q3 − Q1) of s
    over the tensor (the upper Tukey fence: the outliers of importance), else θ_0. The base θ_0
    and exactly one other model θ_1. Source: mergekit 0.1.5 ``merge_methods/arcee_fusion.py``
    (Arcee AI; no paper), operation for operation in the compute dtype; its mask is float32, so
    for half precision inputs the result, and mergekit's output tensor, are float32 (a mergekit
    recipe without ``out_dtype`` is written in float32, as mergekit writes it).

    Deviation: on tensors of more than 1M entries mergekit estimates the quantiles from 1M
    entries drawn from torch's global random stream (in its execution order, which cannot be
    reproduced); here they are drawn from a generator seeded by (seed, tensor name), the same on
    any number of workers. Up to 1M entries nothing is random and the result is mergekit's bit
    for bit. An empty tensor gives the base (mergekit fails on it: no quantiles).
    """
    x = tensors[0]
    if x.numel() == 0:
        return base
    scores = importance(x, base)
    mask = (scores >= threshold(scores, ctx.generator())).float()
    return base + (x - base) * mask
