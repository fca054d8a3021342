"""The covariance Gram ``x^T x``: the blocked form (upper blocks only, mirrored) equals one GEMM."""

from __future__ import annotations

import pytest
import torch

from influence_engine import factors


@pytest.mark.parametrize("block", [None, 4, 5])
def test_blocked_gram_equals_one_gemm(monkeypatch, block):
    monkeypatch.setitem(factors.GRAM_MIN_BLOCK, "cpu", block)
    x = torch.randn(7, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(factors.gram(x), x.T @ x, rtol=1e-14, atol=1e-14)
