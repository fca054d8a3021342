"""Planted-culprit recovery: documents that alone state a queried fact should top that query's list."""

from __future__ import annotations

import json

import numpy as np
import pytest

from influence_engine import InfluenceEngine
from tasks.inputs.rows import rows_of
from tasks.inputs.sources import read_rows

pytestmark = pytest.mark.slow  # trains the demo model and audits it


@pytest.fixture(scope="module")
def figures(demo_model, demo_data):
    eng = InfluenceEngine.from_pretrained(demo_model, layers="mlp", max_length=128, batch_size=16)
    docs = eng.encode(rows_of(read_rows(demo_data / "corpus.jsonl", "train")))
    queries = eng.encode(rows_of(read_rows(demo_data / "queries.jsonl", "queries")), where="queries")
    planted = json.loads((demo_data / "planted.json").read_text())
    out = {}
    for strategy in ("identity", "ekfac"):
        factors = eng.fit_factors(docs, strategy)
        result = eng.score(docs, eng.prepare_queries(queries, factors, rank=32), top_k=len(docs))
        ranked = {}
        for r in result.top_rows():
            ranked.setdefault(r["query_id"], []).append(r["train_id"])
        hits = total = 0
        rr = []
        for qid, culprits in planted.items():
            total += len(culprits)
            hits += len(set(ranked[qid][:10]) & set(culprits))
            rr.append(1.0 / (1 + min(ranked[qid].index(c) for c in culprits)))
        out[strategy] = {"recall_at_10": hits / total, "mrr": float(np.mean(rr)),
                         "queries_with_a_culprit_in_top_10": float(np.mean(
                             [bool(set(ranked[q][:10]) & set(c)) for q, c in planted.items()]))}
    print("planted-culprit figures:", json.dumps(out))
    return out


def test_planted_documents_rank_in_the_top_10_for_most_queries(figures):
    assert figures["ekfac"]["queries_with_a_culprit_in_top_10"] >= 0.75, figures
    assert figures["ekfac"]["recall_at_10"] >= 0.6, figures


def test_ekfac_does_at_least_as_well_as_identity(figures):
    assert figures["ekfac"]["recall_at_10"] >= figures["identity"]["recall_at_10"], figures
    assert figures["ekfac"]["mrr"] >= figures["identity"]["mrr"] - 0.02, figures
