"""`influence-audit index build | query` on a tiny model in float64 with the sketch off: the index's scores are
`score --query-rank 0`'s exact scores, refinement reproduces its top-k, and a stale index is refused in one line."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from reliability_support import build_model, corpus, error_lines, queries, run_in_process, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("index-cli")
    model = build_model(root / "model", seed=0)
    train = write_jsonl(root / "train.jsonl", corpus(24))
    qs = write_jsonl(root / "queries.jsonl", queries(3))
    common = ["--device", "cpu", "--max-length", "32", "--precision", "fp64", "--batch-size", "5"]
    build = run_in_process(["index", "build", "--model", str(model), "--train", str(train), "--out",
                            str(root / "index"), "--sketch", "off", "--part-size", "10", "--gradient-cache-gb", "0",
                            *common])
    assert build.returncode == 0, build.stderr
    exact = run_in_process(["score", "--model", str(model), "--train", str(train), "--queries", str(qs), "--out",
                            str(root / "exact.parquet"), "--query-rank", "0", "--top-k", "5", *common])
    assert exact.returncode == 0, exact.stderr
    return root, model, train, qs


def _query(root: Path, qs: Path, name: str, *extra: str):
    return run_in_process(["index", "query", "--index", str(root / "index"), "--queries", str(qs), "--out",
                           str(root / f"{name}.parquet"), "--top-k", "5", "--device", "cpu", *extra])


@pytest.mark.parametrize("refine", ["0", "8"])
def test_unsketched_fp64_index_gives_the_exact_top_k(world, refine):
    root, _, _, qs = world
    proc = _query(root, qs, f"q{refine}", "--refine", refine)
    assert proc.returncode == 0, proc.stderr
    got = pl.read_parquet(root / f"q{refine}.parquet").sort("query_id", "rank")
    ref = pl.read_parquet(root / "exact.parquet").sort("query_id", "rank")
    assert got["train_id"].to_list() == ref["train_id"].to_list()
    assert got["score"].to_numpy() == pytest.approx(ref["score"].to_numpy(), rel=1e-10, abs=1e-12)
    assert got["index_score"].to_numpy() == pytest.approx(ref["score"].to_numpy(), rel=1e-10, abs=1e-12)
    assert got["refined"].to_list() == [refine != "0"] * got.height
    assert len(list((root / "index" / "parts").glob("*.ids.json"))) == 3  # 24 documents, 10 per part
    # the index's own recall, measured at build on 8 training documents as probes: exact without a sketch
    assert ("index recall on 8 probe queries (measured at build): recall@10 1.00; of the exact top 10, 1.00 within "
            "its top 100") in proc.stderr


def test_one_pass_build_writes_the_same_vectors(world):
    """Fitting with kept gradients (the default for small corpora) indexes from them, with no further pass."""
    import numpy as np

    from influence_engine.index import GradientIndex

    root, model, train, _ = world
    proc = run_in_process(["index", "build", "--model", str(model), "--train", str(train), "--out",
                           str(root / "one-pass"), "--sketch", "3x5", "--device", "cpu", "--max-length", "32",
                           "--precision", "fp64"])
    assert proc.returncode == 0, proc.stderr
    proc = run_in_process(["index", "build", "--model", str(model), "--train", str(train), "--out",
                           str(root / "passes"), "--sketch", "3x5", "--device", "cpu", "--max-length", "32",
                           "--precision", "fp64", "--gradient-cache-gb", "0", "--part-size", "7"])
    assert proc.returncode == 0, proc.stderr

    def rows(d: Path) -> dict[str, np.ndarray]:
        ix = GradientIndex.open(d)
        return {i: r for p in ix.parts() for i, r in zip(ix.ids(p.name), ix.rows(p.name), strict=True)}

    a, b = rows(root / "one-pass"), rows(root / "passes")
    assert sorted(a) == sorted(b) and len(a) == 24
    for i in a:  # factors from the one pass and from separate passes agree to rounding
        np.testing.assert_allclose(a[i], b[i], rtol=1e-7, atol=1e-9 * np.abs(b[i]).max())


def test_other_model_or_changed_data_is_refused_in_one_line(world, tmp_path):
    root, _, train, qs = world
    other = build_model(tmp_path / "other", seed=1)
    proc = _query(root, qs, "other", "--model", str(other))
    assert proc.returncode != 0 and len(error_lines(proc)) == 1
    assert "other weights than the index was built for" in proc.stderr
    write_jsonl(train, corpus(25))  # the corpus changed after the build
    proc = _query(root, qs, "changed", "--refine", "4")
    assert proc.returncode != 0 and len(error_lines(proc)) == 1
    assert "training data changed since the index was built" in proc.stderr
    write_jsonl(train, corpus(24))


def test_score_with_prefilter_scores_only_bm25_candidates(world):
    import polars as pl

    from tasks.influence.prefilter import bm25_candidates
    from tasks.inputs.sources import read_rows

    root, model, train, qs = world
    proc = run_in_process(["score", "--model", str(model), "--train", str(train), "--queries", str(qs), "--out",
                           str(root / "pre.parquet"), "--prefilter", "bm25:6", "--top-k", "4", "--device", "cpu",
                           "--max-length", "32", "--precision", "fp64", "--query-rank", "0"])
    assert proc.returncode == 0, proc.stderr
    assert "documents scored" in proc.stderr
    got = pl.read_parquet(root / "pre.parquet")
    cands = bm25_candidates(read_rows(train, "train"), read_rows(qs, "queries"), 6).by_query
    exact = pl.read_parquet(root / "exact.parquet")
    for q, ids in cands.items():
        mine = got.filter(pl.col("query_id") == q).sort("rank")
        assert set(mine["train_id"].to_list()) <= set(ids) and mine.height == 4
        both = mine.join(exact, on=["query_id", "train_id"])  # the same documents' scores as without a prefilter
        assert both["score"].to_numpy() == pytest.approx(both["score_right"].to_numpy(), rel=1e-10)
    bad = run_in_process(["score", "--model", str(model), "--train", str(train), "--queries", str(qs), "--out",
                          str(root / "bad.parquet"), "--prefilter", "bm25"])
    assert bad.returncode != 0 and len(error_lines(bad)) == 1 and "--prefilter" in bad.stderr
