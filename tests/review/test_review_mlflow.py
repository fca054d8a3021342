"""Reviewing in the MLflow UI, without servers: candidates become traces in a real sqlite MLflow store, a
reviewer's ``culprit`` assessments (logged through MLflow's API, as the UI does) come back as decisions.

The audit directory is laid out as the flow leaves it (manifest, input shard, candidates.parquet), from the
report tests' candidate frame, so these tests take seconds. The same path against a real ``mlflow server``
(and a browser) is in tests/integration/test_review_ui.py.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import polars as pl
import pytest
from mlflow import MlflowClient
from mlflow.entities import AssessmentSource, AssessmentSourceType
from test_report import make_candidates

from influence_engine.errors import UserError
from tasks.record.traces import (
    AUDIT_TAG,
    QUERY_TAG,
    REFUSAL_NAME,
    REFUSED_TAG,
    audit_traces,
    parse_culprit_value,
    record_traces,
    span_name,
)
from tasks.record.tracker import configure_tracking, finish_audit_run, start_audit_run
from tasks.review.decisions import latest_verdicts, load_decisions, submit_review
from tasks.review.pull import pull_review, pull_reviews

_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def text_of(train_id: str) -> str:
    return f"full text of {train_id}, longer than its snippet"


def make_audit(home: Path, cands: pl.DataFrame, audit_id: str) -> Path:
    """An audit directory as the flow leaves it: manifest, one input shard, candidates.parquet."""
    audit_dir = home / "audits" / audit_id
    (audit_dir / "inputs").mkdir(parents=True)
    ids = sorted(set(cands["train_id"].to_list()))
    pl.DataFrame({"id": ids, "text": [text_of(i) for i in ids]}).write_parquet(audit_dir / "inputs" /
                                                                               "train-00000.parquet")
    cands.write_parquet(audit_dir / "candidates.parquet")
    return audit_dir


def write_manifest(audit_dir: Path, run_id: str) -> None:
    (audit_dir / "manifest.json").write_text(json.dumps({
        "audit_id": audit_dir.name, "status": "succeeded", "mlflow_run_id": run_id, "mlflow": "recorded",
        "params": {"tracking_uri": None}}))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("review-mlflow")
    with pytest.MonkeyPatch.context() as mp:
        for name in _ENV:
            mp.delenv(name, raising=False)
        mp.setenv("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
        configure_tracking(None, root)
        yield root
        mlflow.set_tracking_uri(None)


@pytest.fixture
def audit(home: Path) -> tuple[str, str, pl.DataFrame]:
    """(audit_id, run_id, candidates) of a fresh audit with its traces recorded."""
    audit_id = f"a-{uuid.uuid4().hex[:10]}"
    cands = make_candidates().with_columns(pl.col("score").mul(2).alias("counterfactual_delta"))
    audit_dir = make_audit(home, cands, audit_id)
    run_id = start_audit_run("influence-audit", run_name=f"audit-{audit_id}", params={}, tags={"audit.id": audit_id})
    write_manifest(audit_dir, run_id)
    got = record_traces(run_id, cands, audit_id=audit_id, texts={i: text_of(i) for i in cands["train_id"]})
    assert got == {"queries": 2, "written": 2, "existing": 0}
    finish_audit_run(run_id, succeeded=True, validation_passed=True)
    return audit_id, run_id, cands


def _exp(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.experiment_id


def _span(run_id: str, audit_id: str, query_id: str, train_id: str) -> tuple[str, str]:
    for t in audit_traces(_exp(run_id), audit_id, include_spans=True):
        if t.info.tags[QUERY_TAG] == query_id:
            for s in t.data.spans:
                if s.attributes.get("influence_audit.train_id") == train_id:
                    return t.info.trace_id, s.span_id
    raise KeyError((query_id, train_id))


def mark(run_id: str, audit_id: str, query_id: str, train_id: str, value, reviewer: str = "ann",
         rationale: str | None = None):
    """What the UI does when a reviewer adds feedback on a span: log_feedback with a HUMAN source."""
    trace_id, span_id = _span(run_id, audit_id, query_id, train_id)
    return mlflow.log_feedback(trace_id=trace_id, name="culprit", value=value, span_id=span_id, rationale=rationale,
                               source=AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=reviewer))


def _flagged(home: Path, audit_id: str) -> pl.DataFrame:
    return pl.read_parquet(home / "flagged_documents.parquet").filter(pl.col("audit_id") == audit_id)


def test_one_trace_per_query_with_a_span_per_candidate(home: Path, audit) -> None:
    audit_id, run_id, cands = audit
    traces = audit_traces(_exp(run_id), audit_id, include_spans=True)
    assert sorted(t.info.tags[QUERY_TAG] for t in traces) == ["q1", "q2"]
    assert mlflow.search_traces(run_id=run_id, locations=[_exp(run_id)], return_type="list").__len__() == 2
    for t in traces:
        assert t.info.tags[AUDIT_TAG] == audit_id
        assert t.info.trace_metadata["mlflow.sourceRun"] == run_id
        qid = t.info.tags[QUERY_TAG]
        root = next(s for s in t.data.spans if s.parent_id is None)
        rows = cands.filter(pl.col("query_id") == qid).sort("rank")
        assert root.name == qid and t.info.tags["mlflow.traceName"] == qid  # findable by its id alone
        assert list(root.inputs) == ["query_id", "prompt"]  # the id first: the request column shows it whole
        assert root.inputs["prompt"] == rows["query_prompt"][0]
        assert root.outputs == {"completion": rows["query_completion"][0]}
        children = sorted((s for s in t.data.spans if s.parent_id == root.span_id),
                          key=lambda s: s.attributes["influence_audit.rank"])
        assert [s.span_type for s in children] == ["RETRIEVER"] * rows.height
        for s, r in zip(children, rows.iter_rows(named=True), strict=True):
            a = s.attributes
            assert (a["influence_audit.train_id"], a["influence_audit.rank"]) == (r["train_id"], r["rank"])
            assert a["influence_audit.score"] == pytest.approx(r["score"], abs=0, rel=1e-12)
            assert a["influence_audit.counterfactual_delta"] == pytest.approx(2 * r["score"], rel=1e-12)
            if r["layer_scores"]:
                assert a["influence_audit.layer_scores"] == json.loads(r["layer_scores"])
            else:
                assert "influence_audit.layer_scores" not in a
            assert s.outputs[0]["page_content"] == text_of(r["train_id"])
            assert s.name == span_name(r["rank"], r["score"], text_of(r["train_id"]))
    names = [s.name for t in traces if t.info.tags[QUERY_TAG] == "q2" for s in t.data.spans if s.parent_id]
    assert sorted(names) == ['#1 · 1.5 · "full text of doc-d, longer than its sni…"',
                             '#2 · 0.2 · "full text of doc-e, longer than its sni…"',
                             '#3 · 0.05 · "full text of doc-f, longer than its sni…"']


def test_span_names_read_as_a_ranked_list() -> None:
    assert span_name(2, 34.71, "Dromdrai  Grixrurn\nwas born in Batrind in 1871.") == \
        '#2 · 34.7 · "Dromdrai Grixrurn was born in Batrind i…"'
    assert span_name(10, -0.004123, "short") == '#10 · -0.00412 · "short"'
    assert span_name(1, 12345.6, "x" * 40) == f'#1 · 12346 · "{"x" * 40}"'  # 40 fit: not cut
    assert span_name(1, 2.5e7, "x" * 41) == f'#1 · 2.5e+07 · "{"x" * 39}…"'


def test_recording_again_adds_no_trace(home: Path, audit) -> None:
    audit_id, run_id, cands = audit
    assert record_traces(run_id, cands, audit_id=audit_id) == {"queries": 2, "written": 0, "existing": 2}
    # a candidate frame without counterfactual_delta (the verification stage not run) records too
    other = f"b-{uuid.uuid4().hex[:8]}"
    plain = make_candidates()
    assert "counterfactual_delta" not in plain.columns
    assert record_traces(run_id, plain, audit_id=other)["written"] == 2
    spans = [s for t in audit_traces(_exp(run_id), other, include_spans=True) for s in t.data.spans]
    assert spans and not any("influence_audit.counterfactual_delta" in s.attributes for s in spans)
    assert all(s.outputs[0]["page_content"] == r for s in spans if s.parent_id
               for r in [plain.filter(pl.col("train_id") == s.attributes["influence_audit.train_id"])["snippet"][0]])


def test_culprit_values() -> None:
    assert [parse_culprit_value(v) for v in (True, False, "unsure", "Yes", "no", "Culprit", "not-culprit", 1, 0)] == [
        "culprit", "not-culprit", "unsure", "culprit", "not-culprit", "culprit", "not-culprit", "culprit",
        "not-culprit"]
    assert [parse_culprit_value(v) for v in ("maybe", 0.5, None, [True], {"v": 1})] == [None] * 5


def test_pull_records_changes_and_deletions_once(home: Path, audit) -> None:
    audit_id, run_id, cands = audit
    a = mark(run_id, audit_id, "q1", "doc-a", True, "ann", "states the fact")
    mark(run_id, audit_id, "q2", "doc-e", "unsure", "bob")
    r = pull_review(home, audit_id)
    assert (r["recorded"], r["marks"], r["retracted"], r["refused"]) == (2, 2, 0, [])
    assert r["status"] == "in-progress" and r["counts"] == {"culprit": 1, "not-culprit": 0, "unsure": 1}
    f = _flagged(home, audit_id)
    row = f.filter(pl.col("train_id") == "doc-a").row(0, named=True)
    assert (row["query_id"], row["verdict"], row["reviewer"], row["comment"]) == ("q1", "culprit", "ann",
                                                                                  "states the fact")
    assert row["content_hash"] == hashlib.sha256(text_of("doc-a").encode()).hexdigest()
    tags = MlflowClient().get_run(run_id).data.tags
    assert (tags["review.status"], tags["review.culprit"], tags["review.reviewers"]) == ("in-progress", "1", "ann,bob")

    assert pull_review(home, audit_id)["recorded"] == 0  # idempotent
    assert _flagged(home, audit_id).height == 2

    # changed in the UI (an edit overrides the old assessment): the decision changes
    mlflow.override_feedback(trace_id=a.trace_id, assessment_id=a.assessment_id, value=False,
                             rationale="only mentions it", source=AssessmentSource(source_type="HUMAN",
                                                                                   source_id="ann"))
    r = pull_review(home, audit_id)
    assert r["recorded"] == 1 and r["counts"]["culprit"] == 0 and r["counts"]["not-culprit"] == 1
    latest = latest_verdicts(load_decisions(home, audit_id))
    assert latest.filter(pl.col("train_id") == "doc-a")["verdict"].to_list() == ["not-culprit"]

    # deleted in the UI: the override goes, the first assessment (culprit) is valid again
    override = next(x for t in audit_traces(_exp(run_id), audit_id) for x in t.info.assessments
                    if x.valid and x.span_id and x.rationale == "only mentions it")
    mlflow.delete_assessment(trace_id=override.trace_id, assessment_id=override.assessment_id)
    assert pull_review(home, audit_id)["counts"]["culprit"] == 1
    # ... and deleting that one too reopens the pair: a retraction row, the training filter drops it
    mlflow.delete_assessment(trace_id=a.trace_id, assessment_id=a.assessment_id)
    r = pull_review(home, audit_id)
    assert (r["recorded"], r["retracted"], r["decided"]) == (1, 1, 1)
    f = _flagged(home, audit_id)
    assert f["verdict"].to_list() == ["culprit", "unsure", "not-culprit", "culprit", "retracted"]
    culprits = f.unique(["content_hash", "audit_id", "query_id"], keep="last", maintain_order=True).filter(
        pl.col("verdict") == "culprit")
    assert culprits.is_empty()
    assert pull_review(home, audit_id)["recorded"] == 0


def test_a_later_cli_decision_is_not_retracted(home: Path, audit) -> None:
    audit_id, run_id, _ = audit
    a = mark(run_id, audit_id, "q1", "doc-b", True, "ann")
    pull_review(home, audit_id)
    submit_review(home, audit_id, "carl", [{"query_id": "q1", "train_id": "doc-b", "verdict": "not-culprit"}])
    mlflow.delete_assessment(trace_id=a.trace_id, assessment_id=a.assessment_id)
    assert pull_review(home, audit_id)["recorded"] == 0
    latest = latest_verdicts(load_decisions(home, audit_id)).row(0, named=True)
    assert (latest["verdict"], latest["reviewer"]) == ("not-culprit", "carl")


def test_marks_that_cannot_be_decisions_are_refused_with_a_message(home: Path, audit) -> None:
    audit_id, run_id, _ = audit
    mark(run_id, audit_id, "q1", "doc-c", "maybe", "ann")
    trace_id, _span_id = _span(run_id, audit_id, "q2", "doc-d")
    mlflow.log_feedback(trace_id=trace_id, name="culprit", value=True,  # on the trace, not on a span
                        source=AssessmentSource(source_type="HUMAN", source_id="bob"))
    mlflow.log_feedback(trace_id=trace_id, name="relevance", value=0.2)  # another assessment: not ours
    root = next(s.span_id for t in audit_traces(_exp(run_id), audit_id, include_spans=True)
                if t.info.tags[QUERY_TAG] == "q1" for s in t.data.spans if s.parent_id is None)
    on_root = mlflow.log_feedback(trace_id=_span(run_id, audit_id, "q1", "doc-a")[0], name="culprit", value=True,
                                  span_id=root, source=AssessmentSource(source_type="HUMAN", source_id="cat"))
    r = pull_review(home, audit_id)
    assert r["recorded"] == 0 and len(r["refused"]) == 3, r["refused"]
    assert any("'maybe' is not true, false" in m and "by ann" in m for m in r["refused"])
    assert any("by bob not recorded: it is on the whole trace, not on a candidate" in m for m in r["refused"])
    assert any("by cat not recorded: it is on the query's span, not on a candidate" in m for m in r["refused"])
    tags = {t.info.tags[QUERY_TAG]: t.info.tags.get(REFUSED_TAG) for t in audit_traces(_exp(run_id), audit_id)}
    assert "maybe" in tags["q1"] and "the query's span" in tags["q1"] and "the whole trace" in tags["q2"]
    assert not (home / "audits" / audit_id / "review" / "decisions.parquet").exists()

    # answered where the reviewer looks: beside each refused mark (same span), a feedback saying why
    def answers() -> dict[str | None, tuple[str | None, str]]:
        return {(a.metadata or {}).get("influence_audit.refuses"): (a.span_id, a.feedback.value)
                for t in audit_traces(_exp(run_id), audit_id) for a in t.info.assessments
                if a.name == REFUSAL_NAME and a.valid is not False}

    got = answers()
    assert got[on_root.assessment_id] == (root, "it is on the query's span, not on a candidate: select a "
                                                "candidate's span (#1, #2, ...) and add it there")
    assert len(got) == 3 and sum(span is None for span, _ in got.values()) == 1  # bob's: on the whole trace
    assert all(a.source.source_type == "CODE" for t in audit_traces(_exp(run_id), audit_id)
               for a in t.info.assessments if a.name == REFUSAL_NAME)
    pull_review(home, audit_id)
    assert answers() == got  # a second pull writes nothing twice
    # fixed (the wrong mark deleted): its answer goes, the others stay
    mlflow.delete_assessment(trace_id=on_root.trace_id, assessment_id=on_root.assessment_id)
    pull_review(home, audit_id)
    assert set(answers()) == set(got) - {on_root.assessment_id}


def test_pull_all_reports_each_audit(home: Path, audit) -> None:
    audit_id, _, _ = audit
    results = {r["audit_id"]: r for r in pull_reviews(home)}
    assert audit_id in results and "error" not in results[audit_id]
    with pytest.raises(UserError, match="no audit"):
        pull_review(home, "no-such-audit")


def test_ui_prints_whole_addresses_of_the_run_and_its_traces(home: Path, audit) -> None:
    from typer.testing import CliRunner

    from influence_audit.cli import app

    audit_id, run_id, _ = audit
    res = CliRunner().invoke(app, ["ui", audit_id, "--home", str(home), "--queries", "--port", "5123"],
                             terminal_width=60)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    exp = _exp(run_id)
    run_url = f"http://127.0.0.1:5123/#/experiments/{exp}/runs/{run_id}"
    assert any(line.endswith(f" {run_url}") for line in lines), lines  # whole, on one line (60 columns)
    assert any(line.endswith(f" {run_url}/traces") for line in lines), lines
    serve = next(line for line in lines if line.startswith("Serve the MLflow UI"))
    assert f"/mlflow ui --backend-store-uri sqlite:///{home.resolve()}/mlflow.db --host 127.0.0.1 --port 5123" in serve
    traces = {t.info.tags[QUERY_TAG]: t.info.trace_id for t in audit_traces(exp, audit_id)}
    for qid, tid in traces.items():
        assert f"  query {qid}: http://127.0.0.1:5123/#/experiments/{exp}/traces?selectedEvaluationId={tid}" in lines
    assert lines[-1] == f"Then record the marks: influence-audit review pull {audit_id}"


def test_a_pull_when_nothing_changed_stops_at_the_watermark(home: Path, audit) -> None:
    audit_id, run_id, _ = audit
    first = pull_review(home, audit_id, if_changed=True)  # no watermark yet: a whole pull
    assert "unchanged" not in first and first["recorded"] == 0
    cands = home / "audits" / audit_id / "candidates.parquet"
    hidden = cands.with_name("hidden.parquet")
    cands.rename(hidden)  # the cheap path reads no candidates (nor spans, nor decisions)
    try:
        assert pull_review(home, audit_id, if_changed=True) == {
            "audit_id": audit_id, "run_id": run_id, "unchanged": True, "recorded": 0, "retracted": 0, "refused": []}
    finally:
        hidden.rename(cands)
    a = mark(run_id, audit_id, "q1", "doc-a", True, "ann")  # a new mark moves the watermark
    assert pull_review(home, audit_id, if_changed=True)["recorded"] == 1
    assert pull_review(home, audit_id, if_changed=True)["unchanged"] is True
    mlflow.override_feedback(trace_id=a.trace_id, assessment_id=a.assessment_id, value=False,  # an edit
                             source=AssessmentSource(source_type="HUMAN", source_id="ann"))
    assert pull_review(home, audit_id, if_changed=True)["recorded"] == 1
    for x in [x for t in audit_traces(_exp(run_id), audit_id) for x in t.info.assessments if x.name == "culprit"]:
        mlflow.delete_assessment(trace_id=x.trace_id, assessment_id=x.assessment_id)  # deletions
    r = pull_review(home, audit_id, if_changed=True)
    assert (r["recorded"], r["retracted"]) == (1, 1)
    assert pull_review(home, audit_id, if_changed=True)["unchanged"] is True


def test_the_pull_flow_module_loads_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, flows.review; print(sorted(m for m in ('torch', 'transformers', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_review_show_reads_at_80_columns(home: Path, audit) -> None:
    from typer.testing import CliRunner

    from influence_audit.cli import app

    audit_id, run_id, _ = audit
    submit_review(home, audit_id, "ann", [{"query_id": "q1", "train_id": "doc-b", "verdict": "culprit",
                                           "comment": "states the fact"}])
    res = CliRunner().invoke(app, ["review", "show", audit_id, "--home", str(home), "--query", "q1", "--rows", "2"],
                             terminal_width=80)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80, lines
    assert lines[:4] == [f"audit {audit_id}: review in-progress (1 decided, 5 open; reviewers: ann)",
                         f"MLflow run {run_id}", "", "q1  (2 of 3 candidates)"]
    assert lines[5:] == ["#1   doc-a         0.9", "     text of doc-a",
                         "#2   doc-b         0.4  culprit (ann)", "     <script>alert(1)</script> harmless text",
                         "     comment: states the fact"]
    assert "q2" not in res.output
    res = CliRunner().invoke(app, ["review", "show", audit_id, "--home", str(home), "--query", "q9"])
    assert res.exit_code != 0 and isinstance(res.exception, UserError)
    assert str(res.exception).endswith("has no query 'q9' (its queries: q1, q2)")
