"""Shared pieces of the SVD merge methods (``tsv_m``, ``iso_c``, ``iso_cts``): the rule for each
class of tensor, thin and randomized SVDs, the polar factor, and the three per-matrix merges.

Notation: τ_t = θ_t − θ_0 for one tensor, T tasks, an m × n matrix has r = min(m, n) singular
values. polar(A) = P Qᵀ for the thin SVD A = P Σ Qᵀ: the nearest matrix with orthonormal columns
(or rows, when A is wide). Every function here is pure and works on the tensors' device.

Tensor classes (:func:`merge_tensor`), the same for the three methods:

* 0-D and 1-D tensors (biases, norms, scalars): the mean of the task vectors, as the reference
  code does for every tensor that is not 2-D.
* 2-D tensors (linear layers and embeddings alike): the method's matrix merge when
  ``matrices="svd"``, the mean when ``"mean"`` (the reference code averages CLIP's
  ``text_projection``; the ``paper`` presets say so with a tensor-name condition).
* 3-D and larger (convolution kernels): the mean when ``conv="mean"`` (reference code: only 2-D
  tensors are decomposed), or the matrix merge of the kernel reshaped to out × (in·k…) and
  reshaped back when ``"svd"``. A stacked-experts tensor (E × out × in) is not a convolution:
  keep it on ``"mean"``.
* Tensors no fine-tune changed (every τ_t exactly 0), and empty tensors: the base, unchanged.

Everything is computed in float32 (float64 for float64 inputs) whatever the compute dtype, since
SVDs of half-precision matrices are not available or not accurate; the result is cast back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import overload

import numpy as np
import torch

from alloykit.methods.base import Param, release
from alloykit.methods.primitives import COMBINE_BLOCK, add_base_, task_vector

# ----------------------------------------------------------------------------- parameters


def alpha_param(help: str) -> Param:
    return Param("alpha", float, 1.0, help=help)


MATRICES = Param(
    "matrices",
    str,
    "svd",
    choices=("svd", "mean"),
    help="2-D tensors: the method's SVD merge, or the plain mean of the task vectors",
)
CONV = Param(
    "conv",
    str,
    "mean",
    choices=("mean", "svd"),
    help="tensors with 3 or more dims: mean of task vectors (reference code), or SVD merge of "
    "the kernel reshaped to out × rest",
)
RANK_TOL = Param(
    "rank_tol",
    float,
    0.0,
    ge=0.0,
    lt=1.0,
    help="drop singular triplets below rank_tol × the largest singular value of the same SVD "
    "(0: keep all, reference code)",
)
SVD = Param(
    "svd",
    str,
    "auto",
    choices=("auto", "exact", "lowrank"),
    help="decompositions: auto (eigh of the float64 Gram matrix where the kept spectrum is "
    "well conditioned, else torch.linalg.svd), exact (torch.linalg.svd, the reference code's), "
    "or lowrank (seeded randomized SVD, Halko et al., for truncations)",
)
FULL_SVD = Param(
    "svd",
    str,
    "auto",
    choices=("auto", "exact"),
    help="auto: eigh of the float64 Gram matrix where the spectrum is well conditioned, else "
    "torch.linalg.svd; exact: torch.linalg.svd always (the reference code's)",
)
LOWRANK_NITER = Param("lowrank_niter", int, 8, ge=0, help="svd=lowrank: power iterations")
LOWRANK_OVERSAMPLE = Param(
    "lowrank_oversample", int, 100, ge=0, help="svd=lowrank: random directions beyond the kept rank"
)

# The reference code (TSV-M and Iso both) decomposes every 2-D tensor except those whose name
# contains "text_projection" (CLIP), which it averages.
PAPER_MATRICES = [{"filter": "text_projection", "value": "mean"}, {"value": "svd"}]


# ----------------------------------------------------------------------------- tensor classes


def work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class TaskVectors(Sequence[torch.Tensor]):
    """The T task vectors τ_t = θ_t − θ_0 of one tensor as (rows, rest) matrices in ``dtype``,
    each formed when it is asked for (a fresh tensor every time: the inputs, bfloat16 as
    stored, are widened exactly). A matrix merge that uses each τ_t in turn then holds one of
    them at a time, not T embedding-sized copies beside its decompositions; one that needs a
    τ_t twice (Iso-CTS: the sum, then the residual) forms it twice, the same bytes."""

    def __init__(self, tensors: list[torch.Tensor], base: torch.Tensor, dtype: torch.dtype):
        self.tensors, self.base, self.dtype = tensors, base, dtype
        self.shape = (base.shape[0], base[0].numel() if base.shape[0] else 0)
        self.device = base.device

    def __len__(self) -> int:
        return len(self.tensors)

    @overload
    def __getitem__(self, t: int) -> torch.Tensor: ...
    @overload
    def __getitem__(self, t: slice) -> list[torch.Tensor]: ...
    def __getitem__(self, t: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(t, slice):
            return [self[i] for i in range(len(self))[t]]
        return task_vector(self.tensors[t], self.base, self.dtype).reshape(self.shape)

    def done(self, t: int) -> None:
        """τ_t will not be asked for again: its input may go (:func:`release`)."""
        release(self.tensors, t)


def done_with(deltas: Sequence[torch.Tensor], t: int) -> None:
    """A matrix merge has taken all it needs from τ_t: a :class:`TaskVectors` may let go of the
    input it forms τ_t from (so it is not held through the decompositions that follow)."""
    if isinstance(deltas, TaskVectors):
        deltas.done(t)


def add_task_vector_(out: torch.Tensor, deltas: Sequence[torch.Tensor], t: int) -> torch.Tensor:
    """``out += τ_t`` in place. A :class:`TaskVectors` forms τ_t one block of entries at a time
    (never whole); each entry is the one ``deltas[t]`` would hold, so the bytes are the same."""
    if not isinstance(deltas, TaskVectors):
        return out.add_(deltas[t])
    flat = out.view(-1)  # (out is a fresh, contiguous product)
    x, base = deltas.tensors[t].reshape(-1), deltas.base.reshape(-1)
    for start in range(0, flat.numel(), COMBINE_BLOCK):
        part = slice(start, start + COMBINE_BLOCK)
        flat[part] += task_vector(x[part], base[part], deltas.dtype)
    return out


def matrix_meta(deltas: Sequence[torch.Tensor]) -> tuple[int, int, torch.dtype, torch.device]:
    """Rows, columns, dtype and device of the task-vector matrices (without forming one)."""
    if isinstance(deltas, TaskVectors):
        return *deltas.shape, deltas.dtype, deltas.device
    return *deltas[0].shape, deltas[0].dtype, deltas[0].device


def merge_tensor(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    alpha: float,
    matrices: str,
    conv: str,
    merge_matrix: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    summed: bool = False,
    result_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """θ_0 + α · update, with the update chosen by tensor class (see the module docstring).

    ``merge_matrix`` maps the T task vectors of one m × n matrix (a :class:`TaskVectors`: each
    formed when indexed) to the merged m × n update; with ``summed`` it is given their sum alone,
    accumulated one task vector at a time (Iso-C). An embedding-sized job then never has T task
    vectors in memory at once. The result is in ``result_dtype`` (default: the base's dtype);
    the inputs may be narrower (bfloat16 as stored, see ``MergeMethod.widens_inputs``): every
    difference and the final sum are taken in the work dtype, and the base is never copied
    whole in it."""
    wd = work_dtype(base)
    out = result_dtype or base.dtype
    rule = "mean" if base.dim() < 2 else matrices if base.dim() == 2 else conv
    if base.numel() == 0:
        return base.to(out, copy=True)
    if summed and rule != "mean":
        total, changed, d = None, False, None
        for t in range(len(tensors)):
            d = task_vector(tensors[t], base, wd)
            release(tensors, t)
            changed = changed or bool(d.any())
            total = d if total is None else total.add_(d)
        del d  # (the last task vector would otherwise stay alive through the decomposition)
        if not changed:
            return base.to(out, copy=True)
        update = merge_matrix([total.reshape(base.shape[0], -1)]).reshape(base.shape)
        del total
        return add_base_(update.mul_(alpha), base).to(out)
    if rule == "mean":
        deltas = [task_vector(t, base, wd) for t in tensors]
        for t in range(len(tensors)):
            release(tensors, t)
        if not any(bool(d.any()) for d in deltas):
            return base.to(out, copy=True)
        update = torch.stack(deltas).mean(dim=0)
    else:
        lazy = TaskVectors(tensors, base, wd)
        if not any(bool(lazy[t].any()) for t in range(len(lazy))):  # (one at a time)
            return base.to(out, copy=True)
        update = merge_matrix(lazy).reshape(base.shape)
    # in place: an embedding-sized update is not copied twice more
    return add_base_(update.mul_(alpha), base).to(out)


# ----------------------------------------------------------------------------- decompositions


def thin_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(a, full_matrices=False)``; if LAPACK's divide-and-conquer fails to
    converge (it can on ill-conditioned float32 matrices, e.g. nearly dependent stacked bases),
    the SVD is retried in float64 and cast back, instead of failing the merge."""
    if a.shape[-2] < a.shape[-1]:
        # LAPACK's divide-and-conquer is about 2× slower on a wide matrix than on its transpose
        u, s, vh = thin_svd(a.mT)
        return vh.mT, s, u.mT
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        if a.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def polar(a: torch.Tensor) -> torch.Tensor:
    """P Qᵀ for the thin SVD a = P Σ Qᵀ (the reference code's ``u @ vh``)."""
    u, _, vh = thin_svd(a)
    return u @ vh


# ----------------------------------------------------------------------------- the Gram route
#
# For an m × n matrix A (m ≥ n; a wide one is handled through Aᵀ), AᵀA = V Σ² Vᵀ: one symmetric
# eigendecomposition of an n × n matrix gives V and Σ, and U = A V Σ⁻¹. In float64 that is much
# cheaper than the SVD of a tall A (an n × n eigh instead of an m × n SVD, 2-4× here) and, where
# the kept spectrum is well conditioned, *more* accurate than the reference code's float32 SVD:
# eigenvalues carry an absolute error of about ε₆₄·σ₁², so σ_k has a relative error of about
# ε₆₄·(σ₁/σ_k)², below 10⁻⁸ for σ₁/σ_k ≤ GRAM_MAX_COND; past that bound the exact SVD is used.
# tests/test_svd_methods.py checks the bound against float64 SVDs.

GRAM_MAX_COND = 1e4
# The Gram route pays off on clearly rectangular matrices only: on a square one the float64 eigh
# costs about what the float32 SVD does (2048²: 2.4 s vs 2.9 s here, plus the Gram and products).
GRAM_MIN_ASPECT = 2.0
_ROWS = 8192  # rows per float64 block: an embedding-sized A is never copied whole in float64
# Rows per float64 block of a product A · right: each output row is the same dot products whatever
# the block (checked bitwise on this BLAS), so a smaller block only saves memory (the Gram's
# blocks, summed into one matrix, keep _ROWS: their size is part of its rounding).
_PRODUCT_ROWS = 2048


def _gram64(a: torch.Tensor) -> torch.Tensor:
    """AᵀA in float64, accumulated over row blocks (A tall or square). On the CPU each block's
    product is numpy's (OpenBLAS ``syrk``: one triangle computed, about 2× faster than torch's
    ``addmm`` here, and exactly symmetric)."""
    if a.device.type == "cpu":
        g = None
        for i in range(0, a.shape[0], _ROWS):
            block = a[i : i + _ROWS].double().numpy()
            term = block.T @ block  # (numpy releases the GIL: the engine's workers run side by side)
            del block
            if g is None:  # (the first block's product is the sum so far: no zeros, no copy)
                g = term
            else:
                g += term
            del term
        return torch.from_numpy(g if g is not None else np.zeros((a.shape[1], a.shape[1])))
    g = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], _ROWS):
        block = a[i : i + _ROWS].double()
        g.addmm_(block.mT, block)
        del block  # (else the next block is made while this one is still held)
    return g


def _times64(a: torch.Tensor, right: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """A · right (right float64), by row blocks of A in float64, returned in A's dtype. With
    ``overwrite`` (right square) the result is written over A itself: each block of output rows
    needs only the same rows of A, read before they are written."""
    if overwrite and right.shape[0] != right.shape[1]:
        raise ValueError("A · right can be written over A only when right is square")
    out = a if overwrite else torch.empty(a.shape[0], right.shape[1], dtype=a.dtype, device=a.device)
    for i in range(0, a.shape[0], _PRODUCT_ROWS):
        out[i : i + _PRODUCT_ROWS] = (a[i : i + _PRODUCT_ROWS].double() @ right).to(a.dtype)
    return out


def times_over(a: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """a · right, written over ``a`` (the caller's to lose) a block of rows at a time when
    ``right`` is square: one matrix-sized buffer less than ``a @ right`` and the same bytes (each
    output row is the same dot products whatever the block; checked bitwise on this BLAS for
    float32 and float64, tall and wide). Otherwise a fresh ``a @ right``."""
    if right.shape[0] != right.shape[1] or not a.is_contiguous():
        return a @ right
    for i in range(0, a.shape[0], _PRODUCT_ROWS):
        a[i : i + _PRODUCT_ROWS] = a[i : i + _PRODUCT_ROWS] @ right
    return a


def eigh64(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric float64 matrix, from its lower
    triangle (``torch.linalg.eigh``'s contract). On the CPU through ``numpy.linalg.eigh`` (the
    same LAPACK ``syevd``, from numpy's OpenBLAS): 1.6-1.7× faster than torch's MKL on this
    machine (2048²: 1.63 s against 2.78 s on one thread), and it releases the GIL."""
    if g.device.type == "cpu" and g.dtype == torch.float64:
        lam, w = np.linalg.eigh(g.numpy(), UPLO="L")
        return torch.from_numpy(lam), torch.from_numpy(w)
    return torch.linalg.eigh(g)


def _eig_desc(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam, w = eigh64(g)
    return lam.flip(0), w.flip(1)


def worth_gram(a: torch.Tensor) -> bool:
    m, n = a.shape
    return max(m, n) >= GRAM_MIN_ASPECT * min(m, n)


def gram_svd(a: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The top ``k`` (default all r) triplets of ``a`` through the float64 Gram matrix, or None
    when σ₁/σ_k exceeds ``GRAM_MAX_COND`` (then the caller takes the exact SVD)."""
    if a.shape[0] < a.shape[1]:
        got = gram_svd(a.mT, k)
        return None if got is None else (got[2].mT, got[1], got[0].mT)
    r = a.shape[1]
    k = r if k is None else min(k, r)
    lam, w = _eig_desc(_gram64(a))
    s = lam[:k].clamp(min=0).sqrt()
    if k == 0 or not bool(s[-1] * GRAM_MAX_COND >= s[0]) or not bool(s[0] > 0):
        return None
    v = w[:, :k]
    u = _times64(a, v / s)
    return u, s.to(a.dtype), v.mT.to(a.dtype)


def gram_polar(
    a: torch.Tensor, s_out: list[torch.Tensor] | None = None, overwrite: bool = False
) -> torch.Tensor | None:
    """polar(a) = A (AᵀA)^(-1/2) through the float64 Gram matrix, or None when a is too ill
    conditioned (see ``gram_svd``; ``a`` is then untouched). ``s_out`` receives the singular
    values. With ``overwrite`` the factor is written over ``a`` (the same bytes, one
    matrix-sized buffer less: callers that drop ``a`` anyway)."""
    if a.shape[0] < a.shape[1]:
        p = gram_polar(a.mT, s_out, overwrite)
        return None if p is None else p.mT
    lam, w = _eig_desc(_gram64(a))
    s = lam.clamp(min=0).sqrt()
    if not bool(s[0] > 0) or not bool(s[-1] * GRAM_MAX_COND >= s[0]):
        return None
    if s_out is not None:
        s_out.append(s.to(a.dtype))
    return _times64(a, (w / s) @ w.mT, overwrite)


def singular_values(a: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """The top ``k`` (default all min(m, n)) singular values of ``a``, descending, in its dtype:
    square roots of the eigenvalues of the float64 Gram matrix of its narrower side where
    σ₁/σ_k ≤ ``GRAM_MAX_COND`` (the accuracy of :func:`gram_svd`; no vectors, so several times
    cheaper than any SVD, square matrices included), else ``torch.linalg.svdvals``."""
    if a.shape[0] < a.shape[1]:
        a = a.mT
    r = a.shape[1]
    k = r if k is None else min(k, r)
    if k == 0:
        return a.new_zeros(0)
    s = torch.linalg.eigvalsh(_gram64(a)).flip(0)[:k].clamp(min=0).sqrt()
    if bool(s[0] > 0) and bool(s[-1] * GRAM_MAX_COND >= s[0]):
        return s.to(a.dtype)
    return torch.linalg.svdvals(a)[:k]


def randomized_svd(
    a: torch.Tensor, k: int, q: int, niter: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k triplets by the randomized range finder with ``niter`` QR-stabilised power
    iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1; the algorithm of
    ``torch.svd_lowrank``), sketching with q ≥ k Gaussian directions drawn from ``generator``
    so that the result does not depend on global RNG state or merge order."""
    omega = torch.randn(a.shape[1], q, generator=generator, dtype=a.dtype).to(a.device)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.mT @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    ub, s, vh = thin_svd(basis.mT @ a)
    return (basis @ ub[:, :k]), s[:k], vh[:k]


class TopSVD:
    """The decompositions of one SVD merge: top-k triplets (``__call__``), the polar factor
    and the full thin SVD, by the route ``how`` names (see ``SVD``).

    ``lowrank`` is used only where it can pay off, when the sketch k + oversample is at most
    r/2; otherwise (e.g. TSV-M with T = 2, or Iso-CTS's common space) the exact thin SVD is
    sliced. ``auto`` uses the Gram route where it is accurate and the exact SVD elsewhere
    (``fallbacks`` counts those)."""

    def __init__(
        self,
        how: str = "exact",
        niter: int = 8,
        oversample: int = 100,
        generator: Callable[[int], torch.Generator] | None = None,
    ):
        self.how, self.niter, self.oversample = how, niter, oversample
        self.generator = generator or (lambda stream: torch.Generator().manual_seed(stream))
        self.fallbacks = 0

    def __call__(
        self, a: torch.Tensor, k: int, stream: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = k + self.oversample
        if self.how == "lowrank" and 2 * q <= min(a.shape):
            return randomized_svd(a, k, q, self.niter, self.generator(stream))
        if self.how == "auto" and worth_gram(a):
            got = gram_svd(a, k)
            if got is not None:
                return got
            self.fallbacks += 1
        u, s, vh = thin_svd(a)
        return u[:, :k], s[:k], vh[:k]

    def polar(self, a: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """polar(a); with ``overwrite`` the Gram route may write it over ``a`` (then the
        caller's ``a`` holds the factor; the exact route leaves it as it was)."""
        if self.how == "auto" and worth_gram(a):
            got = gram_polar(a, overwrite=overwrite)
            if got is not None:
                return got
            self.fallbacks += 1
        return polar(a)


def _keep(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank_tol: float, top: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the triplets with σ < rank_tol · top (nothing when rank_tol is 0)."""
    if rank_tol <= 0:
        return u, s, vh
    keep = s >= rank_tol * top
    return u[:, keep], s[keep], vh[keep]


# ----------------------------------------------------------------------------- matrix merges


def tsv_rank(r: int, n_tasks: int, min_rank: int = 0) -> int:
    """Triplets kept per task: the reference code's ``int(r * (1 / T))`` (= ⌊r/T⌋ except for a
    float rounding at T = 49, where it is one less when T divides r), raised to ``min_rank``
    (1 in the ESM RoBERTa code's ``max(1, ·)``) and capped at r."""
    return min(r, max(min_rank, int(r * (1 / n_tasks))))


def tsv_m_matrix(
    deltas: Sequence[torch.Tensor],
    *,
    min_rank: int = 0,
    rank_tol: float = 0.0,
    top_svd: TopSVD | None = None,
) -> torch.Tensor:
    """TSV-M update of one matrix: ΔW = polar(U) diag(s) polar(Vᵀ), where U = [U_1,k … U_T,k],
    s = [s_1,k … s_T,k], Vᵀ = [V_1,kᵀ; …; V_T,kᵀ] are the top k = ``tsv_rank`` triplets of each τ_t.

    A task whose τ_t is exactly zero contributes no triplets (the reference code would insert
    the arbitrary singular vectors of a zero matrix, with zero weight but tilting the polar
    factors of the others). Each τ_t is taken from ``deltas`` once, in turn (a
    :class:`TaskVectors` forms it then)."""
    top_svd = top_svd or TopSVD()
    m, n, dtype, device = matrix_meta(deltas)
    k = tsv_rank(min(m, n), len(deltas), min_rank)
    us, ss, vhs = [], [], []
    for t in range(len(deltas)):
        d = deltas[t]
        if k == 0 or not bool(d.any()):
            continue
        done_with(deltas, t)
        u, s, vh = top_svd(d, k, stream=t)
        del d
        u, s, vh = _keep(u, s, vh, rank_tol, s[0])
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    if not ss or not any(x.numel() for x in ss):
        return torch.zeros(m, n, dtype=dtype, device=device)
    u, s, vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    del us, vhs
    # each stacked basis is dropped once its polar factor exists, or is overwritten by it (an
    # embedding-sized U is m × r: it would otherwise stay beside its factor and the product)
    pu = top_svd.polar(u, overwrite=True)
    del u
    pv = top_svd.polar(vh, overwrite=True)
    del vh
    return times_over(pu, s[:, None] * pv)  # (pu: a fresh factor, or U overwritten; ours)


def tsv_m_norm(deltas: Sequence[torch.Tensor], *, min_rank: int = 0) -> torch.Tensor | None:
    """‖tsv_m_matrix(deltas)‖_F without the polar factors: ‖s‖₂ over the kept singular values,
    since polar(U) (m × T·k) has orthonormal columns and polar(Vᵀ) orthonormal rows whenever
    T·k ≤ min(m, n) (their thin SVDs are full, whatever U's rank); None when T·k exceeds that
    (then the caller forms the matrix; nothing is taken from ``deltas``). The same number to
    rounding (tested), from eigenvalues of Gram matrices only."""
    m, n, dtype, _ = matrix_meta(deltas)
    k = tsv_rank(min(m, n), len(deltas), min_rank)
    if len(deltas) * k > min(m, n):
        return None
    total = torch.zeros((), dtype=torch.float64)
    for t in range(len(deltas)):
        d = deltas[t]
        if k == 0 or not bool(d.any()):
            continue
        done_with(deltas, t)
        total += singular_values(d, k).double().square().sum().cpu()
        del d
    return total.sqrt().to(dtype)


def isotropic(s: torch.Tensor, u: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """σ̄ · U Vᵀ with σ̄ the mean of ``s`` (a flat spectrum of the same nuclear norm)."""
    return (u @ vh).mul_(s.mean())


def iso_c_matrix(
    deltas: Sequence[torch.Tensor],
    *,
    rank_tol: float = 0.0,
    top_svd: TopSVD | None = None,
    owned: bool = False,
) -> torch.Tensor:
    """Iso-C update of one matrix: Σ_t τ_t = U diag(s) Vᵀ, ΔW = mean(s) · U Vᵀ (= mean(s) ·
    polar(Σ_t τ_t) when every direction is kept: the Gram route needs no U). ``owned``: the
    given tensors are the caller's to lose (``merge_tensor(summed=True)``'s own sum); a sum of
    several, or of a :class:`TaskVectors`, is always ours, and the polar factor is written
    over it."""
    top_svd = top_svd or TopSVD()
    total = _sum(deltas)
    ours = owned or isinstance(deltas, TaskVectors) or len(deltas) > 1
    if top_svd.how == "auto" and rank_tol <= 0 and worth_gram(total):
        s_all: list[torch.Tensor] = []
        p = gram_polar(total, s_all, overwrite=ours)
        if p is not None:
            return p.mul_(s_all[0].mean())
        top_svd.fallbacks += 1
    u, s, vh = thin_svd(total)
    del total
    u, s, vh = _keep(u, s, vh, rank_tol, s[0])
    if s.numel() == 0:
        return u.new_zeros(u.shape[0], vh.shape[1])
    return isotropic(s, u, vh)


def _sum(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_t τ_t in one buffer (no stacked copy), in the reference's order of additions (one
    tensor: the sum already, as ``merge_tensor(summed=True)`` gives it)."""
    if len(deltas) == 1:
        return deltas[0]
    total = deltas[0] if isinstance(deltas, TaskVectors) else deltas[0].clone()  # (fresh: ours)
    done_with(deltas, 0)
    for t in range(1, len(deltas)):
        total += deltas[t]
        done_with(deltas, t)
    return total


def iso_cts_sizes(r: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(k_c, n_t): common-space size and triplets per task, as the reference code computes them:
    k_c = int(r·f), then the task-specific total r − k_c is rounded (Python ``round``, half to
    even) to a multiple of T and k_c takes the rest, so that k_c + T·n_t = r. Where that
    rounding would exceed r (small r, many tasks, small f; the reference code would then slice
    with a negative index), n_t = ⌊r/T⌋ instead."""
    k_c = int(r * common_fraction)
    k_c = r - round((r - k_c) / n_tasks) * n_tasks
    if k_c < 0:
        return r - (r // n_tasks) * n_tasks, r // n_tasks
    return k_c, int((r - k_c) / n_tasks)


def iso_cts_matrix(
    deltas: Sequence[torch.Tensor],
    *,
    common_fraction: float = 0.8,
    rank_tol: float = 0.0,
    top_svd: TopSVD | None = None,
) -> torch.Tensor:
    """Iso-CTS update of one matrix. Each τ_t is taken from ``deltas`` twice (the sum, then its
    residual; a :class:`TaskVectors` forms it each time, so no T of them are held at once).

    1. Common space: the top k_c triplets (U_c, s_c, V_cᵀ) of Σ_t τ_t.
    2. Task-specific: for each t, the top n_t triplets of the residual τ_t − U_c U_cᵀ τ_t.
    3. Stack [task 1 … task T, common] in U, s and Vᵀ (the reference code's order);
       ΔW = mean(s) · polar(U) polar(Vᵀ).

    When no task-specific triplet is left (n_t = 0, e.g. ``common_fraction=1``), U_c and V_c are
    already orthonormal and ΔW = mean(s_c) U_c V_cᵀ is computed as Iso-C computes it, so that
    ``common_fraction=1`` gives Iso-C exactly. A task whose residual is exactly zero contributes
    no triplets."""
    top_svd = top_svd or TopSVD()
    m, n, dtype, device = matrix_meta(deltas)
    k_c, n_t = iso_cts_sizes(min(m, n), len(deltas), common_fraction)
    if n_t == 0:  # only the common space: Iso-C, computed as Iso-C computes it
        return iso_c_matrix(deltas, rank_tol=rank_tol, top_svd=top_svd)
    total = torch.zeros(m, n, dtype=dtype, device=device)  # 0 + τ_1 + … in order: the bytes
    for t in range(len(deltas)):  # of a stacked sum, without a stacked copy
        total += deltas[t]
    uc, sc, vhc = top_svd(total, k_c, stream=len(deltas))
    del total
    if sc.numel():
        uc, sc, vhc = _keep(uc, sc, vhc, rank_tol, sc[0])
    us, ss, vhs = [], [], []
    for t in range(len(deltas)):
        coeffs = uc.mT @ deltas[t]  # (τ_t is dropped before the projection is formed)
        # τ_t − U_c U_cᵀ τ_t as (−U_c U_cᵀ τ_t) + τ_t: the same bytes (a − b is a + (−b)), with τ_t
        # added a block at a time, so no embedding-sized τ_t sits beside the projection
        resid = add_task_vector_((uc @ coeffs).neg_(), deltas, t)
        done_with(deltas, t)
        del coeffs
        if not bool(resid.any()):
            continue
        u, s, vh = top_svd(resid, n_t, stream=t)
        del resid  # (else the last one would stay beside the polar steps)
        u, s, vh = _keep(u, s, vh, rank_tol, s[0])
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    if not any(x.numel() for x in ss):
        return isotropic(sc, uc, vhc) if sc.numel() else torch.zeros(m, n, dtype=dtype, device=device)
    u = torch.cat([*us, uc], dim=1)
    s = torch.cat([*ss, sc])
    vh = torch.cat([*vhs, vhc], dim=0)
    del us, vhs, uc, vhc
    pu = top_svd.polar(u, overwrite=True)
    del u  # (as in tsv_m_matrix)
    pv = top_svd.polar(vh, overwrite=True)
    del vh
    return times_over(pu, pv).mul_(s.mean())  # mean(s) · polar(U) polar(Vᵀ), scaled in place
