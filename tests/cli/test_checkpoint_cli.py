"""``score --checkpoint``: each document's score is the mean of its scores on the model and on every checkpoint
(float64, against separate runs, within the fp64 runner tolerance), top-k taken on the mean; each checkpoint's
factors stored under its own fingerprint; a checkpoint with another tokenizer is refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from reliability_support import build_model, corpus, queries, run_in_process, write_jsonl

from tasks.influence.candidates import RUNNER_TOLERANCE


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"a": build_model(root / "a", seed=0), "b": build_model(root / "b", seed=1),
            "c": build_model(root / "c", seed=2), "train": write_jsonl(root / "train.jsonl", corpus(9)),
            "queries": write_jsonl(root / "q.jsonl", queries(2)), "root": root}


def _score(world, name, model, *extra, top_k=0):
    out = world["root"] / f"{name}.parquet"
    proc = run_in_process(["score", "--model", str(world[model]), "--train", str(world["train"]), "--queries",
                           str(world["queries"]), "--out", str(out), "--precision", "fp64", "--top-k", str(top_k),
                           "--query-rank", "0", *extra])
    assert proc.returncode == 0, proc.stderr
    return pl.read_parquet(out), proc.stderr


def _matrix(df):
    wide = df.pivot(on="train_id", index="query_id", values="score").sort("query_id").drop("query_id")
    return wide.select(sorted(wide.columns)).to_numpy()


def test_scores_over_checkpoints_are_the_mean_of_each_models_scores(world):
    singles = [_matrix(_score(world, m, m)[0]) for m in ("a", "b", "c")]
    factors = world["root"] / "factors"
    both, err = _score(world, "abc", "a", "--checkpoint", str(world["b"]), "--checkpoint", str(world["c"]),
                       "--factors", str(factors))
    assert "averaged over 3 checkpoints" in err
    mean = sum(singles) / 3
    got = _matrix(both)
    # each model's factors are fitted twice (alone and in the averaged run): equal within the fp64 runner tolerance
    # of each query's largest |score| (a checkpoint missed or weighted wrongly moves scores by O(1) of it)
    limit = RUNNER_TOLERANCE["fp64"] * np.abs(mean).max(axis=1, keepdims=True)
    assert (np.abs(got - mean) <= limit).all(), np.abs(got - mean).max() / np.abs(mean).max()
    stored = sorted(p.parent.name for p in (factors / "checkpoints").glob("*/factors.json"))
    assert len(stored) == 2 and (factors / "factors.json").exists()
    fingerprints = {json.loads((factors / "checkpoints" / s / "factors.json").read_text())["settings"]
                    ["model_fingerprint"][:16] for s in stored}
    assert fingerprints == set(stored)
    top, _ = _score(world, "abc-top2", "a", "--checkpoint", str(world["b"]), "--checkpoint", str(world["c"]),
                    "--factors", str(factors), top_k=2)  # the stored factors are reused
    for q, rows in top.group_by("query_id"):
        full = both.filter(pl.col("query_id") == q[0]).sort("score", descending=True).head(2)
        assert rows.sort("rank")["train_id"].to_list() == full["train_id"].to_list()


def test_a_checkpoint_with_another_tokenizer_is_refused(world, tmp_path):
    other = tmp_path / "other-tok"
    shutil.copytree(world["b"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    words = [w for w in vocab if not w.startswith("<")][:2]
    vocab[words[0]], vocab[words[1]] = vocab[words[1]], vocab[words[0]]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "x.parquet"
    proc = run_in_process(["score", "--model", str(world["a"]), "--checkpoint", str(other), "--train",
                           str(world["train"]), "--queries", str(world["queries"]), "--out", str(out)])
    assert proc.returncode != 0 and not out.exists()
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "--checkpoint" in lines[-1] and "tokenizer" in lines[-1] and "Traceback" not in proc.stderr
