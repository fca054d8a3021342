"""A Dask worker killed mid-pass: Dask reruns its tasks on the other worker (or the restarted one), the audit
finishes with the sequential audit's result, and no partial is counted twice (partials are files named by their
shard, written atomically once; a rerun finds its file and returns it)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from safetensors import safe_open

from flows.runners import run_audit
from tasks.influence.candidates import compare_candidates
from tasks.options import AuditParams

pytestmark = pytest.mark.slow

N_DOCS, SHARD = 96, 24


def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()["meta"])


class KillFirstWriter(threading.Thread):
    """Watches the factor partials; when the first lands, kills (SIGKILL) the worker process that wrote it, which
    by then is fitting the next shard."""

    def __init__(self, home: Path):
        super().__init__(daemon=True)
        self.home, self.killed, self.partials_then = home, None, None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            found = [p for p in self.home.glob("factors/*/partials/*.safetensors")]
            if found:
                time.sleep(0.2)  # the writer has picked up its next shard
                pid = _meta(found[0])["pid"]
                self.partials_then = len(list(self.home.glob("factors/*/partials/*.safetensors")))
                os.kill(pid, signal.SIGKILL)
                self.killed = pid
                return
            time.sleep(0.05)


def test_a_worker_killed_mid_pass_changes_nothing(demo_model, demo_data, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join((demo_data / "corpus.jsonl").read_text().splitlines(keepends=True)[:N_DOCS]))

    def params(home):
        return AuditParams(model=str(demo_model), train=[str(train)], queries=str(demo_data / "queries.jsonl"),
                           n_queries=4, top_k=8, max_length=64, shard_size=SHARD, batch_size=8,
                           output_dir=str(home), explain_top=2, device="cpu")

    reference = run_audit(params(tmp_path / "seq"))
    killer = KillFirstWriter(tmp_path / "dask")
    killer.start()
    try:
        lost = run_audit(params(tmp_path / "dask"), dask="local:2")
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no worker was killed"
    assert killer.partials_then < 2 * (N_DOCS // SHARD), "the kill came after the fit"
    a, b = pl.read_parquet(reference["candidates"]), pl.read_parquet(lost["candidates"])
    assert a.height == 4 * 8
    assert a.select("query_id", "train_id", "rank").equals(b.select("query_id", "train_id", "rank"))
    assert compare_candidates(a, b, "fp32") == []
    (fdir,) = (tmp_path / "dask" / "factors").glob("*/")
    partials = sorted((fdir / "partials").glob("*.safetensors"))
    assert len(partials) == 2 * N_DOCS // SHARD  # one file per (pass, shard): nothing written twice
    assert len({_meta(p)["shard"] for p in partials}) == N_DOCS // SHARD
    counts = json.loads((fdir / "covariance-counts.json").read_text())
    assert counts["n_docs"] == N_DOCS  # each shard's covariance counted once
    assert json.loads((fdir / "factors.json").read_text())["lambda_docs"] == N_DOCS
    (ref_fdir,) = (tmp_path / "seq" / "factors").glob("*/")
    assert json.loads((ref_fdir / "covariance-counts.json").read_text()) == counts
