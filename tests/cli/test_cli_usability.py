"""What a new user meets first: outputs checked before any work, help that shows every option whole, one name
for the home directory, audit inputs refused in seconds and once, unknown words reported."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from reliability_support import CLI, build_model, corpus, env, error_lines, queries, run_in_process, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("usability")
    return {"root": root, "model": build_model(root / "model"), "train": write_jsonl(root / "train.jsonl", corpus(6)),
            "queries": write_jsonl(root / "queries.jsonl", queries(2))}


def _score(world, out: Path, *extra: str, train: Path | None = None):
    return run_in_process(["score", "--model", str(world["model"]), "--train", str(train or world["train"]),
                           "--queries", str(world["queries"]), "--out", str(out), "--device", "cpu",
                           "--max-length", "32", *extra])


@pytest.mark.parametrize("where", ["existing-directory", "under-a-file"])
def test_score_refuses_an_unwritable_out_before_any_work(world, tmp_path, monkeypatch, where):
    import tasks.inputs.sources

    out = tmp_path / "scores.parquet"
    if where == "existing-directory":
        out.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "scores.parquet"

    def never(*args, **kwargs):
        raise AssertionError("the data was read before --out was checked")

    monkeypatch.setattr(tasks.inputs.sources, "read_rows", never)
    proc = _score(world, out)
    assert proc.returncode == 2, proc.stderr
    (line,) = error_lines(proc)
    assert line.startswith("error: --out") and str(out) in line and "Traceback" not in proc.stderr


def test_upper_case_parquet_suffix_is_accepted(world, tmp_path):
    out = tmp_path / "SCORES.PARQUET"
    proc = _score(world, out, "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    assert pl.read_parquet(out).height == 2 * 2


def test_unknown_words_are_counted_and_reported(world, tmp_path):
    train = write_jsonl(tmp_path / "unknown.jsonl", [{"id": "a", "text": "the cat zyxxq qqqzx"},
                                                      {"id": "b", "text": "the dog sat"}])
    proc = _score(world, tmp_path / "x.parquet", train=train)
    assert proc.returncode == 0, proc.stderr
    assert "warning: 2 of 7 training tokens (28.6%) are the tokenizer's unknown token '<unk>'" in proc.stderr


def test_help_shows_markup_and_whole_option_names_at_80_columns():
    proc = subprocess.run([CLI, "audit", "--help"], capture_output=True, text=True, env=env(COLUMNS="80"),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "JSON {query_id: [train ids]}" in " ".join(proc.stdout.split())
    for option in ("--planted", "--dask-cluster-class", "--tracking-uri", "--explain-top"):
        assert f"  {option} " in proc.stdout, option
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80


def test_review_takes_output_dir_like_audit_and_sync(tmp_path):
    for flag in ("--output-dir", "--home"):
        proc = run_in_process(["review", "list", flag, str(tmp_path / "home")])
        assert proc.returncode == 0, proc.stderr
        assert f"no audits in {tmp_path / 'home' / 'audits'}" in proc.stderr


def test_audit_refuses_bad_input_in_seconds_once_before_prefect_starts(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "the cat"}\n{"id": "b", "body": "the dog"}\n', encoding="utf-8")
    missing_col = write_jsonl(tmp_path / "nocol.jsonl", [{"id": "a", "body": "the cat"}])
    for train, expect in ((bad, f"{bad}:2: text is missing or null"),
                          (missing_col, f"{missing_col}: missing column(s) 'text'")):
        t0 = time.perf_counter()
        proc = subprocess.run([CLI, "audit", "--model", str(world["model"]), "--train", str(train), "--queries",
                               str(world["queries"]), "--output-dir", str(tmp_path / "home")], capture_output=True,
                              text=True, env=env(PREFECT_API_URL=""), timeout=300, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        assert proc.returncode == 2, proc.stderr
        (line,) = error_lines(proc)
        assert line.startswith(f"error: {expect}") and "Traceback" not in proc.stderr, proc.stderr
        assert seconds < 30, seconds  # Prefect's temporary server alone takes 11-20 s to start
        assert not (tmp_path / "home" / "audits").exists()


def test_demo_and_audit_record_absolute_paths(world, tmp_path):
    """Relative paths on the command line become absolute in the parameters (and so in the manifest)."""
    from influence_audit.cli_influence import audit_params

    params = audit_params({"model": os.path.relpath(world["model"]), "train": [os.path.relpath(world["train"])],
                           "queries": os.path.relpath(world["queries"])})
    assert params.train == [str(world["train"])] and Path(params.model).is_absolute()


def test_the_cli_also_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "influence_audit.cli", "--help"], capture_output=True, text=True,
                          env=env(), timeout=120)
    assert proc.returncode == 0 and "score" in proc.stdout and "plan" in proc.stdout, proc.stderr[-2000:]
