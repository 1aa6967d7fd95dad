"""DARE: drop task-vector entries at random, rescale the survivors, then add or TIES-merge."""

from __future__ import annotations

import torch

from alloykit.methods.base import Param, TensorContext, merge_method
from alloykit.methods.primitives import (
    LAMBDA,
    WEIGHT,
    bernoulli_mask,
    density_param,
    rescale_l1,
    scale_search,
    weighted_merge,
)

PAPER = {}
MERGEKIT = {"density": 1.0, "rescale": "l1", "combine": "linear", "aggregate": "sum"}
MERGEKIT_TIES = {**MERGEKIT, "combine": "ties", "sign": "weighted_sum"}


@merge_method(
    "dare",
    search=scale_search(1.5),
    params=[
        WEIGHT,
        density_param(0.1, "keep probability 1 − p of each entry (paper: p = 0.9)"),
        LAMBDA,
        Param(
            "rescale",
            str,
            "inverse",
            choices=("inverse", "l1", "none"),
            help="survivors × 1/density (paper) or × ‖τ‖₁/‖masked τ‖₁ (mergekit)",
        ),
        Param(
            "combine",
            str,
            "linear",
            choices=("linear", "ties"),
            help="after dropping: task arithmetic, or TIES sign election",
        ),
        Param(
            "sign",
            str,
            "sum",
            choices=("sum", "weighted_sum", "count"),
            help="sign rule when combine='ties' (see ties)",
        ),
        Param(
            "aggregate",
            str,
            "sum",
            choices=("sum", "mean", "weighted_mean"),
            help="sum (TA), disjoint mean, or Σ w τ / Σ w (mergekit normalize)",
        ),
    ],
    needs_base=True,
    presets={"paper": PAPER, "mergekit": MERGEKIT, "mergekit_ties": MERGEKIT_TIES},
    default_preset="paper",
    memory_factor=4.0,
    # The L1 rescale needs whole-tensor norms; masks are drawn per slice (ctx.offset).
    elementwise=lambda p: all(d >= 1 for d in p["density"]) or p["rescale"] != "l1",
)
def dare(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    weight: list[float],
    density: list[float],
    lambda_: float,
    rescale: str,
    combine: str,
    sign: str,
    aggregate: str,
) -> torch.Tensor:
    """θ = θ_0 + λ · combine_t(w_t · m_t ⊙ τ_t · s_t), m_t ~ Bernoulli(density_t)
    (Yu et al. 2024, "Language models are Super Mario", ICML).

    ``rescale``: s_t = 1/density (paper, keeps E[τ̃] = τ), ‖τ_t‖₁/‖m_t⊙τ_t‖₁ (mergekit), or 1.
    ``combine="linear"`` is DARE+TA; ``combine="ties"`` elects a sign per entry and keeps the
    agreeing entries (DARE+TIES; no further trimming, zero sign → +).

    Randomness: each (tensor, model) pair draws its mask from its own generator seeded by
    (seed, tensor name, model index), so results do not depend on order or worker count.
    mergekit draws from torch's global RNG in its execution order, so masks cannot match it;
    the ``mergekit``/``mergekit_ties`` presets (``dare_linear``/``dare_ties``) reproduce
    everything else: L1 rescale, weighted sign election, ``normalize`` as ``aggregate``.
    """
    dropped = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
    for i, x in enumerate(tensors):
        d = x - base
        if density[i] < 1:
            mask = bernoulli_mask(d.shape, density[i], ctx.generator(i)).to(d.device, d.dtype)
            if rescale == "l1":
                d = rescale_l1(d, mask)
            elif rescale == "inverse":
                d = d * mask / density[i] if density[i] > 0 else d * 0
            else:
                d = d * mask
        dropped[i] = d

    return weighted_merge(
        dropped, base, weight, lambda_, elect=combine == "ties", aggregate=aggregate, sign=sign
    )
