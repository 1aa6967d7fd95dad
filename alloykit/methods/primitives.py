"""Pieces the task-vector methods share: trimming, random drops, sign election, aggregation,
and the exact whole-model top-k threshold (a :class:`~alloykit.methods.base.Reduction`).

Notation: δ_t = θ_t − θ_0 is model t's task vector for one tensor, w_t its weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from alloykit.methods.base import Continuous, Param, SearchSpace, TensorContext, release

# Parameters every task-vector method declares the same way.
WEIGHT = Param("weight", float, 1.0, per_model=True, help="w_t, multiplies task vector t", noop_at=0.0)
LAMBDA = Param("lambda", float, 1.0, help="λ, scales the merged task vector", noop_at=0.0)


def scale_search(high: float, name: str = "lambda") -> SearchSpace:
    """The usual tuning of a task-vector method: its final scale, searched on [0, high]."""
    return {
        name: Continuous(
            0.0, high, grid=tuple(round(high * i / 8, 6) for i in range(1, 9)), scales_update=True
        )
    }


def trims_elementwise(params: dict[str, Any]) -> bool:
    """A trim is elementwise when nothing is trimmed, or when a whole-model threshold is given
    and no per-tensor L1 rescale follows."""
    return all(d >= 1 for d in params["density"]) or (
        params["topk"] == "model" and params["rescale"] == "none"
    )


WHOLE_MODEL_DENSITY = (
    "the whole-model trim (topk: model, the paper preset) keeps one density per model; set "
    "topk: tensor (as the mergekit preset does) to trim each tensor with its own density"
)


def topk_rule_ignored(params: dict[str, Any]) -> dict[str, str]:
    """``topk_rule`` only chooses the per-tensor trim; the whole-model one follows the reference."""
    if params["topk"] == "model":
        return {"topk_rule": "with topk: model the threshold is the reference code's kthvalue rule"}
    return {}


def density_param(default: float, help: str) -> Param:
    return Param("density", float, default, per_model=True, ge=0.0, le=1.0, help=help, noop_at=0.0)


# ----------------------------------------------------------------------------- trimming


def topk_mask_exact(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly k = max(1, int(density·numel)) entries of largest |δ| (mergekit's
    ``sparsify.magnitude``: ``argsort(|δ|, descending)[:k]``, so ties break as argsort does)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return _select(delta.abs().reshape(-1).float(), density, "exact").reshape(delta.shape)


def _select(mags: torch.Tensor, density: float, rule: str) -> torch.Tensor:
    """The per-tensor trim mask over flat float32 magnitudes (at least one entry, density < 1),
    which it may overwrite: ``exact`` (:func:`topk_mask_exact`) or ``kthvalue``
    (:func:`topk_mask_kthvalue`)."""
    if rule == "kthvalue":
        return mags >= mags.kthvalue(kth_threshold(mags.numel(), density)).values
    if density <= 0:
        return torch.zeros_like(mags, dtype=torch.bool)
    return _top_k_of(mags, density)


def _top_k_of(mags: torch.Tensor, density: float) -> torch.Tensor:
    """:func:`topk_mask_exact` over flat float32 magnitudes (0 < density < 1), which it may
    overwrite (the caller's to lose)."""
    k = max(1, int(density * mags.numel()))
    # When the k-th largest value is not tied across the cut, the top-k set is unique and a
    # linear-time selection finds it; only a tie at the cut needs argsort's own tie order.
    kth = mags.kthvalue(mags.numel() - k + 1).values
    above = mags >= kth
    if int(above.sum()) == k:
        return above
    del above
    # argsort(mags, descending=True), without argsort's own copy of the values: the same sort of
    # the same values, run over mags itself (ours, not needed after), gives the same order
    order = torch.empty(mags.numel(), dtype=torch.long, device=mags.device)
    torch.sort(mags, descending=True, out=(mags, order))
    mask = torch.zeros(mags.numel(), dtype=torch.bool, device=mags.device)
    mask[order[:k]] = True
    return mask


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
    return _select(delta.abs().reshape(-1).float(), density, "kthvalue").reshape(delta.shape)


def bernoulli_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE's drop rate p = 1 − density)."""
    if density >= 1:
        return torch.ones(shape)
    # u < p with u ~ U[0, 1) is Bernoulli(p); as sign(p − u) clamped at 0, in float arithmetic
    # (3× faster here than torch.bernoulli on a filled tensor).
    return (float(density) - torch.rand(shape, generator=generator)).sign_().clamp_(min=0)


L1_EPS = 1e-7  # below this L1 norm (before or after masking) mergekit does not rescale


def restore_l1_(masked: torch.Tensor, before: torch.Tensor, eps: float = L1_EPS) -> torch.Tensor:
    """``masked`` times ‖δ‖₁ / ‖masked‖₁ in place, ``before`` = ‖δ‖₁ taken before masking (as it
    was when neither norm is below ``eps``: mergekit's rule)."""
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked.mul_(before / after)


def rescale_l1(delta: torch.Tensor, mask: torch.Tensor, eps: float = L1_EPS) -> torch.Tensor:
    """Masked δ times ‖δ‖₁ / ‖masked δ‖₁ (mergekit's ``rescale``; unchanged when a norm < eps)."""
    return restore_l1_(delta * mask, delta.abs().sum(), eps)


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
    record: dict[str, torch.Tensor] | None = None,
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

    ``record`` (with a consensus) receives ``total``, the sum whose sign is γ before the zero
    rule, and ``kept``, the number of tasks kept per entry.
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
    # Float arithmetic instead of boolean masks (the same values; bool kernels are several times
    # slower here): γ ∈ {−1, 0, 1} → γ + (1 − |γ|)·zero_sign, and sign·γ is 1 exactly where they agree.
    elected = total.sign()
    elected += (1 - elected.abs()) * zero_sign
    mask = (signs * elected).clamp_(min=0)
    mixed = (deltas * mask).sum(dim=0)
    kept = mask.sum(dim=0) if aggregate == "mean" or record is not None else None
    if aggregate == "weighted_mean":
        divisor = (weights * mask).sum(dim=0)
        mixed /= torch.where(divisor == 0, 1.0, divisor)
    elif aggregate == "mean":
        mixed /= kept.clamp(min=1)
    elif aggregate != "sum":
        raise ValueError(f"unknown aggregate {aggregate!r}")
    if record is not None:
        record.update(total=total, kept=kept)
    return mixed


COMBINE_BLOCK = 1 << 20  # entries combined at a time by combine_in_blocks
CACHE_BLOCK = 1 << 18  # entries per step of a fused CPU loop (a multiple of 64: see ties._SUM_GROUP)


def cache_block(like: torch.Tensor) -> int:
    """Entries per step of a loop that chains many elementwise operations over the same entries:
    on the CPU a block of a few MiB of temporaries, reused from step to step (whole-chunk
    temporaries are fresh allocations, page-faulted in each time); on an accelerator the whole
    tensor, where each step costs kernel launches instead."""
    return CACHE_BLOCK if like.device.type == "cpu" else max(like.numel(), 1)


def combine_in_blocks(
    stacked: torch.Tensor,
    base: torch.Tensor,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    block: int | None = None,
) -> torch.Tensor:
    """``combine(stacked, base)`` for a combination that works entry by entry (a sign election and
    sum over the task axis, then θ_0 + …), run over blocks of ``block`` entries: a whole-tensor
    job (an embedding under a per-tensor mask) then holds no (T, …)-sized temporaries beside its
    stacked task vectors. ``stacked`` is (T, …) and ``base`` (…); the same bytes as one call."""
    block = block or COMBINE_BLOCK
    numel = base.numel()
    if numel <= block:
        return combine(stacked, base)
    flat = stacked.reshape(stacked.shape[0], -1)
    flat_base = base.reshape(-1)
    out: torch.Tensor | None = None
    for start in range(0, numel, block):
        part = combine(flat[:, start : start + block], flat_base[start : start + block])
        if out is None:
            out = torch.empty(numel, dtype=part.dtype, device=part.device)
        out[start : start + block] = part
    assert out is not None
    return out.reshape(base.shape)


def _inplace_in_blocks(
    out: torch.Tensor, other: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``op(out, other)`` in place for tensors of one shape. Where ``other`` is of another dtype
    (a bfloat16 base beside float32 work), torch on CPU first copies the whole of it in
    ``out``'s dtype, a tensor-sized temporary; blocks of entries bound it. Entry by entry, so
    the bytes do not depend on the blocks."""
    if other.dtype == out.dtype or out.numel() <= COMBINE_BLOCK or not out.is_contiguous():
        return op(out, other)
    flat, flat_other = out.view(-1), other.reshape(-1)
    for start in range(0, flat.numel(), COMBINE_BLOCK):
        op(flat[start : start + COMBINE_BLOCK], flat_other[start : start + COMBINE_BLOCK])
    return out


def task_vector(
    x: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """θ_t − θ_0 in ``dtype``, a fresh tensor or written into ``out`` (of that dtype); the inputs
    may be narrower (as stored) and are widened exactly, the base one block at a time."""
    if out is None:
        return _inplace_in_blocks(x.to(dtype, copy=True), base, torch.Tensor.sub_)
    if out.dtype != dtype:
        raise ValueError(f"task_vector: out is {out.dtype}, expected {dtype}")
    common = torch.promote_types(x.dtype, base.dtype)
    if x.dtype == base.dtype == dtype or (common != dtype and torch.promote_types(common, dtype) == common):
        # one subtraction in the inputs' common dtype, rounded once into a narrower out (copying
        # a wider x into out first would round it before the subtraction)
        return torch.sub(x, base, out=out)
    return _inplace_in_blocks(out.copy_(x), base, torch.Tensor.sub_)


def add_base_(update: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``update += base`` in place, the base widened one block at a time."""
    return _inplace_in_blocks(update, base, torch.Tensor.add_)


def weighted_merge(
    stacked: torch.Tensor,
    base: torch.Tensor,
    weight: list[float],
    lambda_: float,
    *,
    elect: bool,
    aggregate: str,
    sign: str = "weighted_sum",
) -> torch.Tensor:
    """θ_0 + λ · :func:`elect_and_combine` of the weighted task vectors w_t δ_t (``stacked`` is
    (T, …)), with a sign election (zero sign → +) when ``elect``; in blocks of entries."""

    def combine(part: torch.Tensor, part_base: torch.Tensor) -> torch.Tensor:
        w = stack_weights(weight, part)
        mixed = elect_and_combine(
            part * w,
            w,
            consensus="sign" if elect else None,
            sign=sign,
            zero_sign=1.0,
            aggregate=aggregate,
            raw=part,
        )
        if lambda_ != 1:
            mixed *= lambda_
        return part_base + mixed

    return combine_in_blocks(stacked, base, combine)


def stack_weights(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-model weights as a (T, 1, …, 1) tensor broadcastable to stacked (T, …) deltas."""
    w = torch.tensor(weights, dtype=like.dtype, device=like.device)
    return w.reshape((len(weights),) + (1,) * (like.dim() - 1))


# ----------------------------------------------------------------------------- whole-model top-k


_HISTOGRAM_BLOCK = 1 << 20  # entries of one tensor histogrammed at a time
_HI = 1 << 15  # float32 bit patterns of |x| have sign bit 0: the top 16 bits lie in [0, 2**15)


def ties_rank(numel: int, task: int, params: dict[str, Any]) -> int | None:
    """TIES reference code: threshold = kthvalue(d − int(d·density)); None keeps everything."""
    return kth_threshold(numel, params["density"][task])


class ModelTopK:
    """Exact per-task threshold for "keep the top of |τ_t| over the whole model".

    The reference codes flatten every task vector and call ``kthvalue``; that needs the whole
    model in memory. The same value is found here in two streaming passes by radix selection on
    float32 bit patterns (for non-negative floats the bit pattern orders like the value): pass 0
    histograms the top 16 bits of |τ| per task and finds the bucket holding the k-th smallest;
    pass 1 histograms the low 16 bits inside that bucket. The result is bit-identical to
    ``kthvalue`` on the concatenated vector, ties included, with 2 × 65,536 counters per task.

    * ``rank(numel, task, params)``: 1-based rank from the smallest of the threshold value
      (entries with |τ| ≥ it are kept), or None to keep all; TIES's rule by default.
    * ``active(params)``: whether the method wants the whole-model threshold at all.
    * ``approximate(params)``: one pass only; the threshold is the lower edge of the bucket, so
      t̃ ≤ t < t̃·(1 + 2⁻⁷) and only entries of that one bucket are kept in excess.
    * ``l1``: also the L1 mass of each task vector and the part below the threshold
      (``state["removed_l1"][t]`` = ‖τ_t ⊙ (|τ_t| < threshold)‖₁ / ‖τ_t‖₁), in the same passes.
    * ``elected_sign(tensors, base, state, params)``: for methods that elect signs and want the
      TIES reference code's model-wide fallback for a zero elected sign; adds one pass that sums
      the elected signs over the model (``state["majority_sign"]``).
    * ``fuse_sign``: that sum is taken in the merge pass instead (``fused``): the method merges
      with the fallback +1, reports its sum of elected signs and the entries whose elected sum is
      exactly 0 through ``ctx.defer``, with their values for the fallback −1; the engine rewrites
      those few entries if the majority turns out ≤ 0. One read of every input less.
    * ``wide``: {parameter: hint} read once per model by ``rank`` (default: ``density``); a
      per-tensor value for them is refused by the planner (see :meth:`model_wide`).
    """

    def __init__(
        self,
        elected_sign: Any = None,
        rank: Any = ties_rank,
        active: Any = None,
        approximate: Any = None,
        l1: bool = False,
        wide: dict[str, str] | None = None,
        fuse_sign: bool = False,
    ):
        self.elected_sign = elected_sign
        self.fuse_sign = fuse_sign
        self.rank = rank
        self.active = active or (lambda p: p.get("topk") == "model")
        self.approximate = approximate or (lambda p: False)
        self.l1 = l1
        self.wide = wide if wide is not None else {"density": WHOLE_MODEL_DENSITY}

    def model_wide(self, params: dict[str, Any]) -> dict[str, str]:
        return dict(self.wide) if self._threshold_passes(params) else {}

    def _threshold_passes(self, params: dict[str, Any]) -> int:
        if not self.active(params):
            return 0
        return 1 if self.approximate(params) else 2

    def _sign_pass(self, params: dict[str, Any]) -> bool:
        return bool(self.elected_sign) and params.get("zero_sign") == "model_majority"

    def passes(self, params: dict[str, Any]) -> int:
        extra = 1 if self._sign_pass(params) and not self.fuse_sign else 0
        return self._threshold_passes(params) + extra

    def fused(self, params: dict[str, Any]) -> int | None:
        """Index of the sign pass when it runs inside the merge pass, else None."""
        return self._threshold_passes(params) if self._sign_pass(params) and self.fuse_sign else None

    @staticmethod
    def resolve(state: dict[str, Any]) -> float:
        """The fallback sign for a zero elected sum: the model majority; where that is 0 too, the
        reference code's where(γ > 0, τ > 0, τ < 0) keeps the negative entries, i.e. −1."""
        majority = state["majority_sign"]
        return majority if majority != 0 else -1.0

    def _histograms(
        self, blocks: Iterator[tuple[torch.Tensor, torch.Tensor]], size: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Bucket counts (and, for ``l1``, float64 sums of the magnitudes) of (keys, magnitudes)
        blocks. The blocking changes no bit: counts are integers, and every bucket holds values
        of one float32 exponent (24 significant bits on one grid), whose float64 sum is exact in
        any order for fewer than 2**29 entries."""
        count = torch.zeros(size, dtype=torch.int64, device=device)
        mass = torch.zeros(size, dtype=torch.float64, device=device) if self.l1 else None
        for keys, mags in blocks:
            count += torch.bincount(keys, minlength=size)
            if mass is not None:
                mass += torch.bincount(keys, weights=mags.double(), minlength=size)
        return {"count": count} if mass is None else {"count": count, "mass": mass}

    def map(
        self,
        index: int,
        state: Any,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        ctx: TensorContext,
        params: dict[str, Any],
    ) -> Any:
        if index >= self._threshold_passes(params):
            # Sign pass: the method computes the elected signs; we only add them up.
            return self.elected_sign(tensors, base, state, params).sum().to(torch.float64)
        rows = []
        # |x − base| of each task in blocks of entries: an embedding-sized tensor gets no
        # tensor-sized float32 magnitudes, bit patterns or float64 weights
        wide = ctx.result_dtype if ctx is not None else None
        if wide is not None and wide.itemsize < 4:
            wide = torch.float32  # a method that widens computes half precision in float32
        flat_base = base.reshape(-1)
        for t, x in enumerate(tensors):
            # in the method's dtype (inputs as stored, for a method that widens them itself: the
            # base widened inside the subtraction)
            dtype = wide or torch.promote_types(x.dtype, base.dtype)
            flat = x.reshape(-1)
            bucket = state["bucket"][t][0] if index else None
            rows.append(
                self._histograms(
                    self._bucket_keys(flat, flat_base, dtype, index, bucket),
                    _HI if index == 0 else 1 << 16,
                    x.device,
                )
            )
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    @staticmethod
    def _bucket_keys(
        flat: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, index: int, bucket: int | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, magnitudes) per block of entries: pass 0 keys every |τ| by the top 16 bits of
        its float32 pattern; pass 1 keys the entries of the chosen bucket by the low 16 bits."""
        for i in range(0, flat.numel(), _HISTOGRAM_BLOCK):
            part = slice(i, i + _HISTOGRAM_BLOCK)
            mags = task_vector(flat[part], base[part], dtype).abs_().float()
            bits = mags.view(torch.int32)
            if index == 0:
                yield bits >> 16, mags
            elif bucket is not None:
                keep = ((bits >> 16) == bucket).nonzero().squeeze(1)  # few entries: gather them
                yield bits.take(keep) & 0xFFFF, mags.take(keep)

    def fold(self, index: int, acc: Any, partial: Any) -> Any:
        if acc is None:
            return partial
        if isinstance(partial, dict):
            return {k: acc[k] + partial[k] for k in acc}
        return acc + partial

    def finish(self, index: int, state: Any, acc: Any, params: dict[str, Any]) -> Any:
        state = dict(state or {})
        n_thr = self._threshold_passes(params)
        if index >= n_thr:
            total = float(acc) if acc is not None else 0.0
            state["majority_sign"] = 1.0 if total > 0 else (-1.0 if total < 0 else 0.0)
            return state
        if acc is None:  # no tensor at all: nothing will be merged either
            state.update(threshold=[], removed_l1=[])
            return state
        counts, masses = acc["count"], acc.get("mass")
        if index == 0:
            numel = int(counts[0].sum())
            state["numel"] = numel
            state["bucket"], state["threshold"], state["l1"], state["removed_l1"] = [], [], [], []
            for t in range(len(counts)):
                rank = self.rank(numel, t, params)
                if rank is None:
                    state["bucket"].append((None, None))
                    state["threshold"].append(None)
                    state["removed_l1"].append(0.0)
                    continue
                cum = torch.cumsum(counts[t], 0)
                b = int(torch.searchsorted(cum, torch.tensor(rank)))
                before = int(cum[b - 1]) if b > 0 else 0
                state["bucket"].append((b, rank - before))
                # Approximate threshold: the bucket's lower edge (exact ones replace it in pass 1).
                state["threshold"].append(_bits_to_float(b << 16))
                if masses is not None:
                    total = float(masses[t].sum())
                    state["l1"].append((total, float(masses[t][:b].sum())))
                    state["removed_l1"].append(float(masses[t][:b].sum()) / total if total else 0.0)
            return state
        for t in range(len(counts)):
            bucket, rank = state["bucket"][t]
            if bucket is None:
                continue
            cum = torch.cumsum(counts[t], 0)
            low = int(torch.searchsorted(cum, torch.tensor(rank)))
            state["threshold"][t] = _bits_to_float((bucket << 16) | low)
            if masses is not None:
                total, below = state["l1"][t]
                below += float(masses[t][:low].sum())  # entries < threshold are the removed ones
                state["removed_l1"][t] = below / total if total else 0.0
        return state


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def at_least(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """1.0 where ``values ≥ threshold``, else 0.0, in float arithmetic (fl(a − b) ≥ 0 ⇔ a ≥ b
    for finite floats, so this is exact; several times faster than a boolean mask here)."""
    return (values - threshold).sign_().add_(1).clamp_(max=1)


def trim_task_vectors(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    density: list[float],
    topk: str,
    topk_rule: str,
    rescale: str = "none",
    dtype: torch.dtype | None = None,
    release_inputs: bool = False,
) -> torch.Tensor:
    """(T, …) task vectors δ_t = θ_t − θ_0, each keeping its largest-|δ| entries.

    ``topk="model"`` uses the per-task thresholds of :class:`ModelTopK` (in ``ctx.stats``);
    ``topk="tensor"`` trims each tensor on its own with ``topk_rule`` ``exact`` (mergekit) or
    ``kthvalue`` (reference-code rule). ``rescale="l1"`` restores each δ_t's L1 norm. The task
    vectors are in ``dtype`` (default: the base's); narrower inputs (as stored, for a method
    that widens them itself) are widened exactly, into the stack itself. ``release_inputs``: the
    caller reads no θ_t again, so inputs handed over by the engine go once their δ_t is formed."""
    dtype = dtype or base.dtype
    # Per-tensor masks come first, each from one scratch task vector, so that the sort of a large
    # tensor (about 4 float32 copies of it) never runs beside the whole stack of task vectors.
    masks = _tensor_masks(tensors, base, density, topk_rule, dtype) if topk == "tensor" else None
    out = torch.empty((len(tensors), *base.shape), dtype=dtype, device=base.device)
    for i in range(len(tensors)):
        d = task_vector(tensors[i], base, out.dtype, out=out[i])  # (x − base computed in out's dtype)
        if release_inputs:
            release(tensors, i)  # (not held beside the stack)
        if masks is not None:
            mask, masks[i] = masks[i], None
        else:
            thr = ctx.stats["threshold"][i]
            mask = None if thr is None else at_least(d.abs().float(), thr)  # (no copy for float32)
        if mask is not None:
            # A product with the mask, as mergekit multiplies: dropped negative entries become
            # -0.0 there too (in place, the boolean mask widened one block at a time)
            if rescale == "l1":
                out[i] = rescale_l1(d, mask)
            else:
                _inplace_in_blocks(d, mask, torch.Tensor.mul_)
    return out


def _tensor_masks(
    tensors: list[torch.Tensor], base: torch.Tensor, density: list[float], topk_rule: str, dtype: torch.dtype
) -> list[torch.Tensor | None]:
    """Each task vector's per-tensor trim mask (None: keep all), one task at a time: only |δ_t|
    in float32 is held while its selection runs (in float32, the scratch δ_t itself)."""
    masks: list[torch.Tensor | None] = []
    scratch = torch.empty(base.shape, dtype=dtype, device=base.device) if dtype == torch.float32 else None
    for x, keep in zip(tensors, density, strict=True):
        if keep >= 1:
            masks.append(None)
            continue
        d = task_vector(x, base, dtype, out=scratch)
        mags = d.abs_().reshape(-1) if d is scratch else d.abs().reshape(-1).float()
        del d  # (a narrower δ_t is not held beside the sort)
        mask = _select(mags, keep, topk_rule) if mags.numel() else torch.zeros_like(mags, dtype=torch.bool)
        del mags
        masks.append(mask.reshape(base.shape))
    return masks
