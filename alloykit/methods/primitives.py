"""Pieces the task-vector methods share: trimming, random drops, sign election, aggregation,
and the exact whole-model top-k threshold (a :class:`~alloykit.methods.base.Reduction`).

Notation: δ_t = θ_t − θ_0 is model t's task vector for one tensor, w_t its weight.
"""

from __future__ import annotations

from typing import Any

import torch

from alloykit.methods.base import Param, TensorContext

# Parameters every task-vector method declares the same way.
WEIGHT = Param("weight", float, 1.0, per_model=True, help="w_t, multiplies task vector t")
LAMBDA = Param("lambda", float, 1.0, help="λ, scales the merged task vector")


def trims_elementwise(params: dict[str, Any]) -> bool:
    """A trim is elementwise when nothing is trimmed, or when a whole-model threshold is given
    and no per-tensor L1 rescale follows."""
    return all(d >= 1 for d in params["density"]) or (
        params["topk"] == "model" and params["rescale"] == "none"
    )


def density_param(default: float, help: str) -> Param:
    return Param("density", float, default, per_model=True, ge=0.0, le=1.0, help=help)


# ----------------------------------------------------------------------------- trimming


def topk_mask_exact(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly k = max(1, int(density·numel)) entries of largest |δ| (mergekit's
    ``sparsify.magnitude``: ``argsort(|δ|, descending)[:k]``, so ties break as argsort does)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = True
    return mask.reshape(delta.shape)


def kth_threshold(numel: int, density: float) -> int | None:
    """Rank (1-based, from the smallest) of the threshold the TIES reference code uses:
    ``kthvalue(d − int(d·density))``, keeping |δ| ≥ that value (ties keep more than k).
    ``None`` means keep everything."""
    if density >= 1 or numel == 0:
        return None
    return max(1, numel - int(numel * density))


def topk_mask_kthvalue(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Per-tensor version of the reference code's rule: |δ| ≥ kthvalue(|δ|, d − int(d·density))."""
    rank = kth_threshold(delta.numel(), density)
    if rank is None:
        return torch.ones_like(delta, dtype=torch.bool)
    mags = delta.abs().reshape(-1).float()
    return (mags >= mags.kthvalue(rank).values).reshape(delta.shape)


def bernoulli_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE's drop rate p = 1 − density)."""
    if density >= 1:
        return torch.ones(shape)
    return torch.bernoulli(torch.full(shape, float(density)), generator=generator)


def rescale_l1(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Masked δ times ‖δ‖₁ / ‖masked δ‖₁ (mergekit's ``rescale``; unchanged when a norm < eps)."""
    masked = delta * mask
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


# ----------------------------------------------------------------------------- combination


def elect_and_combine(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    consensus: str | None,
    sign: str = "weighted_sum",
    zero_sign: float = 1.0,
    aggregate: str = "sum",
    raw: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ over tasks of weighted deltas, optionally restricted to those agreeing with an elected sign.

    ``deltas``: (T, …) already trimmed/dropped and multiplied by their weights; ``weights``
    broadcastable to it. ``raw`` are the unweighted deltas, used by ``sign="sum"``.

    * consensus ``None``: no election; ``aggregate`` ``sum`` → Σ w_tδ_t, ``weighted_mean`` →
      Σ w_tδ_t / Σ w_t (|Σ w| < 1e-8 → 1), as mergekit's ``normalize``.
    * consensus ``"sign"``: γ = sign of Σ_t w_tδ_t (``weighted_sum``), of Σ_t δ_t (``sum``) or
      of Σ_t sign(w_tδ_t) (``count``); γ = 0 becomes ``zero_sign``. Keep entries with
      sign(w_tδ_t) = γ (zeros never agree). ``sum`` → Σ kept; ``weighted_mean`` → Σ kept /
      Σ w of kept (0 → 1, mergekit); ``mean`` → Σ kept / number kept (TIES "disjoint mean").
    """
    if consensus is None:
        mixed = deltas.sum(dim=0)
        if aggregate == "weighted_mean":
            divisor = weights.sum(dim=0)
            mixed /= torch.where(divisor.abs() < 1e-8, 1.0, divisor)
        elif aggregate != "sum":
            raise ValueError(f"aggregate {aggregate!r} needs a sign consensus")
        return mixed
    signs = deltas.sign()
    if sign == "weighted_sum":
        total = deltas.sum(dim=0)
    elif sign == "sum":
        total = (raw if raw is not None else deltas).sum(dim=0)
    elif sign == "count":
        total = signs.sum(dim=0)
    else:
        raise ValueError(f"unknown sign rule {sign!r}")
    # (torch.where rather than boolean indexing: the same values, several times faster)
    elected = torch.where(total == 0, zero_sign, total.sign())
    mask = (signs == elected).to(deltas.dtype)
    mixed = (deltas * mask).sum(dim=0)
    if aggregate == "weighted_mean":
        divisor = (weights * mask).sum(dim=0)
        mixed /= torch.where(divisor == 0, 1.0, divisor)
    elif aggregate == "mean":
        mixed /= mask.sum(dim=0).clamp(min=1)
    elif aggregate != "sum":
        raise ValueError(f"unknown aggregate {aggregate!r}")
    return mixed


def stack_weights(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-model weights as a (T, 1, …, 1) tensor broadcastable to stacked (T, …) deltas."""
    w = torch.tensor(weights, dtype=like.dtype)
    return w.reshape((len(weights),) + (1,) * (like.dim() - 1))


# ----------------------------------------------------------------------------- whole-model top-k


_HI = 1 << 15  # float32 bit patterns of |x| have sign bit 0: the top 16 bits lie in [0, 2**15)


def _bits(delta: torch.Tensor) -> torch.Tensor:
    # For non-negative float32, the int32 bit pattern orders exactly like the value.
    return delta.abs().float().contiguous().reshape(-1).view(torch.int32)


class ModelTopK:
    """Exact per-task threshold for "keep the top ``density`` of |τ_t| over the whole model".

    The reference code flattens every task vector and calls ``kthvalue``; that needs the whole
    model in memory. The same value is found here in two streaming passes by radix selection on
    float32 bit patterns: pass 0 histograms the top 16 bits of |δ| per task and finds the bucket
    holding the k-th smallest; pass 1 histograms the low 16 bits inside that bucket. The result
    is bit-identical to ``kthvalue`` on the concatenated vector.

    ``deltas_of(tensors, base, params)`` gives the (T, …) task vectors the method trims, so the
    same reduction serves any method that trims before it combines. An optional third pass sums
    the elected signs over the model (the reference code's fallback for a zero elected sign).
    """

    def __init__(self, elected_sign: Any = None):
        # elected_sign(tensors, base, state, params) -> elected sign before the zero fallback;
        # given by methods that elect signs and want the reference code's model-wide fallback.
        self.elected_sign = elected_sign

    def _threshold_passes(self, params: dict[str, Any]) -> int:
        return 2 if params.get("topk") == "model" else 0

    def passes(self, params: dict[str, Any]) -> int:
        extra = 1 if self.elected_sign and params.get("zero_sign") == "model_majority" else 0
        return self._threshold_passes(params) + extra

    def map(
        self,
        index: int,
        state: Any,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        ctx: TensorContext,
        params: dict[str, Any],
    ) -> Any:
        deltas = [t - base for t in tensors]
        if index < self._threshold_passes(params):
            if index == 0:
                return torch.stack([torch.bincount(_bits(d) >> 16, minlength=_HI) for d in deltas])
            rows = []
            for t, d in enumerate(deltas):
                bucket, _ = state["bucket"][t]
                if bucket is None:
                    rows.append(torch.zeros(1 << 16, dtype=torch.int64))
                    continue
                bits = _bits(d)
                inside = bits[(bits >> 16) == bucket] & 0xFFFF
                rows.append(torch.bincount(inside, minlength=1 << 16))
            return torch.stack(rows)
        # Sign pass: the method computes the elected signs; we only add them up.
        return self.elected_sign(tensors, base, state, params).sum().to(torch.float64)

    def fold(self, index: int, acc: Any, partial: Any) -> Any:
        return partial if acc is None else acc + partial

    def finish(self, index: int, state: Any, acc: Any, params: dict[str, Any]) -> Any:
        state = dict(state or {})
        n_thr = self._threshold_passes(params)
        if index < n_thr:
            densities = params["density"]
            if acc is None:  # no tensor at all
                state["threshold"] = [None for _ in densities]
                return state
            if index == 0:
                total = int(acc[0].sum())
                state["numel"] = total
                buckets = []
                for t, hist in enumerate(acc):
                    rank = kth_threshold(total, densities[t])
                    if rank is None:
                        buckets.append((None, None))
                        continue
                    cum = torch.cumsum(hist, 0)
                    b = int(torch.searchsorted(cum, torch.tensor(rank)))
                    before = int(cum[b - 1]) if b > 0 else 0
                    buckets.append((b, rank - before))
                state["bucket"] = buckets
            else:
                thresholds = []
                for t, hist in enumerate(acc):
                    bucket, rank = state["bucket"][t]
                    if bucket is None:
                        thresholds.append(None)
                        continue
                    cum = torch.cumsum(hist, 0)
                    low = int(torch.searchsorted(cum, torch.tensor(rank)))
                    bits = torch.tensor([(bucket << 16) | low], dtype=torch.int32)
                    thresholds.append(float(bits.view(torch.float32)))
                state["threshold"] = thresholds
            return state
        total = float(acc) if acc is not None else 0.0
        state["majority_sign"] = 1.0 if total > 0 else (-1.0 if total < 0 else 0.0)
        return state


def trim_task_vectors(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    density: list[float],
    topk: str,
    topk_rule: str,
    rescale: str = "none",
) -> torch.Tensor:
    """(T, …) task vectors δ_t = θ_t − θ_0, each keeping its largest-|δ| entries.

    ``topk="model"`` uses the per-task thresholds of :class:`ModelTopK` (in ``ctx.stats``);
    ``topk="tensor"`` trims each tensor on its own with ``topk_rule`` ``exact`` (mergekit) or
    ``kthvalue`` (reference-code rule). ``rescale="l1"`` restores each δ_t's L1 norm."""
    out = torch.empty((len(tensors), *base.shape), dtype=base.dtype)
    for i, x in enumerate(tensors):
        d = torch.sub(x, base, out=out[i])
        if topk == "model":
            thr = ctx.stats["threshold"][i]
            mask = None if thr is None else d.abs().float() >= thr  # (no copy for float32)
        elif topk_rule == "exact":
            mask = None if density[i] >= 1 else topk_mask_exact(d, density[i])
        else:
            mask = None if density[i] >= 1 else topk_mask_kthvalue(d, density[i])
        if mask is not None:
            # A float mask, as mergekit multiplies: dropped negative entries become -0.0 there too.
            out[i] = rescale_l1(d, mask) if rescale == "l1" else d * mask.to(d.dtype)
    return out
