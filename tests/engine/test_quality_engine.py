"""The quality audit's engine signals against plain autograd in float64: self-influence per token position sums
to the document's, equals <G, (H + λI)^{-1} G> built from autograd gradients, and the loss is the model's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import autograd_gradients, fp64_engine, random_examples, tiny_gpt2, tiny_llama

from influence_engine.data import collate


def _model_loss(model, example) -> tuple[float, float]:
    """The mean next-token cross-entropy over the targets, in float64 by hand, and as the model's own ``loss``
    (Hugging Face computes it in float32)."""
    b = collate([example])
    labels = b.input_ids.masked_fill(~b.target_mask, -100)
    with torch.no_grad():
        out = model(input_ids=b.input_ids, labels=labels)
        sel = b.target_mask[:, 1:]
        exact = torch.nn.functional.cross_entropy(out.logits[:, :-1][sel], b.input_ids[:, 1:][sel])
    return float(exact), float(out.loss)


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "identity"])
def test_document_signals_equal_autograd_references(make_model, strategy):
    model = make_model()
    eng = fp64_engine(model, batch_size=3)  # batches of mixed lengths: padding must not leak
    docs = random_examples(7, seed=2) + random_examples(3, prefix="p", prompt=True, seed=3)
    factors = eng.fit_factors(docs, strategy)
    signals = eng.document_signals(docs, factors)
    names = list(eng.specs)
    assert [s.id for s in signals] == [d.id for d in docs]
    for d, s in zip(docs, signals, strict=True):
        grads = autograd_gradients(model, names, d)
        ref = sum(float((G * factors.precondition(n, G)).sum()) for n, G in grads.items())
        assert s.self_influence == pytest.approx(ref, rel=1e-9)
        assert s.token_self_influence.shape == (len(d.input_ids),)
        assert s.token_self_influence.sum() == pytest.approx(s.self_influence, rel=1e-10)
        exact, own = _model_loss(model, d)
        assert s.loss == pytest.approx(exact, rel=1e-12)
        assert s.loss == pytest.approx(own, rel=1e-6)
        assert s.n_targets == d.n_targets
        # the token losses: NaN for non-targets, and they average to the loss
        targets = np.arange(len(d.input_ids)) >= d.target_start
        assert np.isnan(s.token_loss[~targets]).all() and np.isfinite(s.token_loss[targets]).all()
        assert s.token_loss[targets].mean() == pytest.approx(s.loss, rel=1e-10)
    # the same numbers as the engine's own self-influence pass
    plain = eng.self_influence(docs, factors)
    for s in signals:
        assert s.self_influence == pytest.approx(plain[s.id], rel=1e-9)


def test_document_signals_do_not_depend_on_batching_or_padding_side():
    model = tiny_gpt2(seed=4)
    docs = random_examples(6, seed=5)
    a = fp64_engine(model, batch_size=1)
    factors = a.fit_factors(docs, "ekfac")
    one = a.document_signals(docs, factors)
    other = fp64_engine(model, batch_size=4, padding_side="left").document_signals(docs, factors)
    for x, y in zip(one, other, strict=True):
        np.testing.assert_allclose(x.token_self_influence, y.token_self_influence, rtol=1e-9, atol=1e-14)
        assert x.loss == pytest.approx(y.loss, rel=1e-12)
        np.testing.assert_allclose(x.token_loss, y.token_loss, rtol=1e-12)
    assert one[0].hot_spots(2) == list(np.argsort(-one[0].token_self_influence)[:2])


def test_mixture_of_experts_signals_add_up_over_positions():
    """Experts see only their routed tokens: placed at their positions, per-token self-influence still sums to the
    document's, which equals the (packed) self-influence pass."""
    from families import tiny_model

    model = tiny_model("mixtral")
    eng = fp64_engine(model, batch_size=3)
    docs = random_examples(5, seed=7)
    factors = eng.fit_factors(docs, "ekfac", damping=1e-3)
    plain = eng.self_influence(docs, factors)
    for d, s in zip(docs, eng.document_signals(docs, factors), strict=True):
        assert s.self_influence == pytest.approx(plain[d.id], rel=1e-9)
        assert s.token_self_influence.sum() == pytest.approx(s.self_influence, rel=1e-10)
        assert s.loss == pytest.approx(_model_loss(model, d)[0], rel=1e-12)


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_rotating_tokens_equals_preconditioning_the_document_gradient(make_model, strategy, monkeypatch):
    """The per-token rotation (rotate each token's vectors, scale, never rotate back) against the whole-gradient
    path (rotate G, scale, rotate back): the same self-influence per token position, at fp64."""
    from influence_engine.quality import DocumentSignalAccumulator

    model = make_model(seed=3)
    eng = fp64_engine(model, batch_size=4)
    docs = random_examples(6, seed=8) + random_examples(3, prefix="p", prompt=True, seed=9)
    factors = eng.fit_factors(docs, strategy)
    runs = {}
    for rotate in (True, False):
        monkeypatch.setattr(DocumentSignalAccumulator, "token_rotation", rotate)
        runs[rotate] = eng.document_signals(docs, factors)
    for x, y in zip(runs[True], runs[False], strict=True):
        assert x.self_influence == pytest.approx(y.self_influence, rel=1e-12)
        np.testing.assert_allclose(x.token_self_influence, y.token_self_influence, rtol=1e-10,
                                   atol=1e-12 * abs(y.self_influence))
        np.testing.assert_array_equal(x.token_loss, y.token_loss)
