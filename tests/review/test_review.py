"""The human review loop against a real audit: real Prefect server (pause/resume), real MLflow (sqlite).

One audit is built per module by running the ``influence_audit`` flow on a tiny untrained GPT-2 and the
demo corpus, against a ``prefect server`` started on a free 127.0.0.1 port (pausing needs a shared server).
Tests append decisions to the same audit, so each compares before/after snapshots, never absolute counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from servers import prefect_server

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "influence_audit" / "demo" / "data"
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
             "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "PREFECT_LOGGING_LEVEL": "WARNING"}

pytestmark = pytest.mark.slow


@dataclass
class Audit:
    home: Path
    audit_id: str
    run_id: str
    api_url: str
    candidates: pl.DataFrame

    @property
    def audit_dir(self) -> Path:
        return self.home / "audits" / self.audit_id

    @property
    def flagged(self) -> Path:
        return self.home / "flagged_documents.parquet"

    @property
    def decisions(self) -> Path:
        return self.audit_dir / "review" / "decisions.parquet"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
        return env | QUIET_ENV | {"PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home / "prefect-client"),
                                  "INFLUENCE_AUDIT_HOME": str(self.home)}


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT, then SIGKILL (a Prefect process whose server is gone may ignore SIGTERM)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _tiny_model(out: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (DEMO / "corpus.jsonl").read_text().splitlines() if line.strip()]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    import torch

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=len(t), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    m.save_pretrained(out)
    t.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    yield from prefect_server(tmp_path_factory.mktemp("prefect-server"))


@pytest.fixture(scope="module")
def audit(prefect_api, tmp_path_factory) -> Audit:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("review")
    home = root / "home"
    model = _tiny_model(root / "model")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("PREFECT_LOGGING_LEVEL", "WARNING")
        for k, v in QUIET_ENV.items():
            mp.setenv(k, v)
        with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
            from flows.audit import influence_audit
            from tasks.options import AuditParams

            params = AuditParams(model=str(model), train=[str(DEMO / "corpus.jsonl")],
                                 queries=str(DEMO / "queries.jsonl"), n_queries=4, top_k=5, max_length=64,
                                 shard_size=150, output_dir=str(home), device="cpu")
            result = influence_audit(params)
            cands = pl.read_parquet(result["candidates"])
            yield Audit(home, result["audit_id"], result["run_id"], prefect_api, cands)
            _drain_prefect_workers()  # send queued logs/events while the server is still up


def _drain_prefect_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=10)


def _tags(a: Audit) -> dict[str, str]:
    from mlflow import MlflowClient

    from tasks.record.tracker import configure_tracking

    configure_tracking(None, a.home)
    return {k: v for k, v in MlflowClient().get_run(a.run_id).data.tags.items() if k.startswith("review.")}


def _mlflow_table(a: Audit) -> dict[str, Any]:
    from mlflow import MlflowClient

    from tasks.record.tracker import configure_tracking

    configure_tracking(None, a.home)
    client = MlflowClient()
    assert "review_decisions.json" in {f.path for f in client.list_artifacts(a.run_id)}
    path = client.download_artifacts(a.run_id, "review_decisions.json", str(a.home / f"dl-{uuid.uuid4().hex}"))
    return json.loads(Path(path).read_text())


def _digest(p: Path) -> str | None:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None


def _snapshot(a: Audit) -> tuple:
    return _digest(a.flagged), _digest(a.decisions), _tags(a)


def _rows(p: Path) -> int:
    return pl.read_parquet(p).height if p.exists() else 0


def _pair(a: Audit, i: int) -> tuple[str, str]:
    r = a.candidates.sort(["query_id", "rank"]).row(i, named=True)
    return r["query_id"], r["train_id"]


def _corpus_hash(train_id: str) -> str:
    for line in (DEMO / "corpus.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["id"] == train_id:
            return hashlib.sha256(row["text"].encode()).hexdigest()
    raise KeyError(train_id)


def _check_mlflow_matches_disk(a: Audit) -> None:
    from tasks.review.decisions import latest_verdicts

    disk = pl.read_parquet(a.decisions)
    table = _mlflow_table(a)
    assert table["columns"][:3] == ["train_id", "content_hash", "audit_id"]
    assert len(table["data"]) == disk.height  # replaced, not appended to
    tags = _tags(a)
    latest = latest_verdicts(disk)
    assert tags["review.decisions"] == str(disk.height)
    assert tags["review.culprit"] == str((latest["verdict"] == "culprit").sum())
    assert tags["review.not_culprit"] == str((latest["verdict"] == "not-culprit").sum())
    assert tags["review.unsure"] == str((latest["verdict"] == "unsure").sum())
    assert tags["review.reviewers"] == ",".join(sorted(set(disk["reviewer"])))
    all_pairs = a.candidates.select("query_id", "train_id").unique().height
    assert tags["review.status"] == ("done" if latest.height == all_pairs else "in-progress")


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from influence_audit.cli import app

    return CliRunner().invoke(app, args, catch_exceptions=True)


def _main(args: list[str], capsys) -> tuple[int, str]:
    """Run the real entry point in-process: returns (exit code, stderr)."""
    from influence_audit.cli import main

    old = sys.argv
    sys.argv = ["influence-audit", *args]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    return int(exc.value.code or 0), capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ tests


def test_list_and_show(audit: Audit) -> None:
    res = _cli(["review", "list", "--home", str(audit.home)])
    assert res.exit_code == 0, res.output
    from tasks.review.decisions import list_audits

    rows = list_audits(audit.home)
    assert [r["audit_id"] for r in rows] == [audit.audit_id]
    assert rows[0]["mlflow_run_id"] == audit.run_id and rows[0]["status"] == "succeeded"
    assert rows[0]["n_queries"] == 4 and rows[0]["n_candidates"] == 20
    assert rows[0]["review_status"] in ("open", "in-progress", "done")
    res = _cli(["review", "show", audit.audit_id, "--home", str(audit.home)])
    assert res.exit_code == 0, res.output
    for qid in audit.candidates["query_id"].unique():
        assert qid in res.output


def test_submit_valid_cli(audit: Audit) -> None:
    (q1, t1), (q2, t2) = _pair(audit, 0), _pair(audit, 1)
    before_flagged, before_dec = _rows(audit.flagged), _rows(audit.decisions)
    res = _cli(["review", "submit", audit.audit_id, "--home", str(audit.home), "--reviewer", "ann",
                "--decision", f"{q1}:{t1}:culprit:planted fact: see doc", "--decision", f"{q2}:{t2}:not-culprit"])
    assert res.exit_code == 0, res.output
    flagged = pl.read_parquet(audit.flagged)
    assert flagged.height == before_flagged + 2 and _rows(audit.decisions) == before_dec + 2
    new = flagged.tail(2)
    assert new.columns == ["train_id", "content_hash", "audit_id", "query_id", "verdict", "reviewer", "comment",
                           "decided_at"]
    assert str(new.schema["decided_at"]) == "Datetime(time_unit='us', time_zone='UTC')"
    assert new.row(0, named=True) | {"decided_at": None} == {
        "train_id": t1, "content_hash": _corpus_hash(t1), "audit_id": audit.audit_id, "query_id": q1,
        "verdict": "culprit", "reviewer": "ann", "comment": "planted fact: see doc", "decided_at": None}
    _check_mlflow_matches_disk(audit)
    assert _tags(audit)["review.status"] == "in-progress"

    # a second reviewer changes one verdict (from a JSONL file): latest verdict per pair counts
    f = audit.home / "bob.jsonl"
    f.write_text(json.dumps({"query_id": q1, "train_id": t1, "verdict": "unsure", "comment": "not sure"}) + "\n\n")
    res = _cli(["review", "submit", audit.audit_id, "--home", str(audit.home), "--reviewer", "bob", "--file", str(f)])
    assert res.exit_code == 0, res.output
    _check_mlflow_matches_disk(audit)
    assert {"ann", "bob"} <= set(_tags(audit)["review.reviewers"].split(","))

    # load_table (the UI's view of tables) reads the replaced table whole
    import mlflow

    exp = mlflow.get_run(audit.run_id).info.experiment_id
    table = mlflow.MlflowClient().load_table(exp, "review_decisions.json", run_ids=[audit.run_id])
    assert len(table) == _rows(audit.decisions)


def test_invalid_input_changes_nothing(audit: Audit, capsys) -> None:
    q, t = _pair(audit, 2)
    home = ["--home", str(audit.home)]
    _cli(["review", "submit", audit.audit_id, *home, "--reviewer", "seed", "--decision", f"{q}:{t}:unsure"])
    before = _snapshot(audit)
    cases = {
        "verdict must be one of culprit, not-culprit, unsure": ["--reviewer", "ann", "--decision", f"{q}:{t}:guilty"],
        "not candidates of this audit: nope:doc-x": ["--reviewer", "ann", "--decision", f"{q}:{t}:culprit",
                                                     "--decision", "nope:doc-x:culprit"],
        "reviewer name is required": ["--reviewer", "  ", "--decision", f"{q}:{t}:culprit"],
        "decided twice": ["--reviewer", "ann", "--decision", f"{q}:{t}:culprit", "--decision", f"{q}:{t}:unsure"],
        "expected QUERY_ID:TRAIN_ID:VERDICT": ["--reviewer", "ann", "--decision", f"{q}-{t}"],
    }
    for expected, args in cases.items():
        code, err = _main(["review", "submit", audit.audit_id, *home, *args], capsys)
        assert code != 0, expected
        assert expected in err and err.strip().startswith("error:") and "Traceback" not in err, err
        assert _snapshot(audit) == before, expected
    code, err = _main(["review", "show", "no-such-audit", *home], capsys)
    assert code != 0 and f"known: {audit.audit_id}" in err

    # the installed script too: one line on stderr, no traceback, non-zero exit
    proc = subprocess.run(["influence-audit", "review", "submit", audit.audit_id, *home, "--reviewer", "ann",
                           "--decision", "q-unknown:doc-00001:culprit"], env=audit.env(), capture_output=True,
                          text=True, timeout=300, cwd=audit.home)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "q-unknown:doc-00001" in lines[0], proc.stderr
    assert _snapshot(audit) == before


def test_concurrent_submits_lose_no_rows(audit: Audit) -> None:
    from tasks.review.decisions import submit_review

    before_flagged, before_dec = _rows(audit.flagged), _rows(audit.decisions)
    n_threads, per = 4, 3
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def reviewer(i: int) -> None:
        try:
            decisions = [{"query_id": q, "train_id": t, "verdict": "not-culprit", "comment": f"r{i}"}
                         for q, t in (_pair(audit, (i * per + j) % 20) for j in range(per))]
            barrier.wait()
            submit_review(audit.home, audit.audit_id, f"reviewer-{i}", decisions)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reviewer, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors
    assert _rows(audit.flagged) == before_flagged + n_threads * per
    assert _rows(audit.decisions) == before_dec + n_threads * per
    got = pl.read_parquet(audit.decisions).tail(n_threads * per)
    assert sorted(set(got["reviewer"])) == [f"reviewer-{i}" for i in range(n_threads)]
    _check_mlflow_matches_disk(audit)


def _flow_run(a: Audit, name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return runs[0] if runs else None


def _wait_paused(a: Audit, name: str, proc: subprocess.Popen, *, not_state: Any = None, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _flow_run(a, name)
        if run and run.state and run.state.is_paused() and run.state.id != not_state:
            return run
        if proc.poll() is not None:
            raise AssertionError(f"review flow exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"review flow never paused; last state {run.state if run else None}")


def test_review_flow_pause_resume(audit: Audit) -> None:
    from prefect.artifacts import Artifact
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.review.decisions import artifact_key

    name = f"review-test-{uuid.uuid4().hex[:8]}"
    code = ("import json, sys; from flows.review import review_audit; "
            f"r = review_audit.with_options(flow_run_name={name!r})({audit.audit_id!r}, home={str(audit.home)!r}, "
            "timeout_s=600, poll_interval_s=1); print('RESULT', json.dumps(r))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=audit.env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        with temporary_settings(updates={PREFECT_API_URL: audit.api_url}):
            run = _wait_paused(audit, name, proc)
            art = Artifact.get(artifact_key(audit.audit_id))
            assert art is not None and audit.candidates["train_id"][0] in str(art.data)
            q, t = _pair(audit, 5)
            before = _snapshot(audit)

            # schema-invalid input is refused by the server; the run stays paused in the same state
            for bad in ({"reviewer": "flo", "decisions": [{"query_id": q, "train_id": t, "verdict": "guilty"}]},
                        {"reviewer": "", "decisions": [{"query_id": q, "train_id": t, "verdict": "culprit"}]},
                        {"reviewer": "flo", "decisions": []}):
                with pytest.raises(RuntimeError, match="Cannot resume"):
                    resume_flow_run(run.id, run_input=bad)
                assert _flow_run(audit, name).state.id == run.state.id
            assert _snapshot(audit) == before

            # decisions recorded elsewhere meanwhile (the terminal; a pull does the same) show in the waiting form
            from prefect.input.actions import read_flow_run_input
            from prefect.input.run_input import keyset_from_paused_state

            from tasks.review.decisions import audit_summary
            from tasks.review.runs import submit_decisions

            desc = read_flow_run_input(keyset_from_paused_state(run.state)["description"], flow_run_id=run.id)
            decided = audit_summary(audit.home, audit.audit_id)["decided"]
            assert f"({decided} decided," in desc and "The top 3 candidates of each query are shown" in desc
            assert desc.count("| 4 | `") == 0 and desc.count("| 3 | `") == audit.candidates["query_id"].n_unique()
            q2, t2 = _pair(audit, 1)
            submit_decisions(audit.home, audit.audit_id, "gil", [{"query_id": q2, "train_id": t2,
                                                                  "verdict": "not-culprit"}])
            desc = read_flow_run_input(keyset_from_paused_state(run.state)["description"], flow_run_id=run.id)
            after = audit_summary(audit.home, audit.audit_id)["decided"]
            assert f"({after} decided," in desc and "| not-culprit (gil) |" in desc, desc[:600]
            before = _snapshot(audit)

            # schema-valid but not a candidate: accepted by Prefect, refused by the flow, paused again
            resume_flow_run(run.id, run_input={"reviewer": "flo", "decisions": [
                {"query_id": q, "train_id": "doc-not-a-candidate", "verdict": "culprit"}]})
            run2 = _wait_paused(audit, name, proc, not_state=run.state.id)
            art = Artifact.get(artifact_key(audit.audit_id))
            assert "refused" in str(art.data) and "doc-not-a-candidate" in str(art.data)
            assert _snapshot(audit) == before

            before_flagged = _rows(audit.flagged)
            resume_flow_run(run2.id, run_input={"reviewer": "flo", "decisions": [
                {"query_id": q, "train_id": t, "verdict": "culprit", "comment": "via the Prefect form"}]})
            out, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, out[-3000:]
            assert _flow_run(audit, name).state.is_completed()
        result = json.loads(out.split("RESULT", 1)[1])
        assert result["run_id"] == audit.run_id and result["submitted"] == 1
        assert _rows(audit.flagged) == before_flagged + 1
        last = pl.read_parquet(audit.flagged).row(-1, named=True)
        assert (last["query_id"], last["train_id"], last["reviewer"], last["verdict"]) == (q, t, "flo", "culprit")
        _check_mlflow_matches_disk(audit)
        assert "flo" in _tags(audit)["review.reviewers"].split(",")
        rows = _mlflow_table(audit)
        assert ["flo", "via the Prefect form"] == [rows["data"][-1][rows["columns"].index(c)]
                                                   for c in ("reviewer", "comment")]
    finally:
        _stop(proc)


def test_review_nobody_answers_ends_in_one_message_not_a_traceback(audit: Audit) -> None:
    name = f"review-timeout-{uuid.uuid4().hex[:8]}"
    code = ("from flows.review import review_audit; "
            f"s = review_audit.with_options(flow_run_name={name!r})({audit.audit_id!r}, home={str(audit.home)!r}, "
            "timeout_s=3, poll_interval_s=1, return_state=True); print('STATE', s.type.value, s.message)")
    before = _snapshot(audit)
    proc = subprocess.run([sys.executable, "-c", code], env=audit.env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "STATE FAILED" in out and "Traceback" not in out, out[-3000:]
    assert f"no reviewer answered within 3 s: nothing was recorded and the review of audit {audit.audit_id} " \
           "stays open" in " ".join(out.split()), out[-3000:]
    assert _snapshot(audit) == before


def test_all_candidates_decided_is_done(audit: Audit) -> None:
    from tasks.review.decisions import submit_review

    decisions = [{"query_id": q, "train_id": t, "verdict": "unsure"}
                 for q, t in audit.candidates.select("query_id", "train_id").iter_rows()]
    r = submit_review(audit.home, audit.audit_id, "closer", decisions)
    assert r["status"] == "done" and r["undecided"] == 0 and r["counts"]["unsure"] == 20
    assert _tags(audit)["review.status"] == "done"
    _check_mlflow_matches_disk(audit)
    from tasks.review.decisions import list_audits

    assert list_audits(audit.home)[0]["review_status"] == "done"


def test_a_quality_audit_starts_its_prefect_form_review_too(prefect_api, tmp_path) -> None:
    """Every audit kind ends by starting the `review` deployment's run for its audit id (here: a quality audit's
    hand-off, against a real Prefect server with the deployment)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.review import review_audit
    from tasks.inputs.shards import Inputs
    from tasks.options import AuditParams
    from tasks.quality.stages import open_quality_review
    from tasks.review.runs import REVIEW_DEPLOYMENT

    audit_id = f"qa-{uuid.uuid4().hex[:8]}"
    audit_dir = tmp_path / "home" / "audits" / audit_id
    audit_dir.mkdir(parents=True)
    pl.DataFrame({"query_id": ["outlier"], "query_prompt": ["outliers"], "query_completion": ["1 flagged"],
                  "train_id": ["doc-1"], "score": [3.2], "rank": [1], "snippet": ["[far] text"]}).write_parquet(
        audit_dir / "candidates.parquet")
    ins = Inputs(audit_id, str(audit_dir), "", "", "", "", [], 1, 10, 0, "", 0)
    params = AuditParams(mode="quality", model="unused", train=["unused"])
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="influence-review", type="process"))
        review_audit.to_deployment(name="review", work_pool_name="influence-review").apply()
        open_quality_review(params, ins, "run-x", str(audit_dir / "candidates.parquet"))
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(REVIEW_DEPLOYMENT)
            runs = [r for r in client.read_flow_runs() if r.deployment_id == dep.id]
    assert [(r.parameters["audit_id"], r.parameters["home"]) for r in runs] == [(audit_id, str(tmp_path / "home"))]
