"""``--threads N``: torch computes with N threads in the process that builds the engine; the scores equal those of
torch's default within the fp64 runner tolerance; the option is not part of what an audit computes (same
identity); 0 is refused naming the flag."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from reliability_support import build_model, corpus, queries, run_in_process, write_jsonl

from tasks.influence.candidates import RUNNER_TOLERANCE
from tasks.options import AuditParams


def _score(root, model, train, qs, name, *extra):
    out = root / f"{name}.parquet"
    proc = run_in_process(["score", "--model", str(model), "--train", str(train), "--queries", str(qs), "--out",
                           str(out), "--precision", "fp64", "--top-k", "0", *extra])
    return proc, out


def test_threads_sets_torchs_thread_count_and_changes_no_score(tmp_path):
    model = build_model(tmp_path / "m", seed=0)
    train, qs = write_jsonl(tmp_path / "t.jsonl", corpus(8)), write_jsonl(tmp_path / "q.jsonl", queries(2))
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        proc, one = _score(tmp_path, model, train, qs, "threads", "--threads", str(want))
        assert proc.returncode == 0, proc.stderr
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    proc, default = _score(tmp_path, model, train, qs, "default")
    assert proc.returncode == 0, proc.stderr
    a, b = (pl.read_parquet(p).sort("query_id", "train_id") for p in (one, default))
    assert a["train_id"].to_list() == b["train_id"].to_list()
    x, y = a["score"].to_numpy(), b["score"].to_numpy()
    assert np.abs(x - y).max() <= RUNNER_TOLERANCE["fp64"] * np.abs(y).max()


def test_threads_is_not_part_of_an_audits_identity():
    base = dict(model="m", train=["t.jsonl"], queries="q.jsonl")
    assert AuditParams(**base, threads=1).identity() == AuditParams(**base).identity()


def test_zero_threads_is_refused_naming_the_flag(tmp_path):
    proc, out = _score(tmp_path, tmp_path / "no-model", tmp_path / "t.jsonl", tmp_path / "q.jsonl", "x",
                       "--threads", "0")
    assert proc.returncode != 0 and not out.exists()
    assert "--threads" in proc.stderr and "Traceback" not in proc.stderr
