"""The verification stage and the LDS on a tiny word-level GPT-2 (no Prefect): columns, verdicts, metrics,
reuse, the GE warning, and the LDS maths against scipy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from scipy.stats import spearmanr
from transformers import GPT2Config, GPT2LMHeadModel

from influence_audit.demo.model import build_tokenizer
from influence_engine import InfluenceEngine, UserError
from influence_engine.evaluation import lds, paired_difference
from influence_engine.verify import VerifySettings
from tasks.influence.evaluate import read_matrix
from tasks.influence.verify import VERIFY_COLUMNS, verify_candidates

WORDS = "the cat dog sat ran on a mat log red blue big small fox hen".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    g = np.random.default_rng(0)
    train = pl.DataFrame({"id": [f"d{i:02d}" for i in range(16)],
                          "text": [" ".join(g.choice(WORDS, size=int(g.integers(4, 9)))) + "." for _ in range(16)]})
    queries = pl.DataFrame({"id": ["q0", "q1", "q2"], "prompt": ["the cat sat on", "a red fox", "the big dog"],
                            "completion": [" the mat.", " ran.", " sat on a log."]})
    tok = build_tokenizer(train["text"].to_list() + [p + c for p, c in queries.select("prompt", "completion").rows()])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    eng = InfluenceEngine(model, tok, layers="mlp", precision="fp64", batch_size=4, max_length=32, device="cpu")
    docs = eng.encode(train.to_dicts(), where="train")
    factors = eng.fit_factors(docs, "ekfac")
    prepared = eng.prepare_queries(eng.encode(queries.to_dicts(), where="queries"), factors, rank=0)
    result = eng.score(docs, prepared, top_k=4)
    cands = pl.DataFrame(result.top_rows())
    return eng, train, queries, prepared, cands, tmp_path_factory.mktemp("audit")


def test_verification_columns_verdicts_and_metrics(tiny):
    eng, train, queries, prepared, cands, d = tiny
    path = d / "candidates.parquet"
    cands.write_parquet(path)
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    summary = verify_candidates(eng, audit_dir=d, candidates_path=path, train=train, queries=queries,
                                prepared=prepared, k=3, settings=VerifySettings(optimizer="sgd", lr=1e-3))
    assert all(torch.equal(before[k], v) for k, v in eng.model.state_dict().items())
    out = pl.read_parquet(path)
    assert set(VERIFY_COLUMNS) <= set(out.columns) and out.height == cands.height
    assert out.filter(pl.col("rank") > 3)["verified"].null_count() == out.filter(pl.col("rank") > 3).height
    pairs = pl.read_parquet(d / "verification.parquet")
    assert pairs.filter(pl.col("kind") == "random").height == 3 * 3  # k random documents for every query
    # verdicts follow from the deltas, the scores' signs and the per-query noise thresholds
    thr = summary["noise_thresholds"]
    for r in pairs.iter_rows(named=True):
        s = np.sign(r["score"])
        want = s != 0 and s * r["counterfactual_delta"] > thr[r["query_id"]] and \
            -s * r["counterfactual_delta_down"] > thr[r["query_id"]]
        assert r["verified"] == want
    m = summary["metrics"]
    assert m["verified_at_10"] == pytest.approx(pairs.filter(pl.col("kind") == "candidate")["verified"].mean())
    assert m["verified_random_at_10"] == pytest.approx(pairs.filter(pl.col("kind") == "random")["verified"].mean())
    # at a small lr the step is first order: up- and down-weighting move every query in opposite directions
    assert (np.sign(pairs["counterfactual_delta"]) == -np.sign(pairs["counterfactual_delta_down"])).all()
    assert summary["settings"]["lr"] == 1e-3 and json.loads((d / "verification.json").read_text())["k"] == 3
    # a rerun with the same settings reuses the files
    again = verify_candidates(eng, audit_dir=d, candidates_path=path, train=train, queries=queries,
                              prepared=prepared, k=3, settings=VerifySettings(optimizer="sgd", lr=1e-3))
    assert again["metrics"] == summary["metrics"]


def test_verified_below_random_is_a_warning_not_a_failure():
    from tasks.influence.checks import validate_candidates

    c = pl.DataFrame({"query_id": ["q"] * 3, "train_id": ["a", "b", "c"], "score": [3.0, 2.0, 1.0],
                      "rank": [1, 2, 3], "verified": [True, False, False]})
    low = validate_candidates(c, train_ids=["a", "b", "c"], query_ids=["q"], k=3, verified_baseline=0.5)
    assert low.success and [w["check"] for w in low.warnings()] == ["verified_above_random"]
    assert low.result("verified_above_random")["severity"] == "warning" and "warning" in low.summary()
    high = validate_candidates(c, train_ids=["a", "b", "c"], query_ids=["q"], k=3, verified_baseline=0.2)
    assert high.success and not high.warnings() and high.result("verified_above_random")["success"]
    broken = validate_candidates(c.with_columns(pl.lit(float("nan")).alias("score")), train_ids=["a", "b", "c"],
                                 query_ids=["q"], k=3, verified_baseline=0.2)
    assert not broken.success  # critical checks still fail the suite


def test_lds_is_the_mean_spearman_of_predicted_and_measured_outputs():
    g = np.random.default_rng(3)
    S, N, Q = 40, 30, 6
    masks = g.random((S, N)) < 0.5
    scores = g.normal(size=(Q, N))
    outputs = masks @ scores.T + g.normal(scale=2.0, size=(S, Q))
    res = lds(scores, masks, outputs, n_boot=500)
    ref = [spearmanr(masks @ scores[q], outputs[:, q])[0] for q in range(Q)]
    np.testing.assert_allclose(res.per_query, ref, rtol=1e-12)
    assert res.mean == pytest.approx(np.mean(ref)) and res.ci_low <= res.mean <= res.ci_high
    assert lds(scores, masks, masks @ scores.T).mean == pytest.approx(1.0)
    assert lds(-scores, masks, masks @ scores.T).mean == pytest.approx(-1.0)
    m, lo, hi = paired_difference(res.per_query, res.per_query - 0.1)
    assert m == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    with pytest.raises(ValueError, match="expected"):
        lds(scores[:, :5], masks, outputs)


def test_retraining_files_in_every_documented_format(tmp_path: Path):
    arr = (np.arange(6).reshape(2, 3) % 2).astype(bool)
    torch.save(arr, tmp_path / "masks.pt")  # kronfluence's layout: a numpy array saved with torch.save
    torch.save(torch.tensor(arr, dtype=torch.float32), tmp_path / "t.pt")
    np.save(tmp_path / "m.npy", arr.astype(np.float32))
    np.savetxt(tmp_path / "m.csv", arr.astype(float), delimiter=",")
    for name in ("masks.pt", "t.pt", "m.npy", "m.csv"):
        np.testing.assert_array_equal(read_matrix(tmp_path / name, "--masks"), arr.astype(float))
    np.save(tmp_path / "v.npy", np.zeros(3))
    with pytest.raises(UserError, match="1-D array"):
        read_matrix(tmp_path / "v.npy", "--masks")
    with pytest.raises(UserError, match="no such file"):
        read_matrix(tmp_path / "missing.pt", "--masks")
    (tmp_path / "bad.pt").write_text("not a tensor")
    with pytest.raises(UserError, match="unreadable"):
        read_matrix(tmp_path / "bad.pt", "--outputs")
