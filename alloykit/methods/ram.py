"""RAM (Reinforced Agent Merging): keep each entry that only one task vector changes, average the
entries several change over those that change them; RAM+ also rescales the unique entries."""

from __future__ import annotations

import torch

from alloykit.methods.base import Param, TensorContext, merge_method

EPSILON_HELP = "|τ_t| above which an entry counts as changed by model t"


def _prepare(
    tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, N) task vectors, their "changed" mask, the count of models changing each entry (1, N),
    and the masks of entries changed by several models and by exactly one."""
    deltas = torch.stack([x - base for x in tensors], dim=0).view(len(tensors), -1)
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return deltas, changed, counts, counts > 1, counts == 1


_DOC = """

    τ_t = θ_t − θ_0; model t changes an entry where |τ_t| > ``epsilon`` (1e-5); c = the number of
    models changing it. Entries changed by one model keep its τ_t, those changed by several get
    the mean of the changing τ_t, the rest stay θ_0. Source: mergekit 0.1.5
    ``merge_methods/ram.py`` (reference: arXiv 2601.13572), operation for operation in the compute
    dtype, so the ``mergekit`` preset gives its tensors bit for bit. alloykit refuses negative
    ``epsilon``, ``r`` and ``alpha``, and ``epsilon`` = 0 for RAM+ (mergekit accepts them; RAM+
    with ε = 0 gives 0/0 = NaN for a model that changes nothing).
    """


@merge_method(
    "ram",
    params=[Param("epsilon", float, 1e-5, ge=0.0, help=EPSILON_HELP)],
    needs_base=True,
    presets={"mergekit": {}},
    default_preset="mergekit",
    min_models=1,
    memory_factor=5.0,
    elementwise=True,  # each entry depends only on the same entry of the inputs
)
def ram(
    tensors: list[torch.Tensor], base: torch.Tensor, ctx: TensorContext, *, epsilon: float
) -> torch.Tensor:
    """RAM: θ = θ_0 + Σ_t [c = 1] τ_t + Σ_t [c > 1] [|τ_t| > ε] τ_t / c, per entry.

    θ = θ_0 + Σ_t m_t ⊙ τ_t ⊙ ([c = 1] + [c > 1]/c), m_t = [|τ_t| > ε], c = Σ_t m_t."""
    deltas, changed, counts, overlap, unique = _prepare(tensors, base, epsilon)
    kept = deltas * changed
    merged = ((kept * unique) + (kept * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@merge_method(
    "ramplus_tl",
    params=[
        Param("r", float, 0.1, ge=0.0, help="strength of the rescale of the unique entries"),
        Param("alpha", float, 0.2, ge=0.0, help="cap on the overlap ratio ρ_t"),
        # > 0: it also bounds the denominator of ρ_t (0/0 when a model changes nothing)
        Param("epsilon", float, 1e-5, gt=0.0, help=EPSILON_HELP),
    ],
    needs_base=True,
    presets={"mergekit": {}},
    default_preset="mergekit",
    min_models=1,
    memory_factor=5.0,
    elementwise=False,  # ρ_t counts entries over the whole tensor
)
def ramplus_tl(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    r: float,
    alpha: float,
    epsilon: float,
) -> torch.Tensor:
    """RAM+ (tensor-local): RAM with model t's unique entries scaled by λ_t = 1 + r·min(ρ_t, α).

    θ = θ_0 + Σ_t m_t ⊙ τ_t ⊙ (λ_t [c = 1] + [c > 1]/c), λ_t = 1 + r·clamp(ρ_t, 0, α),
    ρ_t = #{entries model t changes that others change too} / max(#{entries only model t
    changes}, ε), counted over this tensor ("tensor-local").

    λ_t is float32 (torch's default dtype: mergekit divides integer counts), so for half
    precision inputs the result, and mergekit's output tensor, are float32; a mergekit recipe
    without ``out_dtype`` is therefore written in float32, as mergekit writes it."""
    deltas, changed, counts, overlap, unique = _prepare(tensors, base, epsilon)
    shared_counts = (changed & overlap).sum(dim=1)
    unique_counts = (changed & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    scale = 1 + r * rho.clamp(min=0, max=alpha)
    kept = deltas * changed
    merged = ((kept * unique * scale.unsqueeze(-1)) + (kept * overlap / counts.clamp(min=1))).sum(
        dim=0, keepdim=True
    )
    return base + merged.reshape_as(base)


ram.fn.__doc__ = (ram.fn.__doc__ or "") + _DOC
ramplus_tl.fn.__doc__ = (ramplus_tl.fn.__doc__ or "") + _DOC
