"""The gradient index against the engine's exact scores (float64): with the sketch off an inner product of
stored vectors is the EK-FAC score; with a sketch it is an unbiased estimate of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import exact_scores, fp64_engine, random_examples, tiny_gpt2

from influence_engine import UserError
from influence_engine.errors import FactorMismatchError
from influence_engine.index import GradientIndex, Sketch, check_strategy, index_vectors, parse_sketch
from influence_engine.strategies import STRATEGIES, Strategy


@pytest.fixture(scope="module")
def setup():
    eng = fp64_engine(tiny_gpt2(seed=2), batch_size=3)
    docs = random_examples(11, seed=3)
    queries = random_examples(3, prefix="q", prompt=True, seed=4)
    return eng, docs, queries


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "identity"])
def test_unsketched_index_scores_equal_exact_scores(setup, strategy, tmp_path):
    eng, docs, queries = setup
    factors = eng.fit_factors(docs, strategy)
    index = GradientIndex.create(tmp_path / "ix", eng, factors, sketch=None, dtype="fp64")
    index.build_part("a", eng, docs[:5], factors)
    index.build_part("b", eng, docs[5:], factors)
    rows = np.concatenate([index.rows("a"), index.rows("b")])
    assert rows.dtype == np.float64
    q = index.query_vectors(eng, queries, factors)
    got = q.numpy() @ rows.T
    ref = exact_scores(eng, docs, queries, factors)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    scores, ids = index.search(q, top_k=4)
    order = np.argsort(-ref, axis=1)[:, :4]
    assert ids == [[docs[j].id for j in row] for row in order]
    np.testing.assert_allclose(scores, np.take_along_axis(ref, order, 1), rtol=1e-10)


def test_replayed_gradients_give_the_pass_vectors(setup):
    eng, docs, _ = setup
    factors, cache = eng.fit_factors(docs, "ekfac", cache=True)
    sk = Sketch.make(eng.specs, (3, 4), seed=1)
    live = index_vectors(eng, docs, factors, sk)
    replayed = index_vectors(eng, docs, factors, sk, cache=cache)
    torch.testing.assert_close(replayed, live, rtol=1e-10, atol=1e-12)


def test_sketched_scores_are_unbiased(setup):
    """Averaged over independent sketches the estimate converges to the exact score: the mean error is
    within 4 standard errors for every pair, and much smaller than a single sketch's error."""
    eng, docs, queries = setup
    factors = eng.fit_factors(docs, "ekfac")
    ref = exact_scores(eng, docs, queries, factors)
    ests = []
    for seed in range(100):
        sk = Sketch.make(eng.specs, (4, 4), seed=seed)
        ests.append(index_vectors(eng, queries, factors, sk).numpy()
                    @ index_vectors(eng, docs, factors, sk).numpy().T)
    ests = np.stack(ests)
    sem = ests.std(0) / np.sqrt(len(ests))
    assert np.all(np.abs(ests.mean(0) - ref) < 4 * sem + 1e-12)
    assert np.abs(ests.mean(0) - ref).mean() < 0.2 * np.abs(ests[0] - ref).mean()


def test_fp16_index_keeps_the_ranking(setup, tmp_path):
    eng, docs, queries = setup
    factors = eng.fit_factors(docs, "ekfac")
    index = GradientIndex.create(tmp_path / "ix", eng, factors, sketch=None, dtype="fp16")
    index.build_part("all", eng, docs, factors)
    assert index.rows("all").dtype == np.float16
    got = index.query_vectors(eng, queries, factors).float().numpy() @ index.rows("all").astype(np.float32).T
    ref = exact_scores(eng, docs, queries, factors)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3 * np.abs(ref).max())


def test_reopening_with_other_settings_is_refused_and_parts_resume(setup, tmp_path):
    eng, docs, _ = setup
    factors = eng.fit_factors(docs, "ekfac")
    index = GradientIndex.create(tmp_path / "ix", eng, factors, sketch=(2, 2), dtype="fp64")
    index.build_part("a", eng, docs, factors)
    mtime = (tmp_path / "ix" / "parts" / "a.npy").stat().st_mtime_ns
    again = GradientIndex.create(tmp_path / "ix", eng, factors, sketch=(2, 2), dtype="fp64")
    again.build_part("a", eng, docs, factors)  # exists: skipped
    assert (tmp_path / "ix" / "parts" / "a.npy").stat().st_mtime_ns == mtime
    with pytest.raises(FactorMismatchError, match="other sketch"):
        GradientIndex.create(tmp_path / "ix", eng, factors, sketch=(3, 2), dtype="fp64")
    other = eng.fit_factors(docs, "kfac")
    with pytest.raises(FactorMismatchError):
        GradientIndex.create(tmp_path / "ix", eng, other, sketch=(2, 2), dtype="fp64")


def test_sketch_flag_and_unsupported_strategies(monkeypatch):
    assert parse_sketch("16x8") == (16, 8) and parse_sketch("off") is None
    with pytest.raises(UserError, match="--sketch"):
        parse_sketch("16")
    monkeypatch.setitem(STRATEGIES, "lowrank", Strategy("lowrank", True, True, True, "eigen"))
    with pytest.raises(UserError, match="supports ekfac, kfac, diagonal, identity only"):
        check_strategy("lowrank")


def test_faiss_search_finds_the_exact_top_k_on_a_small_index(setup, tmp_path):
    pytest.importorskip("faiss")
    eng, docs, queries = setup
    factors = eng.fit_factors(docs, "ekfac")
    index = GradientIndex.create(tmp_path / "ix", eng, factors, sketch=(3, 3), dtype="fp32")
    index.build_part("all", eng, docs, factors)
    q = index.query_vectors(eng, queries, factors)
    exact_scores, exact_ids = index.search(q, top_k=3)
    scores, ids = index.search_faiss(q, top_k=3)
    assert ids == exact_ids
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
    assert list(tmp_path.glob("ix/faiss-hnsw-*.index"))  # kept for the next query
