"""The BM25 prefilter: the flag, the candidates, and scores restricted to them equal the full scores there."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from helpers import fp64_engine, random_examples, tiny_gpt2

from influence_engine import UserError
from tasks.influence.prefilter import Candidates, bm25_candidates, score_candidates
from tasks.options import parse_prefilter


def test_flag():
    assert parse_prefilter("bm25:50") == 50 and parse_prefilter(None) is None
    for bad in ("bm25", "bm25:0", "tfidf:5"):
        with pytest.raises(UserError, match="--prefilter"):
            parse_prefilter(bad)


def test_bm25_finds_the_documents_that_share_the_query_words():
    train = pl.DataFrame({"id": ["a", "b", "c", "d"], "text": ["the capital of Batrind is Filend",
                                                            "cats sleep all day", "Filend has a river",
                                                            "dogs bark at night"]})
    queries = pl.DataFrame({"id": ["q"], "prompt": ["The capital of Batrind is"], "completion": [" Filend."]})
    cands = bm25_candidates(train, queries, 2)
    assert cands.by_query == {"q": ["a", "c"]}
    assert cands.fraction_scored == 0.5 and set(cands.seconds) == {"bm25_index_s", "bm25_query_s"}


def test_scores_among_candidates_equal_full_scores():
    eng = fp64_engine(tiny_gpt2(seed=1), batch_size=4)
    docs = random_examples(9, seed=2)
    queries = random_examples(2, prefix="q", prompt=True, seed=3)
    prepared = eng.prepare_queries(queries, eng.fit_factors(docs, "ekfac"), rank=0)
    full = eng.score(docs, prepared, top_k=0).all_scores
    cands = Candidates({"q0": ["d1", "d4", "d7"], "q1": ["d0", "d4"]}, len(docs))
    rows = score_candidates(eng, docs, prepared, cands, top_k=2)
    col = {e.id: j for j, e in enumerate(docs)}
    for q, qid in enumerate(prepared.ids):
        want = sorted(cands.by_query[qid], key=lambda d: -full[q, col[d]])[:2]
        got = [r for r in rows if r["query_id"] == qid]
        assert [r["train_id"] for r in got] == want and [r["rank"] for r in got] == [1, 2]
        np.testing.assert_allclose([r["score"] for r in got], [full[q, col[d]] for d in want], rtol=1e-12)
