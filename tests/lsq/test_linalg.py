"""Property tests of :mod:`lsq.linalg` against the dense float64 reference (tests/lsq/dense.py).

Tolerances (measured, then set with head-room):

* Exact route, relative to ``||dW||`` (singular values) or ``||dW_k||`` (truncations):
  ``TOL[dtype] * max(1, kappa)`` with ``kappa = |s| ||B||_2 ||A||_2 / ||dW||_2``, the condition of the
  product (about 1 for balanced factors, large when a factor's big directions meet the other's small
  ones: no method that reads the factors in ``dtype`` can beat ``eps * kappa``). ``TOL`` is 1e-10 for
  float64 (measured over 6,000 random cases: <= 5e-13 * kappa; 1.4e-8 at kappa 1e4 on the Gram route,
  whose documented orthogonality loss is eps * cond(Gram) <= 1e-8) and 1e-5 for float32 (measured
  <= 1.5e-6 * kappa, about 13 eps32, on both routes).
* A truncation at rank k is compared with the dense ``dW_k`` only where ``sigma_k`` is separated from
  ``sigma_{k+1}`` (otherwise ``dW_k`` is not unique); the tolerance grows with ``sigma_1 / gap``
  (Wedin). The residual ``||dW - s' B' A'||_F`` is compared with the optimal tail for every k.
* RSVD with a sketch smaller than r, on decaying spectra (measured over 1,500 random cases each):
  oversample 10 and 2 power iterations (the paper's setting) stay within 1.007 of the optimal
  residual: bound 1.02; oversample 2 and 1 power iteration within 1.142: bound 1.25.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsq.linalg import Spectrum, factored_svd, randomized_factored_svd, truncate
from tests.lsq.dense import best_rank_k, dense_update, rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# orthonormality of U: the Gram route loses eps * cond(Gram) (<= 1e-8 in float64 by design; its float32
# limit of cond(Gram) <= 1e3 gives about 1e-4, measured <= 9e-5); Householder QR keeps it to rounding.
ORTH_TOL = {
    (torch.float64, True): 1e-7,
    (torch.float64, False): 1e-12,
    (torch.float32, True): 5e-4,
    (torch.float32, False): 1e-5,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Matrices here are tiny: thread hand-offs cost more than they save (10x on a shared 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


KINDS = ("gaussian", "zero_cols_b", "dup_rows_a", "zero_b", "graded", "imbalanced", "decay")


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _with_spectrum(gen: torch.Generator, rows: int, cols: int, s: torch.Tensor) -> torch.Tensor:
    """A random ``(rows, cols)`` matrix whose leading singular values are ``s``."""
    U, _, Vh = torch.linalg.svd(_randn(gen, rows, cols), full_matrices=False)
    return (U[:, : len(s)] * s) @ Vh[: len(s)]


def make_factors(kind: str, d_in: int, d_out: int, r: int, seed: int, param: float) -> tuple[torch.Tensor, ...]:
    """``(A (r, d_in), B (d_out, r))`` in float64 of one family; ``param`` in [0, 1) sets its severity."""
    gen = torch.Generator().manual_seed(seed)
    A, B = _randn(gen, r, d_in), _randn(gen, d_out, r)
    if kind == "zero_cols_b":  # rank-deficient B: some (perhaps all) columns zero
        B[:, torch.rand(r, generator=gen) < 0.2 + 0.8 * param] = 0
        B[:, int(torch.randint(r, (1,), generator=gen))] = 0
    elif kind == "dup_rows_a":  # rank-deficient A: repeated rows
        src = torch.randint(r, (r,), generator=gen)
        A = A[torch.where(torch.rand(r, generator=gen) < 0.5, src, torch.arange(r))].clone()
        A[-1] = A[0]
    elif kind == "zero_b":  # a LoRA at initialisation
        B = torch.zeros(d_out, r, dtype=torch.float64)
    elif kind == "graded":  # both factors ill-conditioned: cond up to 1e12, the Gram route must give way to QR
        m = min(r, d_in)
        A = _with_spectrum(gen, r, d_in, torch.logspace(0, -12 * param, m, dtype=torch.float64))
        B = _with_spectrum(gen, d_out, r, torch.logspace(0, -12 * param, min(r, d_out), dtype=torch.float64))
    elif kind == "imbalanced":  # B @ M, M^-1 @ A with cond(M) up to 1e6: same dW, kappa up to 1e6
        M = _with_spectrum(gen, r, r, torch.logspace(0, -6 * param, r, dtype=torch.float64))
        B, A = B @ M, torch.linalg.solve(M, A)
    elif kind == "decay":  # dW's spectrum decays geometrically (the RSVD families use this one too)
        A = _with_spectrum(gen, r, d_in, (0.3 + 0.65 * param) ** torch.arange(min(r, d_in), dtype=torch.float64))
    return A, B


@st.composite
def lora_case(draw, kinds=KINDS, max_d=80, min_r=1, max_r=24):
    d_in, d_out = draw(st.integers(1, max_d)), draw(st.integers(1, max_d))
    r = draw(st.integers(min_r, max_r))
    kind = draw(st.sampled_from(kinds))
    A, B = make_factors(kind, d_in, d_out, r, draw(st.integers(0, 2**31 - 1)), draw(st.floats(0, 0.999)))
    scale = 10 ** draw(st.floats(-3, 3))
    return A, B, scale


def kappa(A: torch.Tensor, B: torch.Tensor, scale: float) -> float:
    """Condition of the product ``s B A``: how much rounding of the factors the update amplifies."""
    top = float(torch.linalg.matrix_norm(dense_update(A, B, scale), 2))
    if top == 0.0:
        return 1.0
    return max(1.0, scale * float(torch.linalg.matrix_norm(A, 2) * torch.linalg.matrix_norm(B, 2)) / top)


def dense_flipped(dW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense SVD with the documented sign rule applied independently: each U column's entries sum to >= 0."""
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    signs = torch.sign(U.sum(0))
    signs[signs == 0] = 1
    return U * signs, S, Vh * signs[:, None]


def isolated(S: torch.Tensor, j: int, rel_gap: float) -> bool:
    """Whether ``S[j]`` is nonzero and separated from its neighbours by ``rel_gap * S[0]``."""
    gaps = [S[j - 1] - S[j]] if j > 0 else []
    gaps += [S[j] - S[j + 1]] if j + 1 < len(S) else [S[j]]
    return bool(S[j] > rel_gap * S[0] and min(gaps) > rel_gap * S[0])


def check_spectrum(spec: Spectrum, dW: torch.Tensor, p: int, tol: float) -> None:
    """Shapes and singular values of ``spec`` against the dense ones."""
    d_out, d_in = dW.shape
    assert spec.S.shape == (p,)
    assert spec.U.shape == (d_out, p) and spec.Vh.shape == (p, d_in)
    S_ref = torch.linalg.svdvals(dW)
    top = float(S_ref[0]) if S_ref.numel() else 0.0
    assert torch.all(spec.S[:-1] >= spec.S[1:]), "singular values are not descending"
    err = float((spec.S.double() - S_ref[:p]).abs().max()) if p else 0.0
    assert err <= tol * top, f"singular values off by {err:.3e} (tolerance {tol * top:.3e})"


def check_truncations(spec: Spectrum, dW: torch.Tensor, ks, new_scale: float, tol: float) -> None:
    """``s' B' A'`` is the best rank-k approximation of ``dW`` for every k in ``ks``."""
    d_out, d_in = dW.shape
    S_ref = torch.linalg.svdvals(dW)
    top, total = float(S_ref[0]), float(dW.norm())
    for k in ks:
        A_k, B_k = truncate(spec, k, new_scale)
        assert A_k.shape == (k, d_in) and B_k.shape == (d_out, k)
        approx = new_scale * (B_k.double() @ A_k.double())
        tail = float(S_ref[k:].square().sum().sqrt())
        resid = float((dW - approx).norm())
        assert abs(resid - tail) <= tol * total + 1e-300, f"k={k}: residual {resid:.6e} vs optimal {tail:.6e}"
        gap = float(S_ref[k - 1] - S_ref[k]) if k < len(S_ref) else float(S_ref[k - 1])
        if gap > 0:
            err = rel_err(approx, best_rank_k(dW, k))
            assert err <= tol * (1 + 4 * top / gap), f"k={k}: relative error {err:.3e} (sigma_1/gap {top / gap:.1e})"


def test_a_rank_above_the_modules_own_is_exact_with_zero_padding():
    """Source rank 64 on a 16-wide module (a GQA key projection): its update has rank 16 at most; rank 32
    keeps all of it, padded with zero directions, so the module keeps the adapter's uniform r."""
    torch.manual_seed(0)
    A, B = torch.randn(64, 40, dtype=torch.float64), torch.randn(16, 64, dtype=torch.float64)  # dW: (16, 40), rank 16
    spec = factored_svd(A, B, 0.5)
    assert spec.U.shape[1] == 16
    A_new, B_new = truncate(spec, 32, 0.25)
    assert A_new.shape == (32, 40) and B_new.shape == (16, 32)
    assert rel_err(0.25 * B_new @ A_new, 0.5 * B @ A) < 1e-12
    assert not A_new[16:].any() and not B_new[:, 16:].any()


# --------------------------------------------------------------------------------------------------
# exact route


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    case=lora_case(),
    gram=st.booleans(),
    compute=st.sampled_from([torch.float64, torch.float32]),
    new_scale_exp=st.floats(-3, 3),
)
def test_factored_svd_matches_dense(case, gram, compute, new_scale_exp):
    A, B, scale = case
    r, d_in, d_out = A.shape[0], A.shape[1], B.shape[0]
    A_in, B_in = (A, B) if compute == torch.float64 else (A.float(), B.float())
    dW = dense_update(A, B, scale)
    p = min(r, d_in, d_out)
    tol = TOL[compute] * kappa(A, B, scale)

    spec = factored_svd(A_in, B_in, scale, compute_dtype=compute, gram=gram)

    assert spec.U.dtype == spec.S.dtype == spec.Vh.dtype == compute
    check_spectrum(spec, dW, p, tol)
    # the sign rule: the entries of every left singular vector sum to a non-negative number
    assert torch.all(spec.U.double().sum(0) >= -torch.finfo(compute).eps * spec.U.shape[0])
    eye = torch.eye(p, dtype=torch.float64)
    assert float((spec.U.double().mT @ spec.U.double() - eye).abs().max()) <= ORTH_TOL[(compute, gram)]
    assert float((spec.Vh.double() @ spec.Vh.double().mT - eye).abs().max()) <= ORTH_TOL[(compute, gram)]
    ks = sorted({1, p, max(1, p // 2)} | set(range(1, p + 1, 5)))
    check_truncations(spec, dW, ks, 10**new_scale_exp, tol)
    A_k, B_k = truncate(spec, 1, 1.0)
    assert A_k.dtype == B_k.dtype == compute
    A_k, B_k = truncate(spec, 1, 1.0, dtype=torch.bfloat16)
    assert A_k.dtype == B_k.dtype == torch.bfloat16


@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=lora_case(kinds=("gaussian", "decay", "imbalanced", "dup_rows_a")))
def test_sign_convention_is_deterministic_across_routes(case):
    """Isolated singular vectors come out identical (not merely up to sign) from both routes, from
    ``(-A, -B)`` (same dW) and from an independent dense SVD with the documented rule."""
    A, B, scale = case
    dW = dense_update(A, B, scale)
    U_ref, S_ref, Vh_ref = dense_flipped(dW)
    runs = [factored_svd(A, B, scale, gram=True), factored_svd(-A, -B, scale, gram=False), factored_svd(A, B, scale)]
    tol = 1e-7 * kappa(A, B, scale)
    for j in range(len(runs[0].S)):
        if not isolated(S_ref, j, 1e-2) or abs(float(U_ref[:, j].sum())) < 1e-3:
            continue  # direction not unique, or its sign rule nearly tied
        for spec in runs:
            assert float((spec.U[:, j] - U_ref[:, j]).abs().max()) <= tol, f"U column {j} differs"
            assert float((spec.Vh[j] - Vh_ref[j]).abs().max()) <= tol, f"Vh row {j} differs"
    assert torch.equal(runs[0].U, runs[2].U) and torch.equal(runs[0].S, runs[2].S)  # repeatable bit for bit


@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=lora_case(kinds=("gaussian", "decay", "zero_cols_b")), keep=st.integers(0, 24))
def test_keep_materialises_a_prefix(case, keep):
    A, B, scale = case
    full = factored_svd(A, B, scale)
    part = factored_svd(A, B, scale, keep=keep)
    p = min(keep, len(full.S))
    assert torch.equal(part.S, full.S)  # every singular value, whatever keep is
    assert part.U.shape[1] == part.Vh.shape[0] == p
    torch.testing.assert_close(part.U, full.U[:, :p], rtol=0, atol=1e-12)
    torch.testing.assert_close(part.Vh, full.Vh[:p], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("compute", "cond", "qr_calls"),
    [
        (torch.float64, 10.0, 0),
        (torch.float64, 3e2, 0),  # cond(Gram) 9e4 <= 1e6: Gram route
        (torch.float64, 3e3, 1),  # cond(Gram) 9e6: Householder QR for B
        (torch.float32, 10.0, 0),  # cond(Gram) 1e2 <= 1e3
        (torch.float32, 100.0, 1),  # cond(Gram) 1e4: the float64 limit (1e6) would keep the Gram route here
    ],
)
def test_gram_route_gives_way_to_qr(monkeypatch, compute, cond, qr_calls):
    gen = torch.Generator().manual_seed(6)
    B = _with_spectrum(gen, 40, 8, torch.logspace(0, -math.log10(cond), 8, dtype=torch.float64))
    A = _with_spectrum(gen, 8, 30, torch.linspace(1, 0.5, 8, dtype=torch.float64))  # cond(Gram) 4
    calls = []
    real_qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda X, *a, **kw: calls.append(X.shape) or real_qr(X, *a, **kw))
    spec = factored_svd(A.to(compute), B.to(compute), 1.5, compute_dtype=compute)
    assert len(calls) == qr_calls
    dW = dense_update(A, B, 1.5)
    check_spectrum(spec, dW, 8, TOL[compute] * kappa(A, B, 1.5))
    check_truncations(spec, dW, range(1, 9), 0.5, TOL[compute] * kappa(A, B, 1.5))


@pytest.mark.parametrize("gram", [True, False])
@pytest.mark.parametrize("param", [0.4, 0.5, 0.6, 0.66])
def test_float32_compute_on_imbalanced_factors(gram, param):
    """cond(M) from 250 to 1e4: factors whose Gram matrices a float32 eigh cannot trust (errors of
    several percent before the float32 limit existed); both routes must stay within eps32 * kappa."""
    A, B = make_factors("imbalanced", 60, 70, 16, 11, param)
    dW = dense_update(A, B, 0.5)
    tol = TOL[torch.float32] * kappa(A, B, 0.5)
    spec = factored_svd(A.float(), B.float(), 0.5, compute_dtype=torch.float32, gram=gram)
    check_spectrum(spec, dW, 16, tol)
    check_truncations(spec, dW, range(1, 17), 2.0, tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_upcast(dtype):
    gen = torch.Generator().manual_seed(3)
    A, B = torch.randn(12, 40, generator=gen).to(dtype), torch.randn(30, 12, generator=gen).to(dtype)
    dW = dense_update(A, B, 0.5)  # exact: the half-precision values widen to float64 without rounding
    for spec in (factored_svd(A, B, 0.5), randomized_factored_svd(A, B, 0.5, rank=4, oversample=8)):
        assert spec.S.dtype == spec.U.dtype == torch.float64
        check_spectrum(spec, dW, 12, TOL[torch.float64])
        check_truncations(spec, dW, [1, 4, 12], 0.25, TOL[torch.float64])
    spec32 = factored_svd(A, B, 0.5, compute_dtype=torch.float32)
    assert spec32.S.dtype == torch.float32
    check_spectrum(spec32, dW, 12, TOL[torch.float32])


def test_spectrum_energy_and_relative_error():
    gen = torch.Generator().manual_seed(4)
    A, B = _randn(gen, 6, 20), _randn(gen, 15, 6)
    dW = dense_update(A, B, 2.0)
    spec = factored_svd(A, B, 2.0)
    for k in range(1, 7):
        tail = dW - best_rank_k(dW, k)
        assert spec.relative_error(k) == pytest.approx(float(tail.norm() / dW.norm()), abs=1e-12)
        assert float(spec.energy[k - 1]) == pytest.approx(1 - float(tail.norm() ** 2 / dW.norm() ** 2), abs=1e-12)
    zero = factored_svd(A, torch.zeros_like(B), 1.0)
    assert torch.equal(zero.energy, torch.ones(6, dtype=torch.float64)) and zero.relative_error(1) == 0.0


def test_bad_arguments_are_refused():
    A, B = torch.randn(4, 10), torch.randn(8, 4)
    with pytest.raises(ValueError, match="disagree"):
        factored_svd(A, torch.randn(8, 5), 1.0)
    with pytest.raises(ValueError, match="disagree"):
        randomized_factored_svd(A[None], B, 1.0, rank=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        randomized_factored_svd(A, B, 1.0, rank=0)
    spec = factored_svd(A, B, 1.0)
    with pytest.raises(ValueError, match="rank 0 is below 1"):
        truncate(spec, 0, 1.0)
    for s in (0.0, -1.0):
        with pytest.raises(ValueError, match="positive"):
            truncate(spec, 2, s)


# --------------------------------------------------------------------------------------------------
# randomized route


@settings(max_examples=200, deadline=None, derandomize=True)
@given(case=lora_case(), data=st.data(), power_iters=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_rsvd_is_exact_when_the_sketch_covers_r(case, data, power_iters, seed):
    """With ``rank + oversample >= r`` the sketch spans the whole range: the exact answer."""
    A, B, scale = case
    r, d_in, d_out = A.shape[0], A.shape[1], B.shape[0]
    p = min(r, d_in, d_out)
    rank = data.draw(st.integers(1, p))
    oversample = data.draw(st.integers(max(0, r - rank), r - rank + 5))
    dW = dense_update(A, B, scale)
    # a sketch of every direction at once: as accurate as the exact route, power iterations and all
    tol = TOL[torch.float64] * kappa(A, B, scale)

    spec = randomized_factored_svd(A, B, scale, rank, oversample=oversample, power_iters=power_iters, seed=seed)

    check_spectrum(spec, dW, p, tol)
    check_truncations(spec, dW, sorted({1, rank, max(1, rank // 2)}), 10 ** data.draw(st.floats(-3, 3)), tol)
    exact = factored_svd(A, B, scale)
    for j in range(rank):
        if isolated(exact.S, j, 1e-2) and abs(float(exact.U[:, j].sum())) > 1e-3:  # same sign rule as the exact route
            assert float((spec.U[:, j] - exact.U[:, j]).abs().max()) <= 1e-7 * kappa(A, B, scale)


def decaying_case(r_min: int):
    cases = lora_case(kinds=("decay",), min_r=r_min, max_r=48)
    return cases.filter(lambda c: min(c[0].shape[1], c[1].shape[0]) >= r_min)


@pytest.mark.parametrize(("oversample", "power_iters", "bound"), [(10, 2, 1.02), (2, 1, 1.25)])
@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=decaying_case(13), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_rsvd_with_a_small_sketch_is_near_optimal(oversample, power_iters, bound, case, data, seed):
    A, B, scale = case
    r = A.shape[0]
    p = min(r, A.shape[1], B.shape[0])
    rank = data.draw(st.integers(1, p - oversample - 1))  # sketch l = rank + oversample < r
    dW = dense_update(A, B, scale)
    opt = float((dW - best_rank_k(dW, rank)).norm())

    spec = randomized_factored_svd(A, B, scale, rank, oversample=oversample, power_iters=power_iters, seed=seed)

    assert spec.S.shape == (rank + oversample,) and spec.U.shape == (B.shape[0], rank + oversample)
    A_k, B_k = truncate(spec, rank, 1.0)
    resid = float((dW - B_k @ A_k).norm())
    assert resid <= bound * opt + 1e-9 * float(dW.norm()), f"residual {resid / opt:.4f} x optimal"
    assert resid >= opt - 1e-12 * float(dW.norm())  # Eckart-Young: nothing beats the truncated SVD


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=decaying_case(16), seed=st.integers(0, 2**31 - 1))
def test_rsvd_is_deterministic_and_leaves_the_global_rng_alone(case, seed):
    A, B, scale = case
    rank = 3  # sketch 3 + 10 < r: the result depends on the random draw
    state = torch.get_rng_state()
    first = randomized_factored_svd(A, B, scale, rank, seed=seed)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was advanced"
    second = randomized_factored_svd(A, B, scale, rank, seed=seed)
    other = randomized_factored_svd(A, B, scale, rank, seed=seed + 1)
    for x, y in ((first.U, second.U), (first.S, second.S), (first.Vh, second.Vh)):
        assert torch.equal(x, y)
    assert not torch.equal(first.Vh, other.Vh), "the seed does not reach the sketch"
    assert torch.all(first.U.sum(0) >= -1e-12 * first.U.shape[0])  # sign rule


def test_rsvd_float32_compute():
    A, B = make_factors("decay", 50, 60, 24, 5, 0.5)
    dW = dense_update(A, B, 0.7)
    spec = randomized_factored_svd(A.float(), B.float(), 0.7, rank=24, oversample=0, compute_dtype=torch.float32)
    assert spec.S.dtype == torch.float32
    check_spectrum(spec, dW, 24, TOL[torch.float32] * kappa(A, B, 0.7))
    check_truncations(spec, dW, [1, 5, 12], 1.3, TOL[torch.float32] * kappa(A, B, 0.7))
