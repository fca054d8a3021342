"""Counterfactual checks against exact references (float64): the SGD tail-patch is the identity score times the
learning rate, the PBRF response is the damped Gauss-Newton influence, and weights come back bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import autograd_gradients, fp64_engine, random_examples, tiny_gpt2
from test_engine_exact import _flat, _ggn

from influence_engine.verify import Verifier, VerifySettings, noise_threshold, verified


def _identity_scores(eng, docs, queries) -> np.ndarray:
    factors = eng.fit_factors(docs, "identity")
    return eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=0).all_scores


def test_sgd_tail_patch_over_lr_equals_the_identity_score():
    model = tiny_gpt2(seed=3)
    eng = fp64_engine(model)
    docs = random_examples(5, seed=4)
    queries = random_examples(3, prefix="q", prompt=True, seed=5)
    scores = _identity_scores(eng, docs, queries)  # (Q, N)
    lr = 1e-6
    v = Verifier(eng.model, tracked=eng.tracked,
                 settings=VerifySettings(optimizer="sgd", params="tracked", lr=lr))
    d = v.run(docs, queries)
    np.testing.assert_allclose(d.up / lr, scores.T, rtol=1e-3, atol=1e-6 * np.abs(scores).max())
    np.testing.assert_allclose(d.down / lr, -scores.T, rtol=1e-3, atol=1e-6 * np.abs(scores).max())
    assert d.settings["lr"] == lr and not d.settings["lr_chosen"]


@pytest.mark.parametrize("check,optimizer,params", [("tail-patch", "sgd", "all"), ("tail-patch", "adam", "all"),
                                                    ("tail-patch", "adam", "tracked"), ("pbrf", "sgd", "tracked")])
def test_weights_and_flags_are_restored_exactly(check, optimizer, params):
    model = tiny_gpt2(seed=1)
    eng = fp64_engine(model)  # freezes every parameter, eval mode
    before = {k: t.clone() for k, t in eng.model.state_dict().items()}
    docs = random_examples(3, seed=2)
    queries = random_examples(2, prefix="q", prompt=True, seed=3)
    v = Verifier(eng.model, tracked=eng.tracked,
                 settings=VerifySettings(check=check, optimizer=optimizer, params=params, pbrf_iters=5))
    d = v.run(docs, queries, train_sample=random_examples(6, seed=7))
    assert np.isfinite(d.up).all() and np.isfinite(d.down).all() and np.abs(d.up).max() > 0
    after = eng.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in eng.model.parameters())
    assert not eng.model.training
    # the engine still scores as before
    s1 = _identity_scores(eng, docs, queries)
    assert np.isfinite(s1).all()


def test_chosen_learning_rate_gives_the_relative_step():
    model = tiny_gpt2(seed=2)
    eng = fp64_engine(model)
    docs = random_examples(4, seed=1)
    queries = random_examples(2, prefix="q", prompt=True, seed=2)
    d = Verifier(eng.model, settings=VerifySettings(optimizer="sgd", relative_step=1e-4)).run(docs, queries)
    params = list(eng.model.parameters())
    norm = float(torch.sqrt(sum((p.double() ** 2).sum() for p in params)))
    sizes = []
    for e in docs:
        grads = autograd_gradients_all(eng.model, e)
        sizes.append(float(torch.sqrt(sum((g ** 2).sum() for g in grads))))
    assert d.settings["lr_chosen"]
    assert d.settings["lr"] == pytest.approx(1e-4 * norm / np.median(sizes), rel=1e-9)


def autograd_gradients_all(model, example):
    from influence_engine.data import collate

    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    b = collate([example])
    logits = model(input_ids=b.input_ids).logits
    sel = b.target_mask[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][sel], b.input_ids[:, 1:][sel], reduction="sum")
    grads = torch.autograd.grad(loss, params)
    for p in params:
        p.requires_grad_(False)
    return grads


def test_pbrf_response_is_the_damped_gauss_newton_influence():
    """For a small ε the PBRF optimum moves by -ε (G + λI)^-1 g_d, G the Bregman term's Gauss-Newton matrix, so
    the query's log-probability moves by ε g_q^T (G + λI)^-1 g_d."""
    model = tiny_gpt2(seed=1, vocab=11, n_embd=4, n_layer=1)
    eng = fp64_engine(model)
    names = list(eng.specs)
    sample = random_examples(6, vocab=11, lo=4, hi=7, seed=2)
    docs = random_examples(3, vocab=11, lo=4, hi=7, seed=8, prefix="x")
    queries = random_examples(2, vocab=11, prefix="q", prompt=True, seed=3)
    eps, lam = 1e-4, 0.05
    d = Verifier(eng.model, tracked=eng.tracked,
                 settings=VerifySettings(check="pbrf", params="tracked", epsilon=eps, damping=lam, pbrf_iters=200,
                                         sample_size=len(sample))).run(docs, queries, train_sample=sample)
    G = sum(_ggn(eng.model, names, e) for e in sample) / len(sample)
    inv = torch.linalg.inv(G + lam * torch.eye(G.shape[0], dtype=torch.float64))
    gq = torch.stack([_flat(autograd_gradients(eng.model, names, q)) for q in queries])
    gd = torch.stack([_flat(autograd_gradients(eng.model, names, e)) for e in docs])
    expected = eps * (gd @ inv @ gq.T).numpy()  # (D, Q)
    # the symmetric difference cancels the O(ε²) term (measured: 0.12% off at ε = 1e-4, 1.1% one-sided)
    np.testing.assert_allclose((d.up - d.down) / 2, expected, rtol=3e-3, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(d.up, expected, rtol=3e-2)
    np.testing.assert_allclose(d.down, -expected, rtol=3e-2)
    assert not np.allclose(d.up, -expected, rtol=1e-4)  # a real response, not the linear formula replayed


def test_verified_needs_the_predicted_sign_both_ways_above_the_noise():
    score = np.array([[1.0], [1.0], [-2.0], [1.0], [0.0]])
    up = np.array([[0.5], [0.5], [-0.5], [0.05], [0.5]])
    down = np.array([[-0.5], [0.2], [0.5], [-0.05], [-0.5]])
    thr = noise_threshold(np.array([[0.1], [-0.1]]), np.array([[0.1], [0.0]]))
    assert thr.tolist() == [0.1]
    assert verified(score, up, down, thr)[:, 0].tolist() == [True, False, True, False, False]


def test_bad_settings_are_refused_in_one_line():
    from influence_engine.errors import UserError

    with pytest.raises(UserError, match="--verify-check"):
        VerifySettings(check="retrain")
    with pytest.raises(UserError, match="--verify-lr"):
        VerifySettings(lr=-1.0)
