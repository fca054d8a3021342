"""Score-weighted query compression (EK-FAC with the empirical Fisher): the rank-r fit is the best one for
``w_S R w_A`` (against a float64 SVD), the weights reproduce a Kronecker ``Λ`` exactly, and through the engine
the prepared factors equal that construction from the exact preconditioned queries; other settings keep the plain
best rank-r fit."""

from __future__ import annotations

import pytest
import torch
from helpers import fp64_engine, random_examples, tiny_gpt2

from influence_engine.queries import _compressed, low_rank, score_weights
from influence_engine.strategies import get_strategy


def _weighted_best(R, rank, w_s, w_a):
    u, s, vh = torch.linalg.svd(w_s[:, None] * R * w_a[None, :], full_matrices=False)
    return ((u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]) / w_s[:, None] / w_a[None, :]


def test_weights_reproduce_a_kronecker_eigenvalue_matrix():
    g = torch.Generator().manual_seed(0)
    r, c = torch.rand(7, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64)
    w_s, w_a = score_weights(r[:, None] * c[None, :])
    ratio = (w_s[:, None] ** 2 * w_a[None, :] ** 2) / (r[:, None] * c[None, :])
    # constant up to the 1e-12 floor
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0, 0])), rtol=1e-10, atol=0)


def test_weighted_fit_is_the_best_in_the_weighted_norm_and_beats_the_plain_fit_there():
    g = torch.Generator().manual_seed(1)
    lam = torch.rand(30, 1, generator=g, dtype=torch.float64) ** 4 * torch.rand(1, 20, generator=g,
                                                                                dtype=torch.float64) ** 4
    R = torch.randn(3, 30, 20, generator=g, dtype=torch.float64) / (lam + 1e-4)  # small damping: big where Λ is small
    t = {"Q_S": torch.eye(30, dtype=torch.float64), "Q_A": torch.eye(20, dtype=torch.float64)}
    w = score_weights(lam)
    lq = _compressed(R, 4, get_strategy("ekfac"), t, w)
    want = _weighted_best(R, 4, *w)
    torch.testing.assert_close(lq.dense(), want, rtol=0, atol=1e-9 * float(want.abs().max()))
    U, V = low_rank(R, 4)

    def err(P):
        return float((lam * (P - R) ** 2).sum())
    assert err(lq.dense()) < 0.5 * err(U @ V.mT)  # the error the scores feel


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_the_engine_compresses_by_the_weights_with_the_empirical_fisher_only(fisher):
    eng = fp64_engine(tiny_gpt2(seed=0, n_embd=16), fisher=fisher)
    docs = random_examples(12, seed=1)
    queries = random_examples(3, seed=2, prefix="q", lo=8, hi=12)
    factors = eng.fit_factors(docs, eng.factor_settings("ekfac", "auto:0.0001"))
    rank = 2
    exact = eng.prepare_queries(queries, factors, rank=0)
    low = eng.prepare_queries(queries, factors, rank=rank)
    assert low.meta["compression"] == ("score-weighted" if fisher == "empirical" else "plain")
    for name, lq in low.layers.items():
        t = {k: v.double() for k, v in factors.tensors[name].items()}
        R = t["Q_S"].T @ exact.layers[name].dense() @ t["Q_A"]
        if fisher == "empirical":
            best = _weighted_best(R, rank, *score_weights(t["eigen"]))
        else:
            u, s, vh = torch.linalg.svd(R, full_matrices=False)
            best = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
        want = t["Q_S"] @ best @ t["Q_A"].T
        torch.testing.assert_close(lq.dense(), want, rtol=0, atol=1e-8 * float(want.abs().max()))
