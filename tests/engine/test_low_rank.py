"""Query compression: ``low_rank`` must give the best rank-r approximation (Eckart-Young), against a full SVD."""

from __future__ import annotations

import pytest
import torch

from influence_engine.queries import low_rank


def _matrix(q: int, m: int, n: int, decay: float, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(q, m, min(m, n), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(q, n, min(m, n), generator=g, dtype=torch.float64)).Q
    s = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return ((U * s) @ V.mT).to(dtype)


@pytest.mark.parametrize("shape", [(40, 200), (200, 40), (300, 257)])  # short side small (Gram path) or not
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_is_the_best_rank_r_approximation(shape, dtype):
    rank = 8
    P = _matrix(3, *shape, decay=0.8, dtype=dtype)
    U, V = low_rank(P, rank)
    assert U.shape == (3, shape[0], rank) and V.shape == (3, shape[1], rank) and U.dtype == dtype
    u, s, vh = torch.linalg.svd(P.double(), full_matrices=False)
    best = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close((U @ V.mT).double(), best, rtol=0, atol=tol * float(s.max()))
    torch.testing.assert_close(V.mT.double() @ V.double(), torch.eye(rank, dtype=torch.float64).expand(3, -1, -1),
                               rtol=0, atol=10 * tol)


def test_rank_deficient_matrix_falls_back_to_householder_and_stays_exact():
    """A sketch wider than the matrix's rank makes Cholesky QR fail (a singular Gram matrix): the compression
    starts again with Householder QR and still returns the best approximation (the matrix itself)."""
    g = torch.Generator().manual_seed(3)
    P = torch.randn(2, 300, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 2, 260, generator=g,
                                                                              dtype=torch.float64)
    U, V = low_rank(P, 8)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    torch.testing.assert_close(U @ V.mT, P, rtol=0, atol=1e-9 * float(P.abs().max()))


@pytest.mark.parametrize("decay", [0.997, 0.99, 0.9])  # rank 8 keeps ~7%, ~25%, ~95% of the energy
def test_default_iterations_reach_the_best_error_even_when_the_spectrum_is_flat(decay):
    """With a flat spectrum the best rank-r subspace is barely defined (the factors can sit far from a full SVD's),
    but the error ``|P - U V^T|`` is what scores feel: at the default power iterations it is within 1% of the
    best rank-r error (Eckart-Young) however slowly the singular values decay."""
    P = _matrix(2, 600, 300, decay=decay, dtype=torch.float32, seed=5)
    rank = 8
    U, V = low_rank(P, rank)
    s = torch.linalg.svdvals(P.double())
    best = (s[..., rank:] ** 2).sum(-1).sqrt()
    err = torch.linalg.matrix_norm(P.double() - (U @ V.mT).double())
    assert bool((err <= 1.01 * best).all()), (err / best).tolist()
