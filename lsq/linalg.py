"""Factored SVD of a LoRA update, never forming the full matrix.

A LoRA module's update is ``dW = s * B @ A`` with ``A: (r, d_in)``, ``B: (d_out, r)`` and scale ``s``.
Everything here works on the two factors only:

* :func:`factored_svd` is exact: an orthonormal factorisation of both factors and an SVD of the
  small ``r x r`` core (``B = Qb Rb``, ``A^T = Qa Ra``, ``s Rb Ra^T = Uc S Vc^T``,
  ``dW = (Qb Uc) S (Qa Vc)^T``). ``Q R`` comes from the Gram matrix when the factor is well
  conditioned and from Householder QR otherwise.
  Cost ``O((d_in + d_out) r^2 + r^3)`` instead of ``O(d_in d_out r)`` to form ``dW`` and
  ``O(d_in d_out min(d_in, d_out))`` to decompose it.
* :func:`randomized_factored_svd` is Halko, Martinsson & Tropp (2011), Algorithm 4.4 (randomized
  subspace iteration) followed by Algorithm 5.1, applied to the implicit operator ``x -> s B (A x)``.
  The LoRA-Squeeze paper (arXiv 2602.10993) uses it with oversampling 10 and 2 power iterations.

One decomposition serves every target rank: :func:`truncate` keeps a prefix of the triplets
(Eckart-Young: the best rank-k approximation in Frobenius and spectral norm).

Dtype policy: inputs of any floating dtype (bf16, fp16, fp32, fp64) are upcast to ``compute_dtype``
(float64 by default) for the maths; :func:`truncate` returns factors in the dtype it is asked for.
Signs are made deterministic: the largest-magnitude entry of every left singular vector is positive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Spectrum:
    """Thin SVD ``dW = U @ diag(S) @ Vh`` of one module's update.

    Shapes: ``U: (d_out, p)``, ``S: (p,)`` descending, ``Vh: (p, d_in)``; ``p <= r``. ``U`` and ``Vh``
    may hold only the leading ``p`` columns/rows that a caller asked for (``keep``), while ``S`` always
    holds every singular value that was computed (the report and the rank policies need them all).
    """

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def energy(self) -> Tensor:
        """Cumulative fraction of ``||dW||_F^2`` kept by the first k triplets, for k = 1..len(S)."""
        sq = self.S.double() ** 2
        total = sq.sum()
        if total == 0:
            return torch.ones_like(sq)
        return torch.cumsum(sq, 0) / total

    def relative_error(self, k: int) -> float:
        """``||dW - dW_k||_F / ||dW||_F`` for the rank-k truncation (exact from the spectrum)."""
        sq = self.S.double() ** 2
        total = float(sq.sum())
        return math.sqrt(float(sq[k:].sum()) / total) if total > 0 else 0.0


def _flip_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Make the largest-|.| entry of each column of U positive (as scikit-learn's ``svd_flip``)."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def _check_factors(A: Tensor, B: Tensor) -> None:
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"LoRA factors disagree: A {tuple(A.shape)} and B {tuple(B.shape)} need A (r, d_in), B (d_out, r)")


# Gram route is used when cond(factor) <= 1e3, i.e. cond(Gram) <= 1e6: the orthogonality lost by
# forming the Gram matrix is then about eps * cond(Gram) = 1e-10 in float64. In float32 (eps 1.2e-7)
# that limit would lose all orthogonality; cond(Gram) <= 1e3 keeps the Gram route's error within a
# few tens of eps of Householder QR's (measured in tests/lsq/test_linalg.py).
GRAM_COND_LIMIT = 1e6
GRAM_COND_LIMIT_FLOAT32 = 1e3


def _orth_factor(X: Tensor, gram_ok: bool) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``X = Q @ R`` with ``Q: (d, p)`` orthonormal columns and ``R: (p, r)``, for ``X: (d, r)``.

    Returns ``(q_times, R)`` where ``q_times(M) = Q @ M``, so that ``Q`` is never formed when a
    cheaper product exists. Fast path (``gram_ok``): eigendecomposition of the ``r x r`` Gram matrix
    ``X^T X = W L W^T``, ``R = L^{1/2} W^T``, ``Q = X W L^{-1/2}`` (GEMMs only, several times faster
    than Householder QR on tall factors). It is taken only when ``cond(X^T X) <= GRAM_COND_LIMIT``
    (``GRAM_COND_LIMIT_FLOAT32`` below float64); otherwise, or for a rank-deficient factor, Householder QR
    (``torch.linalg.qr``) is used.
    """
    if gram_ok and X.shape[0] >= X.shape[1]:
        evals, W = torch.linalg.eigh(X.mT @ X)  # ascending, (r,), (r, r)
        limit = GRAM_COND_LIMIT if X.dtype == torch.float64 else GRAM_COND_LIMIT_FLOAT32
        if evals[0] > 0 and evals[-1] <= limit * evals[0]:
            root = evals.sqrt()
            r_inv = W / root  # (r, r): Q = X @ r_inv
            return (lambda M: X @ (r_inv @ M)), root[:, None] * W.mT
    Q, R = torch.linalg.qr(X)
    return (lambda M: Q @ M), R


def factored_svd(
    A: Tensor,
    B: Tensor,
    scale: float,
    *,
    keep: int | None = None,
    compute_dtype: torch.dtype = torch.float64,
    gram: bool = True,
) -> Spectrum:
    """Exact thin SVD of ``scale * B @ A`` from the factors.

    Args:
        A: ``(r, d_in)`` LoRA down-projection.
        B: ``(d_out, r)`` LoRA up-projection.
        scale: the module's ``s`` (``alpha / r`` or ``alpha / sqrt(r)``).
        keep: number of leading singular vectors to materialise (default: all). Saves the
            ``d x r x (r - keep)`` work and memory when only small ranks are wanted.
        compute_dtype: dtype of the maths (float64 default; float32 halves time and memory).
        gram: allow the Gram-matrix route for well-conditioned factors (see :func:`_orth_factor`);
            ``False`` forces Householder QR for both factors.

    Returns:
        :class:`Spectrum` with ``min(r, d_in, d_out)`` singular values and ``keep`` vectors.
    """
    _check_factors(A, B)
    A = A.to(compute_dtype)
    B = B.to(compute_dtype)
    qb_times, Rb = _orth_factor(B, gram)  # Qb: (d_out, p_b), Rb: (p_b, r)
    qa_times, Ra = _orth_factor(A.mT, gram)  # Qa: (d_in, p_a), Ra: (p_a, r)
    core = (Rb @ Ra.mT) * scale  # (p_b, p_a)
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    p = S.shape[0] if keep is None else min(keep, S.shape[0])
    # signs are fixed on the final vectors: those of Qb's columns differ between the Gram and QR routes
    U, Vh = _flip_signs(qb_times(Uc[:, :p]), qa_times(Vhc[:p].mT).mT)
    return Spectrum(U=U, S=S, Vh=Vh)


def randomized_factored_svd(
    A: Tensor,
    B: Tensor,
    scale: float,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    compute_dtype: torch.dtype = torch.float64,
) -> Spectrum:
    """Randomized SVD of ``scale * B @ A`` through products with the factors only.

    Halko, Martinsson & Tropp, "Finding structure with randomness" (SIAM Review 2011), Algorithms
    4.4 + 5.1, with a QR re-orthonormalisation after every product. The sketch has
    ``l = min(rank + oversample, r)`` columns; when ``l`` reaches ``r`` the range is captured exactly
    and the result equals :func:`factored_svd` up to rounding. Otherwise the expected error is
    close to optimal: ``E||dW - dW_k|| <= (1 + eps(oversample, power_iters)) * sigma_{k+1}``, and the
    triplets beyond ``rank`` are approximate. Deterministic for a given ``seed`` (a private
    ``torch.Generator``; the global RNG is untouched).

    Cost: ``O((d_in + d_out) r l (1 + power_iters))``; memory ``O((d_in + d_out) l)``.

    Returns:
        :class:`Spectrum` with ``l`` singular values and vectors.
    """
    _check_factors(A, B)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    A = A.to(compute_dtype)
    B = B.to(compute_dtype)
    r, d_in = A.shape
    l = min(rank + oversample, r, d_in, B.shape[0])
    gen = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(d_in, l, generator=gen, dtype=compute_dtype, device=A.device)  # (d_in, l)
    Q, _ = torch.linalg.qr(B @ (A @ omega))  # (d_out, l); the scale does not change a range
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(A.mT @ (B.mT @ Q))  # (d_in, l)
        Q, _ = torch.linalg.qr(B @ (A @ Z))  # (d_out, l)
    small = ((Q.mT @ B) @ A) * scale  # (l, d_in)
    Us, S, Vh = torch.linalg.svd(small, full_matrices=False)
    U, Vh = _flip_signs(Q @ Us, Vh)
    return Spectrum(U=U, S=S, Vh=Vh)


def truncate(spec: Spectrum, k: int, scale: float, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """New LoRA factors of rank ``k`` for a target scale ``scale`` (``s'``).

    The singular values are split evenly: ``B' = U_k sqrt(S_k / s')``, ``A' = sqrt(S_k / s') Vh_k``,
    so that ``s' B' A' = U_k diag(S_k) Vh_k``, the best rank-k approximation of the source update,
    whatever ``s'`` is. Returns ``(A', B')`` with shapes ``(k, d_in)`` and ``(d_out, k)``, cast to
    ``dtype`` (default: the compute dtype).
    """
    if not 1 <= k <= spec.U.shape[1]:
        raise ValueError(f"rank {k} is outside 1..{spec.U.shape[1]}")
    if scale <= 0:
        raise ValueError(f"target scale must be positive, got {scale}")
    root = torch.sqrt(spec.S[:k] / scale)
    A_new = root[:, None] * spec.Vh[:k]
    B_new = spec.U[:, :k] * root
    if dtype is not None:
        A_new, B_new = A_new.to(dtype), B_new.to(dtype)
    return A_new, B_new
