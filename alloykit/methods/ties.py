"""TIES-Merging: trim each task vector, elect a sign per entry, merge the agreeing entries."""

from __future__ import annotations

from typing import Any

import torch

from alloykit.methods.base import Param, TensorContext, merge_method, release
from alloykit.methods.primitives import (
    LAMBDA,
    WEIGHT,
    ModelTopK,
    at_least,
    cache_block,
    combine_in_blocks,
    density_param,
    elect_and_combine,
    scale_search,
    stack_weights,
    task_vector,
    topk_rule_ignored,
    trim_task_vectors,
    trims_elementwise,
)


def _elected_sign(raw: torch.Tensor, weighted: torch.Tensor, sign: str) -> torch.Tensor:
    """γ before the zero fallback: sign(Σ τ̂_t), sign(Σ sign(w_t τ̂_t)) or sign(Σ w_t τ̂_t)."""
    if sign == "sum":
        return raw.sum(dim=0).sign()
    if sign == "count":
        return weighted.sign().sum(dim=0).sign()
    return weighted.sum(dim=0).sign()


def _elected(
    tensors: list[torch.Tensor], base: torch.Tensor, state: Any, params: dict[str, Any]
) -> torch.Tensor:
    """Elected sign before the zero fallback (used by the model-wide majority pass)."""
    ctx = TensorContext("", stats=state)
    raw = trim_task_vectors(
        tensors,
        base,
        ctx,
        params["density"],
        params["topk"],
        params["topk_rule"],
        params["rescale"],
    )
    return _elected_sign(raw, raw * stack_weights(params["weight"], raw), params["sign"])


def _zero_sums(
    record: dict[str, torch.Tensor],
    raw: torch.Tensor,
    deltas: torch.Tensor,
    weights: list[float],
    base: torch.Tensor,
    sign: str,
    aggregate: str,
    lambda_: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The sign pass fused into the merge pass (``ModelTopK(fuse_sign=True)``): this part's sum
    of elected signs (float64), the flat indices of the entries whose elected sum is exactly 0
    while some w_t τ̂_t is not, and their merged values under the fallback −1 (the result holds
    them under +1), or None. Elsewhere the fallback changes nothing, so the engine's patch gives
    the bytes of the separate pass.

    ``record``: the election's sum and kept counts (:func:`elect_and_combine`). With every weight
    > 0, a zero sum of nonzero entries has entries of both signs under every sign rule, so the
    entries that matter are those where the +1 fallback kept some task."""
    elected = record["total"].sign()
    zero = elected == 0
    if all(w > 0 for w in weights):
        undecided = zero & (record["kept"] > 0)
    else:
        undecided = zero & (deltas != 0).any(dim=0)
    index = undecided.reshape(-1).nonzero().squeeze(1)
    alternative = None
    if index.numel():
        alternative = _merged_with_negative_fallback(raw, deltas, weights, index, sign, aggregate)
        if lambda_ != 1:
            alternative *= lambda_
        alternative = base.reshape(-1)[index] + alternative
    # (a sum of at most 2**24 signs is exact in float32, and any number of them in float64)
    return elected.sum().to(torch.float64), index, alternative


_SUM_GROUP = 64  # a multiple of the columns torch's CPU sums over the task axis take at once


def _merged_with_negative_fallback(
    raw: torch.Tensor,
    deltas: torch.Tensor,
    weights: list[float],
    index: torch.Tensor,
    sign: str,
    aggregate: str,
) -> torch.Tensor:
    """The merge of entries ``index`` (flat) under the fallback −1, with the bytes a merge of the
    whole part under −1 would give them. A sum over the task axis adds an entry's T terms in an
    order that depends on where its column falls: torch's CPU kernel takes columns in aligned
    groups (8 or 16 floats × 4) and the ragged end of a row its own way; from 5 tasks on, the
    orders give different roundings, and an elected sum that was exactly 0 may not be once
    re-added. So the entries are merged again inside the aligned groups of ``_SUM_GROUP`` columns
    that hold them (the whole part if one lies in its ragged end)."""
    n = len(raw)
    flat_raw, flat_deltas = raw.reshape(n, -1), deltas.reshape(n, -1)
    columns = flat_raw.shape[1]
    if int(index[-1]) >= columns - columns % _SUM_GROUP:
        sub_raw, sub, at = flat_raw, flat_deltas, index
    else:
        groups = torch.unique_consecutive(index // _SUM_GROUP)
        offsets = torch.arange(_SUM_GROUP, device=index.device)
        picked = (groups.reshape(-1, 1) * _SUM_GROUP + offsets).reshape(-1)
        sub_raw, sub = flat_raw[:, picked], flat_deltas[:, picked]
        at = torch.searchsorted(picked, index)
    w = torch.tensor(weights, dtype=sub.dtype, device=sub.device).reshape(n, 1)
    merged = elect_and_combine(
        sub, w, consensus="sign", sign=sign, zero_sign=-1.0, aggregate=aggregate, raw=sub_raw
    )
    return merged[at]


class _ZeroSums:
    """The fused sign pass's share of one job, gathered over its blocks of entries and reported
    to the engine once (``ctx.defer``)."""

    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.index: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def add(self, share: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], start: int) -> None:
        partial, index, alternative = share
        self.total = self.total.to(partial.device) + partial
        if alternative is not None:
            self.index.append(index + start)
            self.values.append(alternative)

    def report(self, ctx: TensorContext, device: torch.device) -> None:
        if self.values:
            ctx.defer(self.total, torch.cat(self.index), {-1.0: torch.cat(self.values)})
        else:
            ctx.defer(self.total, torch.zeros(0, dtype=torch.int64, device=device), {})


def _ignored(params: dict[str, Any]) -> dict[str, str]:
    out = topk_rule_ignored(params)
    if params["topk"] != "model" and params["threshold"] != "exact":
        out["threshold"] = "only the whole-model trim (topk: model) has an approximate threshold"
    return out


PAPER = {}  # the declared defaults are the reference code's
MERGEKIT = {
    "density": 1.0,
    "topk": "tensor",
    "topk_rule": "exact",
    "sign": "weighted_sum",
    "zero_sign": "positive",
    "aggregate": "weighted_mean",
}


@merge_method(
    "ties",
    search=scale_search(4),
    params=[
        WEIGHT,
        density_param(0.2, "fraction of entries of each task vector kept (paper: top 20 %)"),
        LAMBDA,
        Param(
            "topk",
            str,
            "model",
            choices=("model", "tensor"),
            help="trim over the whole model per task (paper) or per tensor (mergekit)",
        ),
        Param(
            "topk_rule",
            str,
            "kthvalue",
            choices=("kthvalue", "exact"),
            help="per-tensor trim: |δ| ≥ k-th value (reference code) or exactly k (mergekit)",
        ),
        Param(
            "sign",
            str,
            "sum",
            choices=("sum", "weighted_sum", "count"),
            help="elect sign(Σ τ̂_t), sign(Σ w_t τ̂_t) or the majority of signs",
        ),
        Param(
            "zero_sign",
            str,
            "model_majority",
            choices=("model_majority", "positive"),
            help="sign used where the elected sum is 0",
        ),
        Param(
            "aggregate",
            str,
            "mean",
            choices=("mean", "weighted_mean", "sum"),
            help="disjoint mean (paper), Σ w τ̂ / Σ w over agreeing (mergekit), or sum",
        ),
        Param(
            "threshold",
            str,
            "exact",
            choices=("exact", "approximate"),
            help="whole-model trim threshold: exact kthvalue (2 passes) or the lower edge of its "
            "histogram bucket (1 pass; keeps the entries within 2⁻⁷ below the exact threshold too)",
        ),
        Param(
            "rescale",
            str,
            "none",
            choices=("none", "l1"),
            help="restore each trimmed task vector's L1 norm (mergekit's rescale)",
        ),
    ],
    needs_base=True,
    presets={"paper": PAPER, "mergekit": MERGEKIT},
    default_preset="paper",
    reduction=ModelTopK(
        elected_sign=_elected, fuse_sign=True, approximate=lambda p: p["threshold"] == "approximate"
    ),
    # Working copies per input. The exact per-tensor top-k (mergekit) sorts each task vector
    # before the stack is formed (trim_task_vectors): |δ|, int64 indices and the sorter's 64-bit
    # keys, 5 float32 copies of one tensor, within the merge's 4 per input (3 inputs or more).
    memory_factor=4.0,
    elementwise=trims_elementwise,
    ignores=_ignored,
    widens_inputs=True,
)
def ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    weight: list[float],
    density: list[float],
    lambda_: float,
    topk: str,
    topk_rule: str,
    sign: str,
    zero_sign: str,
    aggregate: str,
    threshold: str,
    rescale: str,
) -> torch.Tensor:
    """θ = θ_0 + λ · merge_t(trim(τ_t)) (Yadav et al. 2023, "TIES-Merging", NeurIPS).

    1. Trim: keep the top ``density`` of |τ_t| (per task over the whole model, or per tensor).
    2. Elect: γ = sign(Σ_t τ̂_t) per entry; where that sum is 0, the reference code uses the sign
       of the sum of all elected signs over the model (``model_majority``), mergekit uses +.
    3. Disjoint merge over the tasks whose sign(w_t τ̂_t) = γ: mean over them (paper),
       Σ w_t τ̂_t / Σ w_t (mergekit's ``normalize``) or the plain sum.

    Presets: ``paper`` (default) follows the authors' code (``prateeksr/TIES-Merging``, also
    FusionBench): whole-model trim with ``|τ| ≥ kthvalue(d − int(d·density))`` (so ties at the
    threshold keep a few more than k), unweighted sign sum, disjoint mean, density 0.2.
    ``mergekit`` gives mergekit 0.1.5's ``ties``: per-tensor exact top-k by ``argsort``, sign of
    the weighted sum with 0 → +, weight-normalised mean, density 1.0. The paper tunes λ on
    validation data; the default is 1.0. Weights multiply τ̂_t before election in every preset
    (with unit weights, as in the paper, this changes nothing). ``topk_rule`` is ignored when
    ``topk="model"`` (the whole-model threshold always follows the reference code).

    Streaming: the whole-model threshold takes two reading passes (exact radix selection, see
    :class:`ModelTopK`), or one with ``threshold="approximate"`` (the threshold t̃ is the lower edge
    of the 2⁻⁷-wide bucket holding the exact t, so entries with t̃ ≤ |τ| < t are kept too). The
    model-majority fallback's sign sum is taken in the merge pass itself; entries whose elected
    sum is exactly 0 are rewritten once it is known (the same bytes as a separate pass). With the
    threshold known, the merge pass works a cache block of entries at a time
    (:func:`_trim_and_merge_in_blocks`; same bytes as whole-tensor operations).
    """
    # The model majority may still be unknown: the engine then sums it in this pass (see
    # _zero_sums) and we merge with +1 meanwhile.
    pending = zero_sign == "model_majority" and "majority_sign" not in (ctx.stats or {})
    if zero_sign == "positive" or pending:
        fallback = 1.0
    else:
        majority = ctx.stats["majority_sign"]
        # Reference code: a zero elected sign takes the model majority; if that is 0 too, its
        # where(γ > 0, τ > 0, τ < 0) keeps the negative entries, i.e. behaves as γ = −1.
        fallback = majority if majority != 0 else -1.0
    zero_sums = _ZeroSums() if pending else None  # reported once for the whole job

    def merged(part: torch.Tensor, part_base: torch.Tensor, start: int) -> torch.Tensor:
        """λ · the disjoint merge of trimmed task vectors ``part`` (T, n) (without θ_0)."""
        w = stack_weights(weight, part)
        deltas = part if all(x == 1 for x in weight) else part * w  # (× 1 is exact: skip the copy)
        record: dict[str, torch.Tensor] | None = {} if zero_sums is not None else None
        mixed = elect_and_combine(
            deltas,
            w,
            consensus="sign",
            sign=sign,
            zero_sign=fallback,
            aggregate=aggregate,
            raw=part,
            record=record,
        )
        if lambda_ != 1:
            mixed *= lambda_
        if zero_sums is not None:
            share = _zero_sums(record, part, deltas, weight, part_base, sign, aggregate, lambda_)
            zero_sums.add(share, start)
        return mixed

    # Inputs may arrive as stored (bfloat16) with a float32 result wanted (``widens_inputs``): the
    # task vectors are formed in float32, and θ_0 + … widens the base one block at a time.
    dtype = ctx.result_dtype or base.dtype
    if topk == "model" and rescale == "none":
        # Known thresholds: trim, elect and merge a block of entries at a time, in reused buffers
        out = _trim_and_merge_in_blocks(tensors, base, ctx.stats["threshold"], dtype, merged)
    else:
        raw = trim_task_vectors(
            tensors, base, ctx, density, topk, topk_rule, rescale, dtype, release_inputs=True
        )
        if zero_sums is not None:  # one call: the deferred entries' indices are the job's own
            out = base + merged(raw, base, 0)
        else:
            out = combine_in_blocks(raw, base, lambda part, b: b + merged(part, b, 0))
    if zero_sums is not None:
        zero_sums.report(ctx, base.device)
    return out


def _trim_and_merge_in_blocks(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    thresholds: list[float | None],
    dtype: torch.dtype,
    merged: Any,
) -> torch.Tensor:
    """θ_0 + merged(trimmed τ) for whole-model thresholds (``|τ_t| ≥ thresholds[t]`` kept), a block
    of :func:`cache_block` entries at a time: τ_t is formed, trimmed, elected and merged in
    buffers reused from block to block, and no (T, …)-sized stack is ever held. Every step
    works entry by entry (sums over the task axis only), so the bytes do not depend on the block;
    they equal :func:`trim_task_vectors` followed by one merge."""
    flat_base = base.reshape(-1)
    flats = [x.reshape(-1) for x in tensors]
    numel = flat_base.numel()
    out = torch.empty(numel, dtype=torch.promote_types(base.dtype, dtype), device=base.device)
    block = cache_block(base)
    buffer = torch.empty((len(flats), min(block, numel)), dtype=dtype, device=base.device)
    for start in range(0, numel, block):
        stop = min(start + block, numel)
        # (a ragged last block gets its own contiguous stack: reductions see the layout they see
        # in one call)
        part = buffer if stop - start == buffer.shape[1] else buffer.new_empty((len(flats), stop - start))
        part_base = flat_base[start:stop]
        for t, x in enumerate(flats):
            d = task_vector(x[start:stop], part_base, dtype, out=part[t])
            if thresholds[t] is not None:
                d.mul_(at_least(d.abs().float(), thresholds[t]))  # (dropped negatives become −0)
        torch.add(part_base, merged(part, part_base, start), out=out[start:stop])
    for t in range(len(tensors)):
        release(tensors, t)
    return out.reshape(base.shape)
