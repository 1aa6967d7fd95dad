"""PCB-Merging: weight every task-vector entry by how it competes within its task and across tasks."""

from __future__ import annotations

from typing import Any

import torch

from alloykit.methods import _radix
from alloykit.methods.base import Param, TensorContext, merge_method
from alloykit.methods.primitives import density_param, scale_search

# ----------------------------------------------------------------------------- ranks
# The reference code's ``clamp(x, min_ratio, max_ratio)`` sorts each task's row ascending and
# clamps it to ``[sorted[int(d·min_ratio)], sorted[int(d·(1 − max_ratio) − 1)]]``; these are
# those 0-based indices, computed with the same floating-point expressions.


def clip_indices(d: int, clip: float) -> tuple[int, int]:
    """Indices of the lower and upper clip values of |τ_t| (``clamp(|τ|, clip, clip)``)."""
    return int(d * clip), int(d * (1 - clip) - 1)


def drop_index(d: int, density: float) -> int | None:
    """Index of the score below which entries are dropped (``clamp(score, 1 − density, 0)``);
    ``None`` when it falls outside the row (density 0, or too small to keep one entry): all of
    the task is dropped (the reference code would raise an IndexError)."""
    i = int(d * (1 - density))
    return i if i < d else None


# ----------------------------------------------------------------------------- the scores


def _stacked(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """(T, N) float32 task vectors (PCB's statistics are float32 in every compute dtype)."""
    b = base.float().reshape(-1)
    return torch.stack([x.float().reshape(-1) - b for x in tensors])


def _clipped_and_scores(
    deltas: torch.Tensor, q_lo: list[float], q_hi: list[float], clipped: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Clipped task vectors sign(τ)·clamp(|τ|, q_lo, q_hi) (unless ``clipped=False``) and the
    balancing scores

        s_t = exp(T · minmax(clamp(|τ_t|))²) · tanh(τ_t ⊙ Σ_s τ_s)

    in the reference code's order of operations (``PCB_merge`` in ``pcb-merging.py``)."""
    n = deltas.shape[0]
    lo = torch.tensor(q_lo, dtype=torch.float32, device=deltas.device).unsqueeze(1)
    hi = torch.tensor(q_hi, dtype=torch.float32, device=deltas.device).unsqueeze(1)
    clamped_abs = torch.clamp(deltas.abs(), lo, hi)
    # Min-max over the clamped row: its minimum is q_lo and its maximum q_hi (both are entries of
    # the row). torch.clamp gives max when min > max; the row is then constant.
    row_min = torch.minimum(lo, hi)
    span = hi - row_min
    if bool((span > 0).all()):
        normalized = (clamped_abs - row_min) / span
    else:  # a constant row would be 0/0 = NaN in the reference code; its intra score is 1
        normalized = torch.where(span > 0, (clamped_abs - row_min) / torch.where(span > 0, span, 1.0), 0.0)
    intra = torch.exp(n * normalized**2)
    inter = torch.tanh(deltas * torch.sum(deltas, dim=0))
    return (torch.sign(deltas) * clamped_abs if clipped else None), intra * inter


def _scale(scores: torch.Tensor, cut: list[float | None], top: list[float | None]) -> torch.Tensor:
    """β_t = minmax(clamp(s_t, cut_t, top_t)): 0 at and below the cut, 1 at the top score.
    A task with no cut, or whose cut equals its top score (0/0 in the reference), gets 0."""
    rows = []
    for t in range(scores.shape[0]):
        if cut[t] is None or top[t] is None or not top[t] > cut[t]:
            rows.append(torch.zeros_like(scores[t]))
            continue
        # float32, as the reference's rows
        c, m = (torch.tensor(v, device=scores.device) for v in (cut[t], top[t]))
        rows.append((torch.clamp(scores[t], c, m) - c) / (m - c))
    return torch.stack(rows)


def _kth(row: torch.Tensor, index: int) -> float:
    return float(row.kthvalue(index + 1).values)


def _tensor_stats(deltas: torch.Tensor, density: list[float], clip: float) -> dict[str, Any]:
    """The same statistics over one tensor (``scope="tensor"``), by ``kthvalue``."""
    d = deltas.shape[1]
    lo_i, hi_i = clip_indices(d, clip)
    absd = deltas.abs()
    q_lo = [_kth(r, lo_i) for r in absd]
    q_hi = [_kth(r, hi_i) for r in absd]
    _, scores = _clipped_and_scores(deltas, q_lo, q_hi, clipped=False)
    cut: list[float | None] = []
    for t, r in enumerate(scores):
        i = drop_index(d, density[t])
        cut.append(None if i is None else _kth(r, i))
    return {"q_lo": q_lo, "q_hi": q_hi, "cut": cut, "top": [float(r.max()) for r in scores]}


# ----------------------------------------------------------------------------- whole-model stats


class PCBStats:
    """Whole-model order statistics of PCB, exactly, in four streaming passes.

    The reference code flattens the whole model into one (T, d) matrix; its per-task statistics
    are order statistics of rows of that matrix: the clip values of |τ_t| (passes 0–1), then the
    cut and the maximum of the scores s_t, which need the clip values (passes 2–3). Each pair is
    an exact radix selection (:mod:`alloykit.methods._radix`)."""

    def passes(self, params: dict[str, Any]) -> int:
        return 4 if params["scope"] == "model" else 0

    def model_wide(self, params: dict[str, Any]) -> dict[str, str]:
        if params["scope"] != "model":
            return {}
        hint = (
            "scope: model takes one value per task over the whole model; "
            "set scope: tensor for per-tensor values"
        )
        return {"density": hint, "clip": hint}

    def map(
        self,
        index: int,
        state: Any,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        ctx: TensorContext,
        params: dict[str, Any],
    ) -> Any:
        if state is not None and state.get("numel") == 0:
            return None  # an empty model: nothing to count
        deltas = _stacked(tensors, base)
        if index < 2:
            rows = deltas.abs()
        else:
            rows = _clipped_and_scores(deltas, state["q_lo"], state["q_hi"], clipped=False)[1]
        if index % 2 == 0:
            return torch.stack([_radix.high_histogram(r) for r in rows])
        return torch.stack(
            [
                _radix.low_histograms(r, [None if f is None else f[0] for f in state["buckets"][t]])
                for t, r in enumerate(rows)
            ]
        )

    def fold(self, index: int, acc: Any, partial: Any) -> Any:
        if partial is None:
            return acc
        return partial if acc is None else acc + partial

    def finish(self, index: int, state: Any, acc: Any, params: dict[str, Any]) -> Any:
        state = dict(state or {})
        n = len(params["density"])
        if acc is None or (state.get("numel", 1) == 0) or (index == 0 and int(acc[0].sum()) == 0):
            # Nothing to merge: no statistics, every task is dropped.
            return {"numel": 0, "q_lo": [0.0] * n, "q_hi": [0.0] * n, "cut": [None] * n, "top": [None] * n}
        if index % 2 == 0:
            d = int(acc[0].sum())
            state["numel"] = d
            buckets = []
            for t in range(n):
                if index == 0:
                    wanted: list[int | None] = list(clip_indices(d, params["clip"]))
                else:
                    wanted = [drop_index(d, params["density"][t]), d - 1]
                buckets.append([None if i is None else _radix.locate(acc[t], i + 1) for i in wanted])
            state["buckets"] = buckets
            return state
        values = [
            [
                None if found is None else _radix.value_of(found[0], acc[t, j], found[1])
                for j, found in enumerate(state["buckets"][t])
            ]
            for t in range(n)
        ]
        names = ("q_lo", "q_hi") if index == 1 else ("cut", "top")
        state[names[0]] = [v[0] for v in values]
        state[names[1]] = [v[1] for v in values]
        return state


# ----------------------------------------------------------------------------- the method


@merge_method(
    "pcb",
    search=scale_search(4),
    params=[
        Param(
            "weight",
            float,
            1.0,
            per_model=True,
            help="λ_t, multiplies clipped task vector t before the weighted mean (the ES code's λ_t)",
        ),
        density_param(0.05, "r: fraction of each task's entries kept, by balancing score (code: 0.05)"),
        Param("lambda", float, 1.2, help="λ, scales the merged task vector (reference code: 1.2)"),
        Param(
            "clip",
            float,
            0.0001,
            ge=0.0,
            lt=0.5,
            help="fraction of |τ_t| clipped at each end before scoring (pcb-merging.py: 1e-4; "
            "the experiment scripts: 0.01)",
        ),
        Param(
            "scope",
            str,
            "model",
            choices=("model", "tensor"),
            help="statistics over the whole flattened model per task (reference) or per tensor",
        ),
    ],
    needs_base=True,
    presets={"paper": {}},
    default_preset="paper",
    reduction=PCBStats(),
    memory_factor=7.0,
    elementwise=lambda p: p["scope"] == "model",
)
def pcb(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    *,
    weight: list[float],
    density: list[float],
    lambda_: float,
    clip: float,
    scope: str,
) -> torch.Tensor:
    """θ = θ_0 + λ · Σ_t β_t ⊙ λ_t τ̃_t / Σ_t β_t, β_t from parameter competition (Du et al. 2024).

    PCB-Merging, "Parameter Competition Balancing for Model Merging" (NeurIPS 2024); the
    denominator is max(Σ_t β_t, 1e-12), λ_t is ``weight``.

    Per task t, over the whole flattened model (T tasks, d entries per task):

    1. clip: τ̃_t = sign(τ_t) · clamp(|τ_t|, q_lo, q_hi), q_lo / q_hi the order statistics
       ``sorted(|τ_t|)[int(d·clip)]`` and ``[int(d·(1 − clip) − 1)]``;
    2. intra-balancing exp(T · minmax(clamp(|τ_t|))²), inter-balancing tanh(τ_t ⊙ Σ_s τ_s)
       (raw τ), score s_t = their product;
    3. drop: s_t is clamped below at ``sorted(s_t)[int(d·(1 − density))]`` and min-max
       normalised, so β_t = 0 for all but the top ``density`` of scores;
    4. weighted mean of the clipped task vectors with weights β_t, scaled by λ.

    Source: ``PCB_merge`` in ``pcb-merging.py`` of ``duguodong7/pcb-merging`` (the README's
    "details of our method"); defaults from its call site: density (``pcb_ratio``) 0.05,
    λ = 1.2 (``lams = [1.2]*n``), clip 1e-4. The repository's experiment code
    (``nlp_source_code/utils/merge_utils.py::task_para_att_merge``, ``vision_source_code/pcb.py``)
    clips 1 % at each end (``clip=0.01``) and searches λ (0.8–2.2) or per-task λ_t (``weight``,
    by evolution strategies, 0.5–3.0) on validation data.

    ``scope="model"`` (default) computes the four statistics per task over the whole model,
    exactly, in four streaming passes (:class:`PCBStats`); ``scope="tensor"`` computes them per
    tensor (one pass, not the reference). Everything is computed in float32.

    Deviations (only where the reference code fails): a constant clipped row (e.g. a zero task
    vector) gets intra score 1 instead of NaN; a task whose cut equals its top score, or whose
    cut index falls outside the row (density 0), keeps nothing instead of NaN / IndexError;
    so zero task vectors give the base back.
    """
    if base.numel() == 0:
        return base.clone()
    deltas = _stacked(tensors, base)
    stats = ctx.stats if scope == "model" else _tensor_stats(deltas, density, clip)
    clipped, scores = _clipped_and_scores(deltas, stats["q_lo"], stats["q_hi"])
    scale = _scale(scores, stats["cut"], stats["top"])
    if any(w != 1 for w in weight):
        clipped = clipped * torch.tensor(weight, dtype=clipped.dtype, device=clipped.device).unsqueeze(1)
    merged = torch.sum(clipped * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    if lambda_ != 1:
        merged = lambda_ * merged
    return (base.float() + merged.reshape(base.shape)).to(base.dtype)
