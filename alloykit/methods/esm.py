"""ESM, Essential Subspace Merging: truncate each task's update in the subspace of the output
shifts it causes on calibration data, rescale, decorrelate across tasks, add."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from alloykit.calibration.statistics import gram_of
from alloykit.errors import ParameterError
from alloykit.methods._svd import (
    GRAM_MAX_COND,
    TaskVectors,
    TopSVD,
    eigh64,
    gram_polar,
    singular_values,
    thin_svd,
    tsv_m_matrix,
    tsv_m_norm,
    tsv_rank,
)
from alloykit.methods.base import Continuous, Param, TensorContext, merge_method, release
from alloykit.methods.primitives import add_base_, task_vector

# The reference code (ViT) averages CLIP's text_projection instead of decomposing it.
VIT_SUBSPACE = [{"filter": "text_projection", "value": "mean"}, {"value": "essential"}]
PRESETS = {
    # ESM-ViT/src/utils/esm_utils.py: all four scaling levels, a factor 2, α only on the
    # matrices merged in the essential subspace.
    "vit": {"subspace": VIT_SUBSPACE},
    # ESM-RoBERTa/merge.py: eigenvalue power and inter-layer scaling only, no factor, α on every
    # merged tensor, at least one direction per task.
    "roberta": {
        "task_power": 0.0,
        "column_power": 0.0,
        "factor": 1.0,
        "alpha_scope": "all",
        "min_rank": 1,
        "subspace": "essential",
    },
}


def layer_type(name: str) -> str:
    """The tensor's name with its layer indices removed: tensors of one type across layers."""
    return re.sub(r"(^|\.)\d+(?=\.)", r"\1*", name)


# ----------------------------------------------------------------------------- one matrix


def essential_basis(
    delta: torch.Tensor, entry: dict[str, Any], tol: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Principal directions E (orthonormal columns, by decreasing eigenvalue) and eigenvalues λ
    of the output shift ΔO = X ΔWᵀ (its uncentred PCA, up to the 1/(N − 1) that no level reads),
    without forming the N × d_out matrix; eigenvalues ≤ ``tol`` · λ_max are set to exactly 0
    (as the reference code's padded ones). Returns (E, λ, numerical rank).

    Two routes, the cheaper for the shapes (same directions and eigenvalues):
    * through a factor: ΔWGΔWᵀ = AAᵀ with A = ΔW Xᵀ (the stored rows, N ≤ d_in) or A = ΔW L,
      G = LLᵀ from the eigen-decomposition of G; the SVD of A (d_out × k) gives the k directions
      that can be non-zero, at O(d_out k²) instead of O(d_out³) — 10× faster for an MLP
      up-projection, and as accurate as the reference's SVD of ΔO;
    * or the eigen-decomposition of ΔW G ΔWᵀ (d_out × d_out), when d_out is the smaller side.
    """
    d_out, d_in = delta.shape
    if "inputs" in entry and entry["inputs"].shape[0] <= d_in:
        factor = delta @ entry["inputs"].to(delta.dtype).T  # ΔOᵀ, d_out × N
    elif d_in < d_out:
        g = gram_of(entry, delta.dtype)
        w, q = eigh64((g + g.T) / 2)
        factor = delta @ (q * w.clamp(min=0).sqrt()[None, :])
    else:
        factor = None
    if factor is not None:
        vec, s, _ = thin_svd(factor)
        lam = s.square()
    else:
        g = gram_of(entry, delta.dtype)
        m = delta @ g @ delta.T
        lam, vec = eigh64((m + m.T) / 2)  # symmetric to rounding, for eigh
        lam, vec = lam.flip(0), vec.flip(1)
    top = float(lam[0]) if lam.numel() else 0.0
    lam = torch.where(lam > tol * top, lam, torch.zeros_like(lam)) if top > 0 else torch.zeros_like(lam)
    return vec, lam, int((lam > 0).sum())


def reference_norm(delta: torch.Tensor, basis: torch.Tensor, tokens: int) -> torch.Tensor:
    """‖Eᵀ ΔW‖_F over the reference code's basis: with fewer rows N than outputs d_out its SVD
    yields N directions and pads the basis with the identity columns e_N … e_{d_out−1}, which
    are not orthogonal to them; so n² = ‖E_Nᵀ ΔW‖² + Σ_{i ≥ N} ‖ΔW_i,:‖². (E_N: the first N
    directions; where fewer are non-zero, the others add nothing for data of full rank.)"""
    d_out = delta.shape[0]
    if tokens >= d_out:
        return torch.linalg.matrix_norm(delta)
    head = basis[:, :tokens].T @ delta
    tail = delta[tokens:]
    return torch.sqrt(head.square().sum() + tail.square().sum())


class Padded:
    """A factor without its padded zero lines: of its ``width`` columns (``axis`` 1: E) or rows
    (``axis`` 0: C), ``stored`` holds those at the positions ``index``; the others are +0. Each
    task's block is padded to r = int(d_out/T) directions while at most min(N, d_in) exist: for
    an LM head (d_out = vocabulary) the dense E would be d_out × d_out (8 GB at 32000 in float64)
    and C d_out × d_in, of which 2 · 2048 columns (rows) are not zero."""

    def __init__(self, stored: torch.Tensor, index: torch.Tensor, width: int, axis: int):
        self.stored, self.index, self.width, self.axis = stored, index, width, axis

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.stored.shape
        return (rows, self.width) if self.axis == 1 else (self.width, cols)

    def dense(self) -> torch.Tensor:
        out = self.stored.new_zeros(self.shape)
        if self.axis == 1:
            out[:, self.index] = self.stored
        else:
            out[self.index] = self.stored
        return out


def essential_factors(
    deltas: list[torch.Tensor],
    entries: list[dict[str, Any]],
    *,
    eigen_power: float,
    task_power: float,
    column_power: float,
    min_rank: int,
    rank: str,
    basis_norm: str,
    tol: float,
    warn: Any = None,
    owned: bool = False,
) -> tuple[Padded, Padded] | None:
    """The scaled, concatenated factors (E, C) of one d_out × d_in matrix, before the polar step
    (None when every task's block is zero); E and C without their padded zero columns and rows.
    ``owned``: each ΔW_t in ``deltas`` is replaced by None once its block exists (the caller's
    list; not read again).

    Per task: E_t, λ_t from :func:`essential_basis`; r = int(d_out · (1/T)) (raised to
    ``min_rank``; capped at the numerical rank with ``rank="numerical"``); Ê_t = E_t[:, :r],
    Ĉ_t = Ê_tᵀ ΔW_t; (a) g = (λ_i / mean λ)^γ, renormalised to mean 1, scales the columns of
    Ê_t and the rows of Ĉ_t; (b) Ĉ_t × (n_t / mean_s n_s)^p_task with n_t = ‖E_tᵀ ΔW_t‖_F.
    Concatenated: E = [Ê_1 g_1 … Ê_T g_T], C = [g_1 Ĉ_1; …]; (c) column j of C ×
    (‖C_:,j‖ / mean_k ‖C_:,k‖)^p_col. A task with ΔW_t = 0 contributes no block (its n_t = 0
    still counts in the mean, as in the reference code's list of norms).
    """
    d_out = deltas[0].shape[0]
    r = tsv_rank(d_out, len(deltas), min_rank)
    # E's columns that exist are written into one buffer as they come (its padding is never
    # formed: see Padded), grown only if a later task has more of them
    stored: torch.Tensor | None = None
    index: list[torch.Tensor] = []
    used = width = 0
    c_blocks, norms = [], []
    for t, (delta, entry) in enumerate(zip(deltas, entries, strict=True)):
        basis, lam, numerical = essential_basis(delta, entry, tol)
        norms.append(
            reference_norm(delta, basis, int(entry["tokens"]))
            if basis_norm == "reference"
            else torch.linalg.matrix_norm(delta)
        )
        keep = min(r, numerical) if rank == "numerical" else r
        if numerical < r and warn is not None and numerical > 0:
            how = "capped" if rank == "numerical" else "kept (directions past the rank are arbitrary)"
            warn(f"r = {r} exceeds the numerical rank {numerical} of task {t}'s output shift: {how}")
        lam_r = lam[:keep]
        if keep == 0 or float(lam_r.sum()) == 0.0:
            c_blocks.append(None)
            if owned:
                deltas[t] = None
            continue
        e_hat = basis[:, :keep]
        live = e_hat.shape[1]  # (the factor route returns only the directions that can be non-zero)
        if keep > lam_r.numel():
            lam_r = torch.cat([lam_r, lam_r.new_zeros(keep - lam_r.numel())])
        g = (lam_r / lam_r.mean()).pow(eigen_power)
        g = g / g.mean()
        if stored is None:
            stored = e_hat.new_empty(d_out, live * (len(deltas) - t))
        elif used + live > stored.shape[1]:
            stored = torch.cat([stored[:, :used], e_hat.new_empty(d_out, live)], dim=1)
        torch.mul(e_hat, g[None, :live], out=stored[:, used : used + live])
        index.append(torch.arange(width, width + live))
        c_blocks.append((e_hat.T @ delta) * g[:live, None])  # Ĉ_t (its padded rows: zeros)
        used += live
        width += keep
        del e_hat, basis
        if owned:  # (ΔW_t is not read again)
            deltas[t] = None
        del delta
    mean_norm = torch.stack(norms).mean()
    if float(mean_norm) == 0.0 or stored is None:
        return None
    if used < stored.shape[1]:
        stored = stored[:, :used].contiguous()
    positions = torch.cat(index)
    e_cat = Padded(stored, positions, width, axis=1)
    c_scaled = []
    for c, n in zip(c_blocks, norms, strict=True):
        if c is not None:
            c_scaled.append(c * (n / mean_norm).pow(task_power) if task_power else c)
    c_cat = torch.cat(c_scaled, dim=0)
    if column_power:
        cols = torch.linalg.vector_norm(c_cat, dim=0)
        mean_col = cols.mean()
        if float(mean_col) > 0:
            c_cat = c_cat * (cols / mean_col).pow(column_power)[None, :]
    if not (bool(torch.isfinite(stored).all()) and bool(torch.isfinite(c_cat).all())):
        # a ratio raised to a large power leaves the float range (inf, or 0 then 0/0)
        raise ParameterError(
            f"esm: the polarized scaling overflows (eigen_power={eigen_power:g}, task_power="
            f"{task_power:g}, column_power={column_power:g}): ratios of norms raised to these powers "
            "are not finite; use smaller powers (the paper's are 0 to 2)"
        )
    return e_cat, Padded(c_cat, positions, width, axis=0)


def esm_matrix(deltas: list[torch.Tensor], entries: list[dict[str, Any]], *, factor: float,
               norm_only: bool = False, owned: bool = False, **levels: Any) -> torch.Tensor:  # fmt: skip
    """Merged update of one matrix: ΔW = factor · σ̄(E) polar(E) · σ̄(C) polar(C) over the factors
    of :func:`essential_factors`, σ̄ the mean singular value (a flat spectrum, as in Iso-C).

    ``norm_only``: ‖ΔW‖_F alone (a 0-d tensor), without the polar factors. E is d_out × Σ r_t
    with Σ r_t ≤ d_out, so polar(E) has orthonormal columns, and polar(C) is a partial isometry
    of rank min(C's shape) (its thin SVD is full, whatever C's rank; on the live-column route
    the same, since C's zero rows are zero rows of polar(C)): ‖ΔW‖_F = factor · σ̄(E) · σ̄(C) ·
    √min(C's shape), equal to the formed matrix's norm to rounding (1.4·10⁻¹⁴ for a 5632 × 2048
    MLP projection), for a fraction of the time (no SVD of C, no polar(E)).

    ``owned``: ``deltas`` is the caller's to lose; each task vector goes once its blocks of E and
    C exist, and the list is emptied (the polar steps do not need them: up to T matrix-sized
    buffers less at the peak)."""
    first = deltas[0]
    shape, dtype, device = first.shape, first.dtype, first.device
    del first
    factors = essential_factors(deltas, entries, owned=owned, **levels)
    if owned:
        deltas.clear()
    if factors is None:
        return torch.zeros(() if norm_only else shape, dtype=dtype, device=device)
    e_cat, c_cat = factors
    if norm_only and e_cat.shape[0] >= e_cat.shape[1]:
        flat = _mean_singular_value(e_cat.stored, e_cat.shape)
        flat = flat * _mean_singular_value(c_cat.stored, c_cat.shape)
        return factor * flat * math.sqrt(min(c_cat.shape))
    pair = [e_cat, c_cat]
    del e_cat, c_cat, factors  # (the pair's only references: _polar_merge lets each go early)
    update = _polar_merge(pair, factor)
    # (norm_only with a wide E, only when min_rank exceeds d_out / T: the formed update's norm)
    return torch.linalg.matrix_norm(update) if norm_only else update


def _polar_merge(pair: list[Padded], factor: float) -> torch.Tensor:
    """factor · σ̄(E) polar(E) · σ̄(C) polar(C) (see :func:`esm_matrix`) of ``pair`` = [E, C],
    which is emptied: C goes once its SVD exists, E once its polar factor does, so neither is
    held through the other's decomposition. C's SVD is taken over its stored rows (its zero rows
    are zero rows of U; the same singular values); where the live-column route does not apply,
    over the dense C, with the dense E."""
    c = pair.pop()
    u_c, s_c, vh_c = thin_svd(c.stored)
    # polar(C) is unique (C of full column rank) only when σ_min(C) > 0: then its rows for the
    # zero rows of C are zero, and the columns of polar(E) that meet them do not matter
    rows, columns = c.stored.shape
    c_full_rank = rows >= columns and bool(s_c[0] > 0) and bool(s_c[-1] * GRAM_MAX_COND >= s_c[0])
    live = _live_columns_polar(pair, columns) if c_full_rank else None
    if live is not None:
        del c
        mean_e, polar_live, nonzero = live
        u_rows = u_c if nonzero is None else u_c[nonzero]
        return factor * mean_e * s_c.mean() * (polar_live @ (u_rows @ vh_c))
    del u_c, s_c, vh_c
    u_c, s_c, vh_c = thin_svd(c.dense())
    del c
    u_e, s_e, vh_e = thin_svd(pair.pop().dense())
    return factor * s_e.mean() * s_c.mean() * ((u_e @ vh_e) @ (u_c @ vh_c))


def _mean_singular_value(a: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """The mean of the min(m, n) singular values of a (or of the matrix of ``shape`` that holds
    a's columns and zeros), from the rows and columns that are not all zero (those add only zero
    singular values; E's padded blocks and C's rows for them)."""
    rows, cols = a.abs().amax(dim=1) > 0, a.abs().amax(dim=0) > 0
    return singular_values(a[rows][:, cols]).sum() / min(shape or a.shape)


def _live_columns_polar(
    pair: list[Padded], c_columns: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(σ̄(E), polar(E'), which of E's stored columns are E' — None for all of them), E' the
    columns of E = ``pair[0]`` that are not all zero, when that is cheaper and exact (E is then
    taken from ``pair``); else None (``pair`` holds E again for the caller's SVD of E).

    Blocks padded past a task's numerical rank (an MLP up-projection: r = d_out/T directions
    asked, at most d_in non-zero) and directions scaled by g = 0 are zero columns of E. With
    E' of full column rank (checked: σ₁/σ_min ≤ GRAM_MAX_COND), the polar factor of E on the
    live columns is polar(E') (the rest is the polar factor's arbitrary null-space part), and
    E's singular values are E''s plus zeros. The dead columns meet only the zero rows those
    directions give C (Ĉ_t = Ê_tᵀ ΔW_t), which are zero rows of polar(C) when C has full
    column rank (the caller checks; otherwise both null-space parts are arbitrary — LAPACK's
    choice, as in the reference code — and the SVD of E is kept). polar(E') = E'(E'ᵀE')^(-1/2)
    through the float64 Gram of E' (an eigh of its width instead of an SVD of E: 2816 · 2 = 5632
    columns of which 4096 live for a 1.1 B MLP up-projection: 136 → 73 s per matrix here; for an
    LM head of 32000 rows, 4096 of 32000).

    Where every stored column is live, E' is E's stored buffer itself, and the polar factor is
    written over it (no copy at the job's peak)."""
    e = pair[0]
    nonzero = e.stored.abs().amax(dim=0) > 0
    n_live, (rows, cols) = int(nonzero.sum()), e.shape
    if n_live == cols or n_live >= rows or n_live < c_columns:
        # (no dead column; E' not tall; or C's live rows cannot have full column rank)
        return None
    every = n_live == e.stored.shape[1]
    e_live = e.stored if every else e.stored[:, nonzero]
    pair.clear()
    s_live: list[torch.Tensor] = []
    polar_live = gram_polar(e_live, s_live, overwrite=True)
    if polar_live is None:  # (e_live, and so E, untouched)
        pair.append(e)
        return None
    return s_live[0].sum() / min(rows, cols), polar_live, (None if every else nonzero)


# ----------------------------------------------------------------------------- tensor rule


def _branch(ndim: int, subspace: str, has_statistics: bool) -> str:
    if ndim != 2 or subspace == "mean":
        return "mean"
    return "essential" if subspace == "essential" and has_statistics else "tsv"


def esm_update(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    params: dict[str, Any],
    norm_only: bool = False,
) -> tuple[torch.Tensor | None, str]:
    """(update, branch) of one tensor before α and the inter-layer scale; None when every task
    vector is zero (the base stays as it is). ``norm_only``: the update's Frobenius norm instead
    (a 0-d tensor; 2-D tensors), without its polar factors where that is exact (see
    :func:`esm_matrix`, :func:`tsv_m_norm`)."""
    wd = torch.float64 if params["precision"] == "float64" else torch.float32
    entries = ctx.statistics
    branch = _branch(base.dim(), params["subspace"], bool(entries) and all(e is not None for e in entries))
    if branch == "tsv":
        # each τ_t formed when TSV-M takes it (the same values as below): an embedding-sized
        # matrix without statistics never holds its T task vectors and a widened base at once
        # (τ_t = 0 exactly where θ_t = θ_0: widening is exact, so compare as stored, no τ_t formed)
        if base.numel() == 0 or not any(bool((x != base).any()) for x in tensors):
            return None, "mean"
        deltas = TaskVectors(tensors, base, wd)
        norm = tsv_m_norm(deltas, min_rank=params["min_rank"]) if norm_only else None
        if norm is not None:
            return norm, branch
        update = tsv_m_matrix(deltas, min_rank=params["min_rank"], top_svd=TopSVD(params["svd"]))
        return (torch.linalg.matrix_norm(update) if norm_only else update), branch
    deltas = []
    for t in range(len(tensors)):
        deltas.append(task_vector(tensors[t], base, wd))  # (the base widened a block at a time)
        release(tensors, t)  # (not read again)
    if base.numel() == 0 or not any(bool(d.any()) for d in deltas):
        return None, "mean"
    if branch == "mean":
        return torch.stack(deltas).mean(dim=0), branch  # (not asked for a norm: 2-D tensors only)
    transposed = bool(ctx.statistics[0].get("transposed"))
    if transposed:  # GPT-2 Conv1D: the weight is d_in × d_out
        deltas = [d.T for d in deltas]
    eps = torch.finfo(wd).eps
    try:
        update = esm_matrix(
            deltas,
            list(ctx.statistics),
            eigen_power=params["eigen_power"],
            task_power=params["task_power"],
            column_power=params["column_power"],
            factor=params["factor"],
            min_rank=params["min_rank"],
            rank=params["rank"],
            basis_norm=params["basis_norm"],
            tol=max(deltas[0].shape) * eps,
            warn=(lambda msg: ctx.warn(f"esm, {ctx.name!r}: {msg}")),
            norm_only=norm_only,
            owned=True,  # (this list of task vectors is ours)
        )
    except ParameterError as e:  # (the scaling overflowed: say where)
        raise ParameterError(f"{e} (tensor {ctx.name!r})") from None
    return (update.T if transposed and not norm_only else update), branch


class LayerNorms:
    """Inter-layer scaling needs every merged update of a type before any is final: one pass
    takes each 2-D tensor's merged-update norm (from singular values, without forming the update
    where that is exact: ``esm_update(norm_only=True)``); ``finish`` turns them into (m_ℓ / mean m
    of the type)^p per tensor. The merge pass computes the update and applies the factor."""

    def passes(self, params: dict[str, Any]) -> int:
        return 1 if params["layer_power"] != 0 else 0

    def map(self, index: int, state: Any, tensors: list[torch.Tensor], base: torch.Tensor | None,
            ctx: TensorContext, params: dict[str, Any]) -> dict[str, float]:  # fmt: skip
        if base is None or base.dim() != 2:
            return {}
        norm, branch = esm_update(tensors, base, ctx, params, norm_only=True)
        if branch == "mean":
            return {}
        return {ctx.name: 0.0 if norm is None else float(norm)}

    def fold(self, index: int, acc: Any, partial: Any) -> Any:
        return {**(acc or {}), **partial}

    def finish(self, index: int, state: Any, acc: Any, params: dict[str, Any]) -> Any:
        norms: dict[str, float] = acc or {}
        by_type: dict[str, list[float]] = {}
        for name, n in norms.items():
            by_type.setdefault(layer_type(name), []).append(n)
        means = {k: sum(v) / len(v) for k, v in by_type.items()}
        p = params["layer_power"]
        scale = {}
        for name, n in norms.items():
            mean = means[layer_type(name)]
            try:
                scale[name] = (n / mean) ** p if mean > 0 else 1.0
            except OverflowError:
                scale[name] = math.inf
            if not math.isfinite(scale[name]):
                raise ParameterError(
                    f"esm: layer_power={p:g} makes the inter-layer scale (‖ΔW‖ / mean)^p of tensor "
                    f"{name!r} overflow ({n:.4g} / {mean:.4g} raised to {p:g}); use a smaller power "
                    "(the paper's is 2)"
                )
        return {"layer_scale": scale, "layer_norm": norms}


# ----------------------------------------------------------------------------- memory (planning)


def _working_bytes(
    params: dict[str, Any], shape: tuple[int, ...], n_models: int, has_statistics: bool
) -> int:
    """Planning estimate of what one tensor's merge holds besides its inputs (in the precision's
    bytes w): for a matrix in the essential subspace (d_out = m, d_in = n, T tasks) the T task
    vectors and about 4 m × n more (per-task factors, C, its SVD, the result), E's stored columns
    (m × L, L = min(m, T·n) that can be non-zero) and their Gram with its eigen-decomposition
    (3 L²); where E' is not tall (L = m) the SVD of the dense E instead (4 m²). (With statistics
    of fewer rows than d_in/T, C lacks full column rank and the dense E's SVD is taken: 4 m² more
    than planned.) For the TSV-M branch one task vector, U and the result (3 m × n) and 4 r² for
    the Grams (r = min(m, n)); otherwise 2 copies per input. Measured at 1.1 B, float64, 2 tasks:
    a 5632 × 2048 MLP projection holds ~1.0 GiB (estimate 1.03 GiB), the embedding's TSV-M
    ~1.4 GB (estimate 1.7)."""
    w = 8 if params["precision"] == "float64" else 4
    numel = math.prod(shape)
    branch = _branch(len(shape), params["subspace"], has_statistics)
    if branch == "mean":
        return 2 * (n_models + 1) * numel * w
    m, n = shape
    if branch == "tsv":
        r = min(m, n)
        return w * (3 * m * n + 4 * r * r)
    live = min(m, n_models * n)
    dense = 4 * m * m if live == m else 0
    return w * (n_models * m * n + 4 * m * n + m * live + 3 * live * live + dense)


# ----------------------------------------------------------------------------- the method


@merge_method(
    "esm",
    # θ is affine in α (α scales part or all of a fixed update): a search merges at 0 and 1
    search={"alpha": Continuous(0.0, 2.0, grid=tuple(round(0.25 * i, 2) for i in range(1, 9)), affine=True)},
    params=[
        Param(
            "alpha", float, 1.0, help="α, global scale (the authors search it on validation data in [0, 2])"
        ),
        Param(
            "alpha_scope",
            str,
            "subspace",
            choices=("subspace", "all"),
            help="α scales only the matrices merged in the essential subspace, others ×1 (ViT code), "
            "or every merged tensor (RoBERTa code)",
        ),
        Param(
            "subspace",
            str,
            "essential",
            choices=("essential", "tsv", "mean"),
            help="per tensor: essential subspace where statistics exist (else TSV-M for 2-D), "
            "TSV-M, or the mean",
        ),
        Param("eigen_power", float, 0.15, ge=0.0, help="γ of the eigenvalue-level scaling (λ/mean λ)^γ"),
        Param("task_power", float, 2.0, ge=0.0, help="p of the inter-task scaling (n_t / mean n)^p (0: off)"),
        Param("column_power", float, 2.0, ge=0.0, help="p of the inter-column scaling (0: off)"),
        Param("layer_power", float, 2.0, ge=0.0, help="p of the inter-layer scaling (0: off, no extra pass)"),
        Param("factor", float, 2.0, help="constant factor of the essential-subspace update (ViT code: 2)"),
        Param("min_rank", int, 0, ge=0, help="at least this many directions per task (RoBERTa code: 1)"),
        Param(
            "rank",
            str,
            "reference",
            choices=("reference", "numerical"),
            help="r = int(d_out/T) as the reference code even past the numerical rank of the output "
            "shift (warned), or capped at it",
        ),
        Param(
            "basis_norm",
            str,
            "reference",
            choices=("reference", "orthonormal"),
            help="n_t over the reference code's basis (identity-padded when N < d_out) or ‖ΔW_t‖_F",
        ),
        Param("precision", str, "float64", choices=("float64", "float32"), help="decompositions' dtype"),
        Param(
            "svd",
            str,
            "auto",
            choices=("auto", "exact"),
            help="the TSV-M branch's decompositions (2-D tensors without statistics): auto (float64 "
            "Gram route where well conditioned, as tsv_m) or exact (torch.linalg.svd always)",
        ),
    ],
    needs_base=True,
    presets=PRESETS,
    default_preset="vit",
    reduction=LayerNorms(),
    working_bytes=_working_bytes,
    statistics="activations",
)
def esm(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    ctx: TensorContext,
    **params: Any,
) -> torch.Tensor:
    """ESM: θ = θ_0 + α · s_ℓ · ΔW_ESM (Li, Qi, Tian & Geng, "Model Merging in the Essential
    Subspace", CVPR 2026; code ``kiddo127/ESM``).

    Per matrix with calibration statistics (input Gram XᵀX of the layer, each task's data through
    its own fine-tune): the principal directions of the output shift ΔO_t = X_t ΔW_tᵀ, by
    eigen-decomposition of ΔW_t (X_tᵀX_t) ΔW_tᵀ (the uncentred PCA of ΔO_t, with no N × d_out
    matrix formed; exact for N < d_out); truncation to r = int(d_out/T) directions; polarized
    scaling (eigenvalue power γ, inter-task, inter-column, inter-layer, each (x/mean x)^p);
    concatenation over tasks and polar orthogonalisation with the mean singular value
    (:func:`esm_matrix`). 2-D tensors without statistics: TSV-M (r = int(min(m, n)/T) triplets per
    task); other tensors: the mean of the task vectors. Inter-layer scaling s_ℓ = (m_ℓ/m̄)^p, m_ℓ
    = ‖ΔW_ℓ‖_F over the 2-D tensors of one type (the name with its layer indices removed), from a
    reduction pass (:class:`LayerNorms`).

    Presets: ``vit`` (default; the ViT code, the paper's headline results): all four levels,
    factor 2, α on the essential-subspace matrices only, CLIP's ``text_projection`` averaged.
    ``roberta`` (the RoBERTa code): eigenvalue power and inter-layer only, factor 1, α on every
    merged tensor, at least one direction per task. α: the authors search it on validation data
    (golden section on [0, 2] in the ViT code; declared here as the search space); default 1.

    Deliberate deviations (see docs/methods-data.md): a layer or task whose update is zero merges
    to a zero update (the reference code gives NaN); eigenvalues below d·ε·λ_max are zero, as the
    reference's padded ones are, so directions past the numerical rank get weight 0 (the
    reference's float32 SVD leaves them tiny but non-zero and arbitrary); ``rank="numerical"``
    caps r there; the decompositions run in float64 by default; ΔW_t = 0 for one task gives a
    zero block (the reference would give NaN for the whole matrix). The TSV-M branch decomposes
    through the float64 Gram matrix where that is accurate (``svd="auto"``, as ``tsv_m``; ``svd=
    "exact"``: ``torch.linalg.svd`` always).
    """
    update, branch = esm_update(tensors, base, ctx, params)
    if update is None:
        return base.clone()
    scale = 1.0
    if params["layer_power"] != 0 and ctx.stats is not None and branch != "mean":
        scale = ctx.stats["layer_scale"].get(ctx.name, 1.0)
    coef = params["alpha"] if (params["alpha_scope"] == "all" or branch == "essential") else 1.0
    # θ_0 + c·ΔW with c·ΔW scaled in place and the base added a block at a time (the same bytes
    # as (base + c·ΔW): a sum does not depend on its order of operands)
    return add_base_(update.mul_(coef * scale), base).to(base.dtype)
