"""Relative damping ``auto:X`` (X times each layer's mean eigenvalue), in float64 against the explicitly inverted
damped EK-FAC matrix; one normal form per damping, and the factor-cache keys of the defaults unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import autograd_gradients, random_examples, tiny_llama

from influence_engine import FactorSettings, InfluenceEngine, UserError
from influence_engine.settings import damping_rule, normalise_damping


def _settings(**kw) -> FactorSettings:
    return FactorSettings(model_fingerprint="m" * 64, data_fingerprint="d" * 64, **kw)


def test_damping_normal_forms_and_default_keys():
    assert normalise_damping("auto:0.1") == "auto" == normalise_damping(None)
    assert normalise_damping("auto:1e-3") == normalise_damping("AUTO:0.001") == "auto:0.001"
    assert normalise_damping(1e-3) == normalise_damping("0.001") == "0.001"
    assert damping_rule("auto") == ("relative", 0.1)
    assert damping_rule("auto:0.001") == ("relative", 0.001)
    assert damping_rule("1e-4") == ("absolute", 1e-4)
    base = _settings()
    # the default's key is the one every existing factor cache was stored under
    assert _settings(damping="auto:0.1").key() == base.key() == _settings(damping="auto").key()
    assert _settings(damping="auto:1e-2").key() == _settings(damping="auto:0.01").key() != base.key()
    assert len({base.key(), _settings(damping="auto:0.01").key(), _settings(damping="0.01").key()}) == 3
    # factors stored with "auto" are the factors "auto:0.1" asks for; not those "auto:0.01" asks for
    _settings(damping="auto:0.1").check_matches(base.to_json(), "here")
    with pytest.raises(Exception, match="damping='auto', not 'auto:0.01'"):
        _settings(damping="auto:0.01").check_matches(base.to_json(), "here")


@pytest.mark.parametrize("bad", ["auto:", "auto:-1", "auto:0", "auto:x", "autox", "auto:nan", "auto:inf", "-1",
                                 "inf", "lots"])
def test_bad_damping_is_a_one_line_user_error(bad):
    with pytest.raises(UserError, match="--damping") as err:
        _settings(damping=bad)
    assert "\n" not in str(err.value)


def _fit(damping, fisher="empirical"):
    model = tiny_llama(seed=2)
    eng = InfluenceEngine(model, None, layers="mlp", precision="fp64", fisher=fisher, batch_size=3)
    docs = random_examples(9, seed=3)
    queries = random_examples(2, prefix="q", prompt=True, seed=4)
    factors = eng.fit_factors(docs, "ekfac", damping=damping)
    return model, eng, docs, queries, factors


@pytest.mark.parametrize("damping", ["auto:0.01", "auto:1.5", "auto", "0.003"])
def test_ekfac_scores_with_relative_damping_equal_the_explicit_damped_inverse(damping):
    model, eng, docs, queries, factors = _fit(damping)
    names = list(eng.specs)
    rule, value = damping_rule(damping)
    for n in names:
        eigen = factors.tensors[n]["eigen"]
        want = value * float(eigen.double().mean()) if rule == "relative" else value
        assert factors.damping[n] == pytest.approx(want, rel=1e-15)
    assert factors.settings.damping == normalise_damping(damping)
    scores = eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=0).all_scores
    grads = {e.id: autograd_gradients(model, names, e) for e in docs + queries}
    exact = np.zeros((len(queries), len(docs)))
    for n in names:
        t = factors.tensors[n]
        Q = torch.kron(t["Q_S"], t["Q_A"])
        H = Q @ torch.diag(t["eigen"].flatten()) @ Q.T
        inv = torch.linalg.inv(H + factors.damping[n] * torch.eye(H.shape[0], dtype=torch.float64))
        D = torch.stack([grads[d.id][n].reshape(-1) for d in docs])
        Gq = torch.stack([grads[q.id][n].reshape(-1) for q in queries])
        exact += (Gq @ inv @ D.T).numpy()
    np.testing.assert_allclose(scores, exact, rtol=1e-8, atol=1e-10 * np.abs(exact).max())


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_with_damping_equals_a_fit_with_that_damping(fisher):
    _, eng, docs, queries, auto = _fit("auto", fisher)
    for damping in ("auto:0.001", "1e-4"):
        *_, fitted = _fit(damping, fisher)
        redamped = auto.with_damping(damping)
        assert redamped.settings == fitted.settings
        assert redamped.damping == pytest.approx(fitted.damping, rel=1e-12)
        a = eng.score(docs, eng.prepare_queries(queries, redamped, rank=0), top_k=0).all_scores
        b = eng.score(docs, eng.prepare_queries(queries, fitted, rank=0), top_k=0).all_scores
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max())
    assert auto.damping == auto.with_damping("auto").damping  # the original is left alone
