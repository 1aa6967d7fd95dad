"""RegMean: the linear layer whose outputs are closest to every model's on its own data."""

from __future__ import annotations

import torch

from alloykit.calibration.statistics import gram_of
from alloykit.methods.base import Continuous, Param, TensorContext, merge_method


def shrink_off_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """G̃ = a·G + (1 − a)·diag(G): off-diagonal entries × a, the diagonal kept."""
    if ratio == 1.0:
        return gram
    return ratio * gram + (1.0 - ratio) * torch.diag_embed(torch.diagonal(gram))


def regmean_matrix(weights: list[torch.Tensor], grams: list[torch.Tensor], ratio: float) -> torch.Tensor:
    """W* = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹ for weights stored d_out × d_in (the closed-form minimiser of
    Σ_t ‖X_t W*ᵀ − X_t W_tᵀ‖² with the shrunk Grams). Input features that no model's data ever
    activates (a zero row of Σ G̃) leave the system singular; their columns take the mean of
    the models' columns (the reference code's ``torch.inverse`` would fail or return Inf)."""
    shrunk = [shrink_off_diagonal(g, ratio) for g in grams]
    a = torch.stack(shrunk).sum(0)
    b = torch.stack([g @ w.T for g, w in zip(shrunk, weights, strict=True)]).sum(0)  # d_in × d_out
    dead = torch.diagonal(a) == 0
    if bool(dead.any()):
        mean = torch.stack(weights).mean(0)
        a = a.clone()
        a[dead, :] = 0.0
        a[:, dead] = 0.0
        a[dead, dead] = 1.0
        b = b.clone()
        b[dead, :] = mean.T[dead, :]
    return torch.linalg.solve(a, b).T


@merge_method(
    "regmean",
    search={"reduce_nondiag": Continuous(0.0, 1.0, grid=(0.1, 0.3, 0.5, 0.7, 0.9, 1.0))},
    params=[
        Param(
            "reduce_nondiag",
            float,
            0.9,
            ge=0.0,
            le=1.0,
            help="a: off-diagonal Gram entries × a (1: plain RegMean, 0: a per-column weighted mean)",
        ),
        Param(
            "normalize",
            str,
            "tokens",
            choices=("tokens", "none"),
            help="each model's Gram divided by its token count (reference code) or summed as is",
        ),
    ],
    needs_base=False,
    presets={"paper": {}},
    default_preset="paper",
    memory_factor=4.0,
    statistics="activations",
)
def regmean(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    ctx: TensorContext,
    *,
    reduce_nondiag: float,
    normalize: str,
) -> torch.Tensor:
    """RegMean: W* = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ per linear layer, G_t = X_tᵀX_t / N_t
    (Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
    Models", ICLR 2023).

    G̃_t = a·G_t + (1 − a)·diag(G_t) shrinks the off-diagonal entries (the paper's α, tuned on
    validation; 0.9 here by default; MergeLM's code default is 1.0, FusionBench's CLIP config
    0.6). Each model's Gram is the mean over its N_t tokens, as in the reference code
    (``MergeLM``/``FusionBench`` ``regmean_merging``). Tensors without statistics (biases,
    norms, embeddings, heads) are averaged. Computed in float64.

    Deviation: input features that no model's data activates take the models' mean column
    instead of failing to invert. GPT-2 ``Conv1D`` weights (stored d_in × d_out) are handled.
    """
    entries = ctx.statistics
    wd = torch.float64
    if base is not None and base.dim() != 2 or tensors[0].dim() != 2 or not entries or entries[0] is None:
        return torch.stack([t.to(wd) for t in tensors]).mean(0).to(tensors[0].dtype)
    transposed = bool(entries[0].get("transposed"))
    weights = [(t.T if transposed else t).to(wd) for t in tensors]
    grams = []
    for e in entries:
        g = gram_of(e, wd)
        grams.append(g / e["tokens"] if normalize == "tokens" else g)
    merged = regmean_matrix(weights, grams, reduce_nondiag)
    return (merged.T if transposed else merged).to(tensors[0].dtype)
