"""Every input form through the audit: the real CLI against a Prefect server (JSONL, a directory of Parquet parts,
a glob, a datasets directory, chat rows), and a 2-worker Dask run over a sharded directory. With the same shard
boundaries the candidates are identical to the JSONL audit's."""

from __future__ import annotations

import json

import polars as pl
import pytest
from reliability_support import (
    audit_args,
    audit_env,
    build_model,
    corpus,
    queries,
    run_cli,
    write_jsonl,
)
from servers import prefect_server

pytestmark = pytest.mark.slow  # whole audits through Prefect


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    yield from prefect_server(tmp_path_factory.mktemp("prefect"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("forms-flow")
    rows = corpus(120, lo=8, hi=20)
    df = pl.DataFrame(rows)
    (root / "parts").mkdir()
    for i in range(3):  # parts of 40 = the audit's shard size: the same shard boundaries as the JSONL file's
        df.slice(i * 40, 40).write_parquet(root / "parts" / f"part-{i}.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_polars(df)}).save_to_disk(str(root / "hf"))
    return {"root": root, "model": build_model(root / "model", seed=0, n_embd=16),
            "jsonl": write_jsonl(root / "train.jsonl", rows), "parts": root / "parts",
            "glob": root / "parts" / "part-*.parquet", "hf": root / "hf",
            "queries": write_jsonl(root / "q.jsonl", queries(3))}


def _audit(world, api, name, train, *extra):
    home = world["root"] / f"home-{name}"
    proc = run_cli(audit_args(world["model"], train, world["queries"], home, *extra),
                   env_=audit_env(api, world["root"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (adir,) = (home / "audits").iterdir()
    return adir


def test_every_form_through_the_audit_gives_the_same_candidates(world, api):
    ref = _audit(world, api, "jsonl", world["jsonl"])
    want = pl.read_parquet(ref / "candidates.parquet")
    assert want.height == 3 * 5
    for form in ("parts", "glob", "hf"):
        adir = _audit(world, api, form, world[form])
        got = pl.read_parquet(adir / "candidates.parquet")
        assert got.equals(want), form
        manifest = json.loads((adir / "shards.json").read_text())
        assert [s["n_docs"] for s in manifest["shards"]] == [40, 40, 40]
        assert not list(adir.glob("inputs/train-*")), "no copies of the training data"
        report = json.loads((adir / "validation" / "training_input.json").read_text())
        assert report["success"] and report["n_shards"] == 3


def test_chat_rows_through_the_audit(world, api, tmp_path):
    from test_chat import CHAT, _tokenizer

    model = build_model(tmp_path / "chat-model", seed=0, vocab_size=64)
    _tokenizer().save_pretrained(model)
    rows = [{"conversation": f"c{i}", "messages": [CHAT[0], {"role": "assistant", "content": c["text"]}]}
            for i, c in enumerate(corpus(30, lo=3, hi=6))]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    qs = write_jsonl(tmp_path / "chat-q.jsonl", [{"id": "q0", "messages": CHAT}])
    home = tmp_path / "home"
    proc = run_cli(audit_args(model, train, qs, home, "--id-field", "conversation", "--max-length", "48"),
                   env_=audit_env(api, tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (adir,) = (home / "audits").iterdir()
    cands = pl.read_parquet(adir / "candidates.parquet")
    assert cands.height == 5 and set(cands["train_id"]) <= {r["conversation"] for r in rows}
    assert cands["snippet"][0].startswith("user: the cat sat | assistant: ")


# fp64 only: the fp32 comparison of the same two runners is tests/influence/test_dask.py (the suite's time budget)
@pytest.mark.parametrize("precision", ["fp64"])
def test_two_dask_workers_over_a_sharded_directory_match_the_jsonl_audit(world, tmp_path, precision):
    from flows.runners import run_audit
    from tasks.influence.candidates import compare_candidates
    from tasks.options import AuditParams

    def params(train, home):
        return AuditParams(model=str(world["model"]), train=[str(train)], queries=str(world["queries"]), top_k=5,
                           query_rank=4, max_length=32, shard_size=40, batch_size=8, device="cpu",
                           precision=precision, output_dir=str(home))

    sequential = run_audit(params(world["jsonl"], tmp_path / "seq"))
    distributed = run_audit(params(world["parts"], tmp_path / "dask"), dask="local:2")
    a, b = pl.read_parquet(sequential["candidates"]), pl.read_parquet(distributed["candidates"])
    # in-process runs torch's default thread count, Dask's workers one thread each: the same candidates and
    # ranks, scores within the stated tolerance (never bitwise across thread counts)
    assert a.height == 15 and compare_candidates(a, b, precision) == []
    assert a.select("query_id", "train_id", "rank").equals(b.select("query_id", "train_id", "rank"))
    assert len(list((tmp_path / "dask" / "audits" / distributed["audit_id"] / "scores").glob("*.parquet"))) == 3
