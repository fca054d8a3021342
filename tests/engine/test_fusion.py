"""Fused activations: the same function as Hugging Face's Python-level tanh-GELU, and the same scores."""

from __future__ import annotations

import copy

import numpy as np
import torch
from helpers import random_examples, tiny_gpt2
from transformers.activations import NewGELUActivation

from influence_engine import InfluenceEngine
from influence_engine.fusion import TanhGELU, fuse_activations


def test_fused_gelu_equals_gelu_new_forward_and_backward():
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64, requires_grad=True)
    y_ref = NewGELUActivation()(x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    y = TanhGELU()(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)


def test_fusing_a_gpt2_keeps_its_logits_and_scores():
    model = tiny_gpt2(seed=5).double()
    plain = copy.deepcopy(model)
    assert fuse_activations(copy.deepcopy(model)) == 2  # one per block
    docs = random_examples(9, lo=3, hi=10, seed=3)
    queries = random_examples(2, prefix="q", prompt=True, seed=4)
    scores = []
    for m, fuse in ((model, True), (plain, False)):
        eng = InfluenceEngine(m, None, precision="fp64", batch_size=4, fuse=fuse)
        assert eng.fused == (2 if fuse else 0)
        factors = eng.fit_factors(docs, "ekfac")
        scores.append(eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=0).all_scores)
    assert any(isinstance(mod, TanhGELU) for mod in model.modules())
    assert not any(isinstance(mod, TanhGELU) for mod in plain.modules())
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-9, atol=1e-12)
