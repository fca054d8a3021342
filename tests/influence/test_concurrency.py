"""Audits at the same time do not clobber each other: three CLI audits start together into one output
directory and one MLflow store (sqlite): two of the same model with different parameters (they share the factor
cache) and one of another model."""

from __future__ import annotations

import json
import time

import polars as pl
import pytest
from reliability_support import (
    COUNTS,
    audit_args,
    audit_env,
    build_model,
    corpus,
    mlflow_runs,
    queries,
    report_counts,
    start_cli,
    tmp_leftovers,
    write_jsonl,
)
from safetensors.torch import load_file
from servers import prefect_server

pytestmark = pytest.mark.slow  # three audits against a real Prefect server


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    yield from prefect_server(tmp_path_factory.mktemp("prefect"))
    print(f"\nreliability counts after test_concurrency: {report_counts()}")


def test_three_audits_at_once(tmp_path, api):
    m1 = build_model(tmp_path / "model-1", seed=0, n_embd=32)
    m2 = build_model(tmp_path / "model-2", seed=1, n_embd=32)
    train = write_jsonl(tmp_path / "train.jsonl", corpus(90, lo=6, hi=20))
    qs = write_jsonl(tmp_path / "queries.jsonl", queries(3))
    home = tmp_path / "home"
    env = audit_env(api, tmp_path)
    jobs = {"m1-top5": audit_args(m1, train, qs, home, shard_size=30),
            "m1-top7": audit_args(m1, train, qs, home, "--top-k", "7", shard_size=30),
            "m2-top5": audit_args(m2, train, qs, home, shard_size=30)}
    t0 = time.monotonic()
    procs = {name: start_cli(args, env_=env, log=tmp_path / f"{name}.log") for name, args in jobs.items()}
    for name, proc in procs.items():
        assert proc.wait(900) == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
    print(f"\nthree concurrent audits: {time.monotonic() - t0:.0f} s")
    COUNTS["faults injected"] += 1  # the race itself

    audits = {}
    for name in jobs:
        line = next(x for x in (tmp_path / f"{name}.log").read_text().splitlines() if " succeeded " in x)
        audits[name] = line.split()[1]
    assert len(set(audits.values())) == 3, audits
    assert {p.name for p in (home / "audits").iterdir()} == set(audits.values())
    for audit_id in audits.values():
        manifest = json.loads((home / "audits" / audit_id / "manifest.json").read_text())
        assert manifest["status"] == "succeeded" and manifest["mlflow"] == "recorded"

    factor_dirs = sorted((home / "factors").iterdir())
    assert len(factor_dirs) == 2  # one per model: the two m1 audits share theirs
    fingerprints = set()
    for d in factor_dirs:
        meta = json.loads((d / "factors.json").read_text())
        fingerprints.add(meta["settings"]["model_fingerprint"])
        assert load_file(str(d / "factors.safetensors"))
        assert len(list((d / "partials").glob("cov-*.safetensors"))) == 3
        assert len(list((d / "partials").glob("lambda-*.safetensors"))) == 3
    assert len(fingerprints) == 2
    assert tmp_leftovers(home / "factors") == [] and tmp_leftovers(home / "audits") == []

    top5 = pl.read_parquet(home / "audits" / audits["m1-top5"] / "candidates.parquet")
    top7 = pl.read_parquet(home / "audits" / audits["m1-top7"] / "candidates.parquet")
    assert top7.height == 7 * 3 and top5.height == 5 * 3
    assert top7.filter(pl.col("rank") <= 5).equals(top5)  # same factors, same scores
    other = pl.read_parquet(home / "audits" / audits["m2-top5"] / "candidates.parquet")
    assert not other.select("train_id", "score").equals(top5.select("train_id", "score"))
    COUNTS["results compared"] += 2

    store = f"sqlite:///{home / 'mlflow.db'}"
    run_ids = set()
    for audit_id in audits.values():
        (run,) = mlflow_runs(store, audit_id)
        assert run.info.status == "FINISHED" and run.data.tags["audit.status"] == "succeeded"
        run_ids.add(run.info.run_id)
    assert len(run_ids) == 3
