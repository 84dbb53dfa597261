"""The tests' independent reference: form dW densely in float64 and take a full SVD (never used by lsq)."""

import torch


def dense_update(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * B @ A`` in float64, flattening conv factors: ``(d_out, d_in)``."""
    return scale * (B.double().reshape(B.shape[0], -1) @ A.double().reshape(A.shape[0], -1))


def best_rank_k(dW: torch.Tensor, k: int) -> torch.Tensor:
    """Eckart-Young: the best rank-k approximation of ``dW`` from a dense float64 SVD."""
    U, S, Vh = torch.linalg.svd(dW.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def rel_err(X: torch.Tensor, ref: torch.Tensor) -> float:
    denom = float(ref.double().norm())
    return float((X.double() - ref.double()).norm()) / (denom if denom > 0 else 1.0)
