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
Signs are made deterministic: the entries of every left singular vector sum to a non-negative number
(``1^T u_j >= 0``). The rule is applied in the small core space (``1^T Q`` costs one matrix-vector
product), so no pass over the tall singular vectors is needed.

Non-finite factors are caught on the way (:class:`NonFiniteFactor`): the column sums that the sign rule
needs are non-finite exactly when a factor holds NaN or Inf (up to float64 overflow, rechecked).
"""

from __future__ import annotations

import math
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


class NonFiniteFactor(ValueError):
    """A LoRA factor holds NaN or Inf; ``factor`` is ``"A"`` or ``"B"``."""

    def __init__(self, factor: str):
        super().__init__(f"lora_{factor} holds NaN or Inf values")
        self.factor = factor


def _column_sums(X: Tensor, factor: str) -> Tensor:
    """``X^T 1`` for ``X: (d, r)``, shape ``(r,)``; raises :class:`NonFiniteFactor` if ``X`` is not finite.

    NaN and Inf propagate into the sums; a non-finite sum of finite entries (float64 overflow) is
    told apart by the elementwise check, which runs only then.
    """
    sums = X.mT @ torch.ones(X.shape[0], dtype=X.dtype, device=X.device)
    if not bool(torch.isfinite(sums).all()) and not bool(torch.isfinite(X).all()):
        raise NonFiniteFactor(factor)
    return sums


def _sign_rule(u_sums: Tensor) -> Tensor:
    """Signs ``(p,)`` that make every left singular vector's entry sum non-negative, given those sums."""
    signs = torch.sign(u_sums)
    signs[signs == 0] = 1
    return signs


def _check_factors(A: Tensor, B: Tensor) -> None:
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"LoRA factors disagree: A {tuple(A.shape)} and B {tuple(B.shape)} need A (r, d_in), B (d_out, r)")


# Gram route is used when cond(factor) <= 1e3, i.e. cond(Gram) <= 1e6: the orthogonality lost by
# forming the Gram matrix is then about eps * cond(Gram) = 1e-10 in float64. In float32 (eps 1.2e-7)
# that limit would lose all orthogonality; cond(Gram) <= 1e3 keeps the Gram route's error within a
# few tens of eps of Householder QR's (measured in tests/lsq/test_linalg.py).
GRAM_COND_LIMIT = 1e6
GRAM_COND_LIMIT_FLOAT32 = 1e3


class _Basis:
    """``Q`` of ``X = Q R``, kept implicit where it is ``X @ r_inv`` (the Gram route)."""

    def __init__(self, X: Tensor, r_inv: Tensor | None = None, Q: Tensor | None = None):
        self.X, self.r_inv, self.Q = X, r_inv, Q

    def times(self, M: Tensor) -> Tensor:
        """``Q @ M``, shape ``(d, k)``, contiguous."""
        return self.Q @ M if self.Q is not None else self.X @ (self.r_inv @ M)

    def times_t(self, M: Tensor) -> Tensor:
        """``(Q @ M)^T``, shape ``(k, d)``, computed as ``M^T Q^T`` so that it comes out contiguous."""
        if self.Q is not None:
            return M.mT @ self.Q.mT
        return (self.r_inv @ M).mT @ self.X.mT


def _orth_factor(X: Tensor, gram_ok: bool, factor: str) -> tuple[_Basis, Tensor, Tensor]:
    """``X = Q @ R`` with ``Q: (d, p)`` orthonormal columns and ``R: (p, r)``, for ``X: (d, r)``.

    Returns ``(Q, R, q_sums)``: ``Q`` as a :class:`_Basis` (never formed when a cheaper product exists)
    and ``q_sums = Q^T 1``, the column sums of ``Q`` that the sign rule needs. Raises
    :class:`NonFiniteFactor` (naming ``factor``) when ``X`` holds NaN or Inf.

    Fast path (``gram_ok``): eigendecomposition of the ``r x r`` Gram matrix ``X^T X = W L W^T``,
    ``R = L^{1/2} W^T``, ``Q = X W L^{-1/2}`` (GEMMs only, several times faster than Householder QR on
    tall factors). It is taken only when ``cond(X^T X) <= GRAM_COND_LIMIT`` (``GRAM_COND_LIMIT_FLOAT32``
    below float64); otherwise, or for a rank-deficient factor, Householder QR (``torch.linalg.qr``).
    """
    sums = _column_sums(X, factor)  # (r,) = X^T 1
    if gram_ok and X.shape[0] >= X.shape[1]:
        evals, W = torch.linalg.eigh(X.mT @ X)  # ascending, (r,), (r, r)
        limit = GRAM_COND_LIMIT if X.dtype == torch.float64 else GRAM_COND_LIMIT_FLOAT32
        if evals[0] > 0 and evals[-1] <= limit * evals[0]:
            root = evals.sqrt()
            r_inv = W / root  # (r, r): Q = X @ r_inv, so Q^T 1 = r_inv^T X^T 1
            return _Basis(X, r_inv=r_inv), root[:, None] * W.mT, sums @ r_inv
    Q, R = torch.linalg.qr(X)
    return _Basis(X, Q=Q), R, Q.sum(0)


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
    Qb, Rb, qb_sums = _orth_factor(B, gram, "B")  # Qb: (d_out, p_b), Rb: (p_b, r)
    Qa, Ra, _ = _orth_factor(A.mT, gram, "A")  # Qa: (d_in, p_a), Ra: (p_a, r)
    core = (Rb @ Ra.mT) * scale  # (p_b, p_a)
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    p = S.shape[0] if keep is None else min(keep, S.shape[0])
    # 1^T U = (Qb^T 1)^T Uc: the sign rule in core space, the same whichever route built Qb
    signs = _sign_rule(qb_sums @ Uc[:, :p])
    U, Vh = Qb.times(Uc[:, :p] * signs), Qa.times_t(Vhc[:p].mT * signs)  # (d_out, p), (p, d_in)
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
    _column_sums(A.mT, "A"), _column_sums(B, "B")  # NaN/Inf check
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
    signs = _sign_rule(Q.sum(0) @ Us)
    U, Vh = Q @ (Us * signs), Vh * signs[:, None]
    return Spectrum(U=U, S=S, Vh=Vh)


def truncate(spec: Spectrum, k: int, scale: float, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """New LoRA factors of rank ``k`` for a target scale ``scale`` (``s'``).

    The singular values are split evenly: ``B' = U_k sqrt(S_k / s')``, ``A' = sqrt(S_k / s') Vh_k``,
    so that ``s' B' A' = U_k diag(S_k) Vh_k``, the best rank-k approximation of the source update,
    whatever ``s'`` is. Returns ``(A', B')`` with shapes ``(k, d_in)`` and ``(d_out, k)``, cast to
    ``dtype`` (default: the compute dtype).

    A spectrum narrower than ``k`` (the module's update has rank ``m < k``: a source rank above the
    module's ``min(d_in, d_out)``, such as rank 64 on a 16-wide key projection) is kept whole and padded
    with ``k - m`` zero rows of ``A'`` and zero columns of ``B'``: the update is exact, and every module of
    the adapter keeps the one uniform rank ``k`` that PEFT's ``r`` and vLLM's ``--max-lora-rank`` read.
    """
    if k < 1:
        raise ValueError(f"rank {k} is below 1")
    if scale <= 0:
        raise ValueError(f"target scale must be positive, got {scale}")
    m = min(k, spec.U.shape[1])
    root = torch.sqrt(spec.S[:m] / scale)
    A_new = root[:, None] * spec.Vh[:m]  # (m, d_in)
    B_new = spec.U[:, :m] * root  # (d_out, m)
    if m < k:
        A_new = torch.cat([A_new, A_new.new_zeros(k - m, A_new.shape[1])])  # (k, d_in)
        B_new = torch.cat([B_new, B_new.new_zeros(B_new.shape[0], k - m)], dim=1)  # (d_out, k)
    if dtype is not None:
        A_new, B_new = A_new.to(dtype), B_new.to(dtype)
    return A_new, B_new
