"""DELLA-Merging: drop task-vector entries with magnitude-ranked probabilities (MAGPRUNE),
rescale the survivors, then TIES-elect and fuse (``della``) or add (``della_linear``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from alloykit.methods._sparsify import check_magprune_window, magprune_work_dtype
from alloykit.methods._sparsify import magprune as magprune_drop
from alloykit.methods.base import Param, TensorContext, merge_method, release
from alloykit.methods.primitives import (
    LAMBDA,
    WEIGHT,
    density_param,
    scale_search,
    task_vector,
    weighted_merge,
)


def _params(aggregate: str) -> list[Param]:
    # Declared defaults are the paper preset's: the reference README's example run
    # (declare-lab/della: --drop_rate 0.3 --window_size 0.14, i.e. density 0.7, ε = 0.07).
    return [
        WEIGHT,
        density_param(0.7, "mean keep probability 1 − p of each entry"),
        Param(
            "epsilon",
            float,
            0.07,
            per_model=True,
            ge=0.0,
            le=1.0,
            help="half-width ε of the keep-probability window [density − ε, density + ε]",
        ),
        LAMBDA,
        Param(
            "rescale",
            str,
            "inverse",
            choices=("inverse", "l1", "none"),
            help="survivors ÷ their keep probability (paper), × ‖τ‖₁/‖m⊙τ‖₁ (mergekit), or as is",
        ),
        Param(
            "magprune",
            str,
            "reference",
            choices=("reference", "mergekit"),
            help="keep-probability arithmetic (and N-D rows) of the reference code or of mergekit",
        ),
        Param(
            "aggregate",
            str,
            aggregate,
            choices=("weighted_mean", "sum"),
            help="Σ w τ̂ / Σ w (mergekit's normalize; over agreeing entries for della) or Σ w τ̂",
        ),
    ]


def _elementwise(name: str) -> Callable[[dict[str, Any]], bool]:
    """Ranks need whole rows; with nothing dropped the merge is elementwise. The planner calls
    this for every tensor before reading any, so the ε window is checked here, up front."""

    def rule(p: dict[str, Any]) -> bool:
        check_magprune_window(p["density"], p["epsilon"], name)
        return all(d >= 1 for d in p["density"])

    return rule


def _dropped(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    density: list[float],
    epsilon: list[float],
    rescale: str,
    magprune_rule: str,
    name: str,
) -> torch.Tensor:
    check_magprune_window(density, epsilon, f"{name} (tensor {ctx.name!r})" if ctx.name else name)
    # Inputs may arrive as stored (bfloat16) with a float32 result wanted: each τ_t is written
    # over a widened copy of θ_t (exact), in the dtype the engine would have widened them to.
    work = ctx.result_dtype or torch.promote_types(tensors[0].dtype, base.dtype)
    out = torch.empty((len(tensors), *base.shape), dtype=work, device=base.device)
    # each τ_t is formed in its slot of the stack and dropped there (MAGPRUNE in place) where
    # MAGPRUNE computes in the work dtype (not for float64, which it takes in float32)
    inplace = magprune_work_dtype(work) == work
    for i in range(len(tensors)):
        delta = task_vector(tensors[i], base, work, out=out[i] if inplace else None)
        release(tensors, i)  # (an input handed over is not held beside the stack)
        dropped = magprune_drop(
            delta,
            density[i],
            epsilon[i],
            rescale=rescale,
            convention=magprune_rule,
            generator=ctx.generator(i),
            inplace=inplace,
        )
        if not inplace:
            out[i] = dropped
    return out


def _fuse(
    dropped: torch.Tensor,
    base: torch.Tensor,
    weight: list[float],
    lambda_: float,
    aggregate: str,
    elect: bool,
) -> torch.Tensor:
    return weighted_merge(dropped, base, weight, lambda_, elect=elect, aggregate=aggregate)


_DOC = """

    MAGPRUNE, per model t and per row of τ_t (a 2-D tensor's rows; 1-D tensors are one row;
    N-D tensors: out × rest rows with ``magprune="reference"``, mergekit's ranking along dim 1
    with ``"mergekit"``): rank |τ| ascending, r̂ ∈ [0, 1] the rank scaled to the row, keep each
    entry with probability p = density − ε + 2ε·r̂ (small entries are dropped more often).
    ``rescale``: ``inverse`` divides each survivor by its p (the paper's 1/(1 − p_drop); reference
    code ``declare-lab/della``, ``mergekit/sparsify.py: rank_magnitude``), ``l1`` restores
    ‖τ_t‖₁ (mergekit 0.1.5 ``della_magprune`` with ``rescale: true``), ``none``.

    Errors: when 0 < density < 1, density ± ε must lie in (0, 1) (mergekit raises ValueError; the
    reference only prints a warning and then fails in ``torch.bernoulli``); checked before any
    tensor is read. density ≥ 1 keeps τ; density ≤ 0 drops it (mergekit's rule).

    Randomness (deliberate deviation, as ``dare``): each (tensor, model) pair draws its mask from
    its own generator seeded by (seed, tensor name, model index), so results do not depend on
    order or worker count. mergekit draws from torch's global RNG in execution order, so masks
    cannot match it; everything else in the ``mergekit`` preset is mergekit's arithmetic (tested
    bit for bit with the same masks). A row of one entry gets p = density (both codes divide
    0 by 0 there). Defaults: paper preset density 0.7, ε 0.07 (the reference README's example
    run: drop rate 0.3, window 0.14 = 2ε; it also uses λ 1.1, default here 1.0); ``mergekit``
    preset density 1.0, ε 0.15, ``rescale: true``. Weights multiply τ̂_t (unit weights: no
    change).
    """

PAPER: dict[str, Any] = {}
MERGEKIT = {"density": 1.0, "epsilon": 0.15, "rescale": "l1", "magprune": "mergekit"}


def _memory_factor(params: dict[str, Any]) -> float:
    """Working copies per input: 5; the magnitude ranks (two argsorts per row, int64 indices and
    the sort's buffers) take ~5 more while any density < 1."""
    return 10.0 if any(d < 1 for d in params["density"]) else 5.0


@merge_method(
    "della",
    search=scale_search(8),
    params=_params("weighted_mean"),
    needs_base=True,
    presets={"paper": PAPER, "mergekit": MERGEKIT},
    default_preset="paper",
    memory_factor=_memory_factor,
    widens_inputs=True,
    elementwise=_elementwise("della"),
)
def della(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    lambda_: float,
    rescale: str,
    magprune: str,
    aggregate: str,
) -> torch.Tensor:
    """DELLA-Merging (Deep, Bhardwaj & Poria 2024): MAGPRUNE drop, sign election, weighted fuse.

    θ = θ_0 + λ · Σ_{t agreeing} w_t τ̂_t / Σ_{t agreeing} w_t with τ̂_t = MAGPRUNE(τ_t): Drop,
    Elect, Fuse.

    Elect: γ = sign(Σ_t w_t τ̂_t) per entry, 0 → + (the reference code's and mergekit's
    ``get_mask``); Fuse: mean of the agreeing w_t τ̂_t weighted by w (``normalize`` true in both
    codes; ``aggregate="sum"`` skips the division), times λ."""
    dropped = _dropped(tensors, base, ctx, density, epsilon, rescale, magprune, "della")
    return _fuse(dropped, base, weight, lambda_, aggregate, elect=True)


@merge_method(
    "della_linear",
    search=scale_search(8),
    params=_params("weighted_mean"),
    needs_base=True,
    presets={"paper": PAPER, "mergekit": {**MERGEKIT, "aggregate": "sum"}},
    default_preset="paper",
    memory_factor=_memory_factor,
    widens_inputs=True,
    elementwise=_elementwise("della_linear"),
)
def della_linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    lambda_: float,
    rescale: str,
    magprune: str,
    aggregate: str,
) -> torch.Tensor:
    """DELLA (Deep et al. 2024) without the sign election: θ_0 + λ Σ_t w_t MAGPRUNE(τ_t) (÷ Σ w).

    θ = θ_0 + λ Σ_t w_t τ̂_t (÷ Σ_t w_t with ``aggregate="weighted_mean"``), τ̂_t = MAGPRUNE(τ_t):
    mergekit's ``della_linear``; the paper's "no elect" ablation.

    Presets: ``paper`` divides by Σ w (the reference code's no-elect variants keep ``normalize``
    true); ``mergekit`` does not (its ``della_linear`` defaults to ``normalize: false``)."""
    dropped = _dropped(tensors, base, ctx, density, epsilon, rescale, magprune, "della_linear")
    return _fuse(dropped, base, weight, lambda_, aggregate, elect=False)


della.fn.__doc__ = (della.fn.__doc__ or "") + _DOC
della_linear.fn.__doc__ = (della_linear.fn.__doc__ or "") + _DOC
