"""Influence over checkpoints: the combined scores are the weighted sum of each checkpoint's own scores (float64,
against plain-autograd gradient dot products on each checkpoint), each checkpoint has its own factor-cache key,
and the weights follow the stated rule."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import autograd_gradients, random_examples, tiny_llama

from influence_engine import CheckpointScores, InfluenceEngine, UserError, checkpoint_weights
from influence_engine.data import examples_fingerprint


def _flat(g):
    return np.concatenate([v.reshape(-1).numpy() for v in g.values()])


def test_combined_scores_are_the_weighted_sum_of_each_checkpoints_exact_scores():
    docs = random_examples(6, seed=1)
    queries = random_examples(2, prefix="q", prompt=True, seed=2)
    weights = checkpoint_weights(3, "lr", [0.5, 0.3, 0.2])
    combined = CheckpointScores(weights)
    exact = np.zeros((2, 6))
    keys = set()
    for seed, w in zip((0, 1, 2), weights, strict=True):
        model = tiny_llama(seed=seed)
        eng = InfluenceEngine(model, None, layers="mlp", precision="fp64", batch_size=4)
        factors = eng.fit_factors(docs, "identity")
        keys.add(eng.factor_settings("ekfac", data_fingerprint=examples_fingerprint(docs)).key())
        combined.add(eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=0))
        names = list(eng.specs)
        G = np.stack([_flat(autograd_gradients(model, names, d)) for d in docs])
        Q = np.stack([_flat(autograd_gradients(model, names, q)) for q in queries])
        exact += w * (Q @ G.T)
    assert len(keys) == 3  # one factor cache per checkpoint: the key holds the model fingerprint
    res = combined.result(top_k=4)
    np.testing.assert_allclose(res.all_scores, exact, rtol=1e-9, atol=1e-12 * np.abs(exact).max())
    order = np.argsort(-exact, axis=1)[:, :4]
    np.testing.assert_array_equal(res.top_index, order)
    np.testing.assert_allclose(res.top_scores, np.take_along_axis(exact, order, 1), rtol=1e-9)
    assert res.doc_ids == [d.id for d in docs] and res.query_ids == [q.id for q in queries]


def test_checkpoint_weights_and_misuse():
    assert checkpoint_weights(4) == [0.25] * 4
    assert checkpoint_weights(2, "lr", [3.0, 1.0]) == [0.75, 0.25]
    with pytest.raises(UserError, match="one learning-rate sum per checkpoint"):
        checkpoint_weights(2, "lr", [1.0])
    with pytest.raises(UserError, match="choose one of uniform, lr"):
        checkpoint_weights(2, "cosine")
    with pytest.raises(UserError, match="non-negative"):
        checkpoint_weights(2, "lr", [1.0, -1.0])
    docs = random_examples(3)
    queries = random_examples(1, prefix="q", prompt=True)
    eng = InfluenceEngine(tiny_llama(), None, layers="mlp", precision="fp64")
    prepared = eng.prepare_queries(queries, eng.fit_factors(docs, "identity"), rank=0)
    both = CheckpointScores([0.5, 0.5])
    with pytest.raises(UserError, match="keep every document"):
        both.add(eng.score(docs, prepared, top_k=2))
    both.add(eng.score(docs, prepared, top_k=0))
    with pytest.raises(UserError, match="other queries or documents"):
        both.add(eng.score(docs[::-1], prepared, top_k=0))
    with pytest.raises(UserError, match="1 of 2 checkpoints"):
        both.result()
