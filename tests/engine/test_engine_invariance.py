"""Scores must not depend on how the work is cut: batches, padding, shards, query rank, top-k streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fp64_engine, random_examples, tiny_gpt2, tiny_llama

from influence_engine import (
    CovariancePartial,
    FactorMismatchError,
    Factors,
    LambdaPartial,
    UserError,
    eigendecompose,
    merge,
)
from influence_engine.data import examples_fingerprint
from influence_engine.queries import PreparedQueries


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2(seed=2)
    docs = random_examples(11, lo=3, hi=12, seed=7)
    queries = random_examples(3, prefix="q", prompt=True, seed=8)
    return model, docs, queries


_engine = fp64_engine


def _scores(eng, docs, queries, strategy="ekfac", rank=0, fit_docs=None):
    factors = eng.fit_factors(fit_docs or docs, strategy)
    return eng.score(docs, eng.prepare_queries(queries, factors, rank=rank), top_k=0).all_scores


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_batch_size_padding_side_and_amount_leave_scores_unchanged(setup, strategy):
    model, docs, queries = setup
    ref = _scores(_engine(model, batch_size=1), docs, queries, strategy)
    for kw in ({"batch_size": 4}, {"batch_size": 5, "padding_side": "left"},
               {"batch_size": 11, "pad_to_multiple": 16},
               {"batch_size": 3, "padding_side": "left", "pad_to_multiple": 8}):
        np.testing.assert_allclose(_scores(_engine(model, **kw), docs, queries, strategy), ref, rtol=1e-9,
                                   atol=1e-12, err_msg=str(kw))


def test_llama_left_padding_matches_right_padding():
    model = tiny_llama(seed=1)
    docs = random_examples(6, lo=3, hi=10, seed=1)
    queries = random_examples(2, prefix="q", prompt=True, seed=2)
    right = _scores(_engine(model, batch_size=6), docs, queries)
    left = _scores(_engine(model, batch_size=4, padding_side="left"), docs, queries)
    np.testing.assert_allclose(left, right, rtol=1e-9, atol=1e-12)


def test_partial_factors_from_shards_sum_to_one_pass(setup, tmp_path):
    model, docs, queries = setup
    eng = _engine(model, batch_size=3)
    whole_cov = eng.fit_covariance(docs)
    shards = [docs[:4], docs[4:9], docs[9:]]
    parts = [eng.fit_covariance(s) for s in shards]
    for i, p in enumerate(parts):  # through the store, as the pipeline does
        p.save(tmp_path / f"cov{i}.safetensors")
    merged = merge(CovariancePartial.load(tmp_path / f"cov{i}.safetensors") for i in range(3))
    assert (merged.n_tokens, merged.n_docs) == (whole_cov.n_tokens, whole_cov.n_docs)
    for n in eng.specs:
        torch.testing.assert_close(merged.A[n], whole_cov.A[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.S[n], whole_cov.S[n], rtol=1e-12, atol=1e-12)
    basis = eigendecompose(merged)
    lam_parts = [eng.fit_lambda(s, basis) for s in shards]
    lam_parts[0].save(tmp_path / "lam0.safetensors")
    lam = merge([LambdaPartial.load(tmp_path / "lam0.safetensors"), *lam_parts[1:]])
    whole_lam = eng.fit_lambda(docs, basis)
    for n in eng.specs:
        torch.testing.assert_close(lam.sums[n], whole_lam.sums[n], rtol=1e-12, atol=1e-12)
    sharded = eng.finalize("ekfac", basis=basis, lambdas=lam)
    one = eng.fit_factors(docs, "ekfac")
    prepared = eng.prepare_queries(queries, sharded, rank=0)
    np.testing.assert_allclose(eng.score(docs, prepared, top_k=0).all_scores,
                               eng.score(docs, eng.prepare_queries(queries, one, rank=0), top_k=0).all_scores,
                               rtol=1e-9)


def test_factors_are_seeded(setup):
    model, docs, _ = setup
    a = _engine(model, seed=5).fit_covariance(docs)
    b = _engine(model, seed=5, batch_size=2).fit_covariance(docs)
    c = _engine(model, seed=6).fit_covariance(docs)
    name = next(iter(a.S))
    torch.testing.assert_close(a.S[name], b.S[name], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(a.S[name], c.S[name])


def test_query_rank_at_or_above_full_rank_is_exact(setup):
    model, docs, queries = setup
    eng = _engine(model, batch_size=4)
    factors = eng.fit_factors(docs, "ekfac")
    exact = eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=0).all_scores
    full_rank = max(min(s.out_features, s.a_dim) for s in eng.specs.values())
    for rank in (full_rank, full_rank + 3):
        prepared = eng.prepare_queries(queries, factors, rank=rank)
        np.testing.assert_allclose(eng.score(docs, prepared, top_k=0).all_scores, exact, rtol=1e-9, atol=1e-12)
    low = eng.score(docs, eng.prepare_queries(queries, factors, rank=2), top_k=0).all_scores
    assert not np.allclose(low, exact)  # a real compression


def test_factored_and_gradient_contractions_agree(setup):
    model, docs, queries = setup
    eng = _engine(model, batch_size=4)
    prepared = eng.prepare_queries(queries, eng.fit_factors(docs, "kfac"), rank=3)
    from influence_engine.scoring import ScoreAccumulator

    results = []
    for path in ("factored", "gradient"):
        acc = ScoreAccumulator(prepared, eng.device, torch.float64, 1.0, paths={n: path for n in eng.specs})
        collected = {}

        def end_batch(ctx, acc=acc, collected=collected):
            total = sum(acc.layer_scores.values())
            for i, d in enumerate(ctx.batch.ids):
                collected[d] = total[i].numpy().copy()

        acc.end_batch = end_batch
        eng.runner.run(docs, acc, eng._cfg("true"))
        results.append(np.stack([collected[d.id] for d in docs]))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-9, atol=1e-12)


def test_per_layer_and_per_token_scores_sum_to_the_total(setup):
    model, docs, queries = setup
    eng = _engine(model, batch_size=4, padding_side="left")
    prepared = eng.prepare_queries(queries, eng.fit_factors(docs, "ekfac"), rank=3)
    totals = eng.score(docs, prepared, top_k=0).all_scores
    for j, ex in enumerate(eng.explain(docs, prepared)):
        assert ex.token_ids == list(docs[j].input_ids)
        for q in range(len(queries)):
            per_layer = ex.per_layer(q)
            per_token = ex.per_token(q)
            assert set(per_layer) == set(eng.specs) and len(per_token) == len(docs[j].input_ids)
            assert sum(per_layer.values()) == pytest.approx(totals[q, j], rel=1e-9, abs=1e-12)
            assert per_token.sum() == pytest.approx(totals[q, j], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("k", [1, 4, 11, 30])
def test_streaming_top_k_equals_sorting_all_scores(setup, k):
    model, docs, queries = setup
    eng = _engine(model, batch_size=3)
    prepared = eng.prepare_queries(queries, eng.fit_factors(docs, "ekfac"), rank=0)
    result = eng.score(docs, prepared, top_k=k, return_all=True)
    rows = result.top_rows()
    for q, qid in enumerate(prepared.ids):
        mine = [r for r in rows if r["query_id"] == qid]
        order = np.argsort(-result.all_scores[q], kind="stable")[: min(k, len(docs))]
        assert [r["train_id"] for r in mine] == [docs[i].id for i in order]
        assert [r["rank"] for r in mine] == list(range(1, len(mine) + 1))


def test_self_influence_matches_preconditioned_gradient_norm(setup):
    model, docs, _ = setup
    eng = _engine(model, batch_size=4)
    factors = eng.fit_factors(docs, "ekfac")
    self_inf = eng.self_influence(docs, factors)
    # <G, P G> by scoring each document as its own query
    for d in docs[:3]:
        prepared = eng.prepare_queries([d], factors, rank=0)
        s = eng.score([d], prepared, top_k=0).all_scores[0, 0]
        assert self_inf[d.id] == pytest.approx(s, rel=1e-9)
        assert self_inf[d.id] > 0


def test_factor_store_round_trips_and_refuses_other_model_or_layers(setup, tmp_path):
    model, docs, queries = setup
    eng = _engine(model)
    factors = eng.fit_factors(docs, "ekfac")
    factors.save(tmp_path / "f")
    settings = factors.settings
    assert settings == eng.factor_settings("ekfac", "auto", data_fingerprint=examples_fingerprint(docs))
    loaded = Factors.load(tmp_path / "f", settings=settings, layers=list(eng.specs))
    a = eng.score(docs, eng.prepare_queries(queries, factors, rank=0), top_k=0).all_scores
    b = eng.score(docs, eng.prepare_queries(queries, loaded, rank=0), top_k=0).all_scores
    np.testing.assert_allclose(a, b, rtol=1e-12)
    with pytest.raises(FactorMismatchError, match="another model .*model_fingerprint"):
        Factors.load(tmp_path / "f", settings=settings.replace(model_fingerprint="0" * 64))
    with pytest.raises(FactorMismatchError, match="layers"):
        Factors.load(tmp_path / "f", layers=["transformer.h.0.mlp.c_fc"])
    with pytest.raises(FactorMismatchError, match="strategy='ekfac', not 'kfac'"):
        Factors.load(tmp_path / "f", settings=settings.replace(strategy="kfac"))
    # every field the factors depend on is checked, and named in the one-line error
    for field, value in (("damping", "0.001"), ("seed", 1), ("max_length", 64), ("precision", "fp32"),
                         ("fisher", "empirical"), ("on_long", "error"), ("layers", "all")):
        with pytest.raises(FactorMismatchError, match=f"made with {field}="):
            Factors.load(tmp_path / "f", settings=settings.replace(**{field: value}))
    with pytest.raises(FactorMismatchError, match="other training data: data_fingerprint"):
        Factors.load(tmp_path / "f", settings=settings.replace(data_fingerprint="x" * 64))
    assert Factors.load(tmp_path / "f", settings=settings.replace(damping="auto")).settings == settings
    other = _engine(tiny_gpt2(seed=9))
    with pytest.raises(FactorMismatchError):
        other.prepare_queries(queries, loaded)
    with pytest.raises(UserError, match="no factors.json"):
        Factors.load(tmp_path / "missing")
    prepared = eng.prepare_queries(queries, loaded, rank=2)
    prepared.save(tmp_path / "q.safetensors")
    again = PreparedQueries.load(tmp_path / "q.safetensors")
    np.testing.assert_allclose(eng.score(docs, prepared, top_k=0).all_scores,
                               eng.score(docs, again, top_k=0).all_scores, rtol=1e-12)


def test_layer_selection_presets_and_regex():
    model = tiny_gpt2()
    assert list(_engine(model, layers="mlp").specs) == [f"transformer.h.{i}.mlp.{n}" for i in range(2)
                                                        for n in ("c_fc", "c_proj")]
    assert all("attn" in n for n in _engine(model, layers="attention").specs)
    assert "lm_head" not in _engine(model, layers="all").specs
    assert list(_engine(model, layers=r"h\.1\.mlp\.c_fc").specs) == ["transformer.h.1.mlp.c_fc"]
    with pytest.raises(UserError, match="matches no"):
        _engine(model, layers="nothing_here")
    llama = tiny_llama()
    assert {n.rsplit(".", 1)[1] for n in _engine(llama).specs} == {"gate_proj", "up_proj", "down_proj"}
    assert all(not p.requires_grad for p in model.parameters())  # weight gradients are never computed
