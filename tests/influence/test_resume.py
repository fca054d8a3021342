"""Crashes lose nothing: kill the audit (SIGKILL) at several points and rerun it; fail it on purpose; run it with
MLflow down and record it later with ``influence-audit sync``.

Every audit is the real CLI in a subprocess against one Prefect server on 127.0.0.1 (started here), with
MLflow in sqlite under the output directory. The uninterrupted reference run has its own output directory.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import polars as pl
import pytest
from reliability_support import (
    COUNTS,
    audit_args,
    audit_env,
    build_model,
    corpus,
    error_lines,
    file_states,
    free_port,
    mlflow_runs,
    queries,
    report_counts,
    run_cli,
    start_cli,
    tmp_leftovers,
    write_jsonl,
)
from safetensors.torch import load_file
from servers import prefect_server

pytestmark = pytest.mark.slow  # audits killed and resumed against a real Prefect server

BATCH = 1  # one document per pass: stages take long enough to be killed between files (results do not change)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    yield from prefect_server(tmp_path_factory.mktemp("prefect"))
    print(f"\nreliability counts after test_resume: {report_counts()}")


@pytest.fixture(scope="module")
def world(tmp_path_factory, api):
    root = tmp_path_factory.mktemp("resume")
    model = build_model(root / "model", seed=0, n_embd=64)
    train = write_jsonl(root / "train.jsonl", corpus(120, lo=8, hi=28))  # 3 shards of 40
    qs = write_jsonl(root / "queries.jsonl", queries(3))
    return {"root": root, "model": model, "train": train, "queries": qs, "env": audit_env(api, root)}


def _args(world, home: Path, *extra: str) -> list[str]:
    return audit_args(world["model"], world["train"], world["queries"], home, *extra, batch_size=BATCH)


@pytest.fixture(scope="module")
def reference(world):
    """The uninterrupted run."""
    home = world["root"] / "reference"
    t0 = time.monotonic()
    proc = run_cli(_args(world, home), env_=world["env"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (audit_dir,) = (home / "audits").iterdir()
    return {"home": home, "audit_dir": audit_dir, "seconds": time.monotonic() - t0}


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def _run_and_kill(world, home: Path, pattern: str, log: Path) -> tuple[bool, float]:
    """Start the audit; SIGKILL it as soon as a file matching ``pattern`` (under ``home``) exists. Returns
    whether it was killed (False: it finished first) and the seconds it ran."""
    proc = start_cli(_args(world, home), env_=world["env"], log=log)
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            if any(home.glob(pattern)):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return True, time.monotonic() - t0
            if time.monotonic() - t0 > 600:
                pytest.fail(f"audit still running after 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.01)
        return False, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


KILL_POINTS = [
    ("first covariance partial", "factors/*/partials/cov-*.safetensors"),
    ("first eigenvalue-correction partial", "factors/*/partials/lambda-*.safetensors"),
    ("first scored shard", "audits/*/scores/shard-*.parquet"),
    ("candidates.parquet", "audits/*/candidates.parquet"),
]


def test_kill_and_resume_reuses_finished_files_and_matches_the_uninterrupted_run(world, reference):
    from tasks.record.sync import sync_one

    home = world["root"] / "killed"
    logs = world["root"] / "logs"
    logs.mkdir()
    kept: dict[str, tuple[int, str]] = {}  # result files that existed at some kill: must never change
    killed_at = []
    for i, (what, pattern) in enumerate(KILL_POINTS):
        if any(home.glob(pattern)):  # the previous kill landed after this point already
            continue
        was_killed, seconds = _run_and_kill(world, home, pattern, logs / f"run-{i}.log")
        assert was_killed, f"the audit finished before {what} could be killed"
        COUNTS["faults injected"] += 1
        audit_dir = _one(home, "audits/*")
        manifest = json.loads((audit_dir / "manifest.json").read_text()) \
            if (audit_dir / "manifest.json").exists() else {}
        assert "status" not in manifest  # a killed audit never looks finished
        states = file_states(home)
        factors_done = any(home.glob("factors/*/factors.json"))
        kept |= {k: v for k, v in states.items() if factors_done or not k.endswith("/factors.safetensors")}
        killed_at.append((what, round(seconds, 1), sorted(Path(k).name for k in states)))
        runs = mlflow_runs(f"sqlite:///{home / 'mlflow.db'}", audit_dir.name)
        assert len(runs) == 1 and runs[0].info.status == "RUNNING", runs  # left open by the kill
        if i == 0:
            assert sync_one(audit_dir / "manifest.json").action == "unfinished"
    print("\nkilled at:", *(f"  {w} after {s} s: {files}" for w, s, files in killed_at), sep="\n")
    assert len(killed_at) >= 3, killed_at

    t0 = time.monotonic()
    proc = run_cli(_args(world, home), env_=world["env"])
    final_seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    audit_dir = _one(home, "audits/*")
    assert audit_dir.name == reference["audit_dir"].name

    now = file_states(home)
    changed = [k for k, v in kept.items() if now.get(k) != v]
    assert changed == [], f"recomputed or lost after a kill: {changed}"
    COUNTS["results compared"] += len(kept)

    got = pl.read_parquet(audit_dir / "candidates.parquet")
    want = pl.read_parquet(reference["audit_dir"] / "candidates.parquet")
    assert got.equals(want)
    for shard in sorted(reference["audit_dir"].glob("scores/shard-*.parquet")):
        assert pl.read_parquet(audit_dir / "scores" / shard.name).equals(pl.read_parquet(shard)), shard.name
    f_got = load_file(str(_one(home, "factors/*/factors.safetensors")))
    f_want = load_file(str(_one(reference["home"], "factors/*/factors.safetensors")))
    assert f_got.keys() == f_want.keys() and all((f_got[k] == f_want[k]).all() for k in f_got)
    COUNTS["results compared"] += 2 + len(list(audit_dir.glob("scores/shard-*.parquet")))

    runs = mlflow_runs(f"sqlite:///{home / 'mlflow.db'}", audit_dir.name)
    assert len(runs) == 1, "the rerun must reopen the killed run, not start another"
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["audit.status"] == "succeeded"
    manifest = json.loads((audit_dir / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["mlflow"] == "recorded"
    print(f"reference run {reference['seconds']:.0f} s; final rerun after the kills {final_seconds:.0f} s")


def test_failed_audit_is_marked_failed(world, reference):
    """NaN planted in the cached factors: the next audit of the same model and data fails in a later stage
    with a one-line error naming the layer; the manifest and the MLflow run say failed; no candidates."""
    home = reference["home"]
    path = _one(home, "factors/*/factors.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    COUNTS["faults injected"] += 1

    before = {p.name for p in (home / "audits").iterdir()}
    proc = run_cli(_args(world, home, "--top-k", "3"), env_=world["env"])
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    last = error_lines(proc)[-1]
    assert last.startswith("error:") and f"layer {key.rsplit('/', 1)[0]}" in last and "NaN" in last, last
    (new,) = {p.name for p in (home / "audits").iterdir()} - before
    manifest = json.loads((home / "audits" / new / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "NaN" in manifest["error"]
    assert not (home / "audits" / new / "candidates.parquet").exists()
    assert tmp_leftovers(home / "audits" / new) == []
    (run,) = mlflow_runs(f"sqlite:///{home / 'mlflow.db'}", new)
    assert run.info.status == "FAILED" and run.data.tags["audit.status"] == "failed"
    assert "NaN" in run.data.tags["audit.error"]


def test_mlflow_down_keeps_results_and_sync_records_them(world, reference):
    home = world["root"] / "mlflow-down"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = world["env"] | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc = run_cli(_args(world, home, "--tracking-uri", dead), env_=env)
    COUNTS["faults injected"] += 1
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    last = error_lines(proc)[-1]
    assert "results are on disk" in last and "influence-audit sync" in last, last
    audit_dir = _one(home, "audits/*")
    manifest = json.loads((audit_dir / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["mlflow"] == "pending" and manifest["mlflow_run_id"] is None
    assert pl.read_parquet(audit_dir / "candidates.parquet").equals(
        pl.read_parquet(reference["audit_dir"] / "candidates.parquet"))
    COUNTS["results compared"] += 1

    store = f"sqlite:///{home / 'mlflow.db'}"
    synced = run_cli(["sync", "--output-dir", str(home), "--tracking-uri", store], env_=env)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert f"{audit_dir.name}: recorded" in synced.stderr, synced.stderr
    (run,) = mlflow_runs(store, audit_dir.name)
    from mlflow import MlflowClient

    client = MlflowClient(store)
    assert run.info.status == "FINISHED" and run.data.tags["audit.status"] == "succeeded"
    assert run.data.tags["validation.status"] == "passed" and run.data.metrics["documents"] == 120
    assert "candidates.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    manifest = json.loads((audit_dir / "manifest.json").read_text())
    assert manifest["mlflow"] == "recorded" and manifest["mlflow_run_id"] == run.info.run_id

    from tasks.record.sync import sync_one

    again = sync_one(audit_dir / "manifest.json", tracking_uri=store)
    assert again.action == "up-to-date" and again.run_id == run.info.run_id


def test_sync_with_mlflow_still_down_is_one_line(world):
    """sync against a dead server: a one-line error, exit 2, nothing changed on disk."""
    home = world["root"] / "mlflow-down"
    manifest = _one(home, "audits/*/manifest.json")
    before = manifest.read_bytes()
    dead = f"http://127.0.0.1:{free_port()}"
    env = world["env"] | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc = run_cli(["sync", "--output-dir", str(home), "--tracking-uri", dead], env_=env)
    COUNTS["faults injected"] += 1
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "unreachable" in error_lines(proc)[-1]
    assert manifest.read_bytes() == before
