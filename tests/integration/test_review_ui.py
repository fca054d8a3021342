"""Reviewing in the MLflow UI against real servers (``pytest -m integration``).

1. An audit's candidates are recorded as traces on a real ``mlflow server``; a reviewer's ``culprit`` mark is
   created through the same REST call the UI makes (``ajax-api/3.0/mlflow/traces/<id>/assessments``);
   ``influence-audit review pull`` (the installed command) records it in the flagged-documents Parquet; an
   edit and a deletion change the decision.
2. The trace view, loaded in headless Chromium from the MLflow server, renders the candidates (skipped when
   Debian's chromium is not installed: ``apt-get install -y chromium``).
3. Durability: the ``review`` deployment is started the way every audit starts it; it suspends (no process
   held); the worker is killed; decisions are submitted anyway (one refused pair among them); a new worker
   replays the run, which refuses with a message and keeps the valid decision in the form; the corrected
   submission is recorded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from .conftest import BIN, REPO, Servers, start, wait_for

sys.path.insert(0, str(REPO / "tests"))
from test_report import make_candidates  # noqa: E402
from test_review_mlflow import make_audit, text_of, write_manifest  # noqa: E402

pytestmark = pytest.mark.integration


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "influence-audit"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"{args} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _recorded_audit(servers: Servers, home: Path, audit_id: str) -> tuple[str, str]:
    """An audit directory in ``home`` whose run and traces are on the MLflow server: (run_id, experiment_id)."""
    import mlflow

    from tasks.record.traces import record_traces
    from tasks.record.tracker import configure_tracking, finish_audit_run, start_audit_run

    cands = make_candidates()
    audit_dir = make_audit(home, cands, audit_id)
    configure_tracking(servers.mlflow_uri, home)
    run_id = start_audit_run("influence-audit", run_name=f"audit-{audit_id}", params={}, tags={"audit.id": audit_id})
    write_manifest(audit_dir, run_id)
    record_traces(run_id, cands, audit_id=audit_id, texts={i: text_of(i) for i in cands["train_id"]})
    finish_audit_run(run_id, succeeded=True, validation_passed=True)
    return run_id, mlflow.get_run(run_id).info.experiment_id


@pytest.fixture(scope="module")
def ui_audit(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("ui-review") / "home"
    audit_id = f"ui-{uuid.uuid4().hex[:8]}"
    run_id, exp = _recorded_audit(servers, home, audit_id)
    return {"home": home, "audit_id": audit_id, "run_id": run_id, "experiment_id": exp}


def _span(exp: str, audit_id: str, query_id: str, train_id: str) -> tuple[str, str]:
    from tasks.record.traces import QUERY_TAG, audit_traces

    for t in audit_traces(exp, audit_id, include_spans=True):
        if t.info.tags[QUERY_TAG] == query_id:
            for s in t.data.spans:
                if s.attributes.get("influence_audit.train_id") == train_id:
                    return t.info.trace_id, s.span_id
    raise KeyError((query_id, train_id))


def _latest(home: Path, audit_id: str) -> dict[tuple[str, str], str]:
    f = pl.read_parquet(home / "flagged_documents.parquet").filter(pl.col("audit_id") == audit_id)
    last = f.unique(["query_id", "train_id"], keep="last", maintain_order=True)
    return {(r["query_id"], r["train_id"]): r["verdict"] for r in last.iter_rows(named=True)}


def test_a_culprit_marked_in_the_ui_reaches_the_flagged_documents(servers: Servers, ui_audit) -> None:
    import mlflow
    from mlflow.entities import AssessmentSource

    home, audit_id, exp = ui_audit["home"], ui_audit["audit_id"], ui_audit["experiment_id"]
    trace_id, span_id = _span(exp, audit_id, "q2", "doc-d")
    body = {"assessment": {"assessment_name": "culprit", "trace_id": trace_id, "span_id": span_id,
                           "source": {"source_type": "HUMAN", "source_id": "ann"},
                           "rationale": "states the fact", "feedback": {"value": True}}}
    r = httpx.post(f"{servers.mlflow_uri}/ajax-api/3.0/mlflow/traces/{trace_id}/assessments", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assessment_id = r.json()["assessment"]["assessment_id"]

    out = _cli(["review", "pull", audit_id, "--home", str(home)], servers.env).stdout
    assert "1 decision(s) recorded from 1 culprit mark(s) on 2 trace(s)" in out, out
    flagged = pl.read_parquet(home / "flagged_documents.parquet")
    row = flagged.row(-1, named=True)
    assert (row["audit_id"], row["query_id"], row["train_id"], row["verdict"], row["reviewer"], row["comment"]) == (
        audit_id, "q2", "doc-d", "culprit", "ann", "states the fact")
    assert "0 decision(s) recorded" in _cli(["review", "pull", audit_id, "--home", str(home)], servers.env).stdout

    mlflow.set_tracking_uri(servers.mlflow_uri)
    mlflow.override_feedback(trace_id=trace_id, assessment_id=assessment_id, value="unsure",
                             rationale="needs a second look", source=AssessmentSource("HUMAN", "bob"))
    _cli(["review", "pull", "--home", str(home)], servers.env)  # every audit of the home
    assert _latest(home, audit_id)[("q2", "doc-d")] == "unsure"
    tags = mlflow.get_run(ui_audit["run_id"]).data.tags
    assert (tags["review.status"], tags["review.unsure"], tags["review.culprit"]) == ("in-progress", "1", "0")

    for a in [x for t in mlflow.search_traces(locations=[exp], return_type="list",
                                             filter_string=f"tag.`influence_audit.audit_id` = '{audit_id}'")
              for x in t.info.assessments if x.name == "culprit"]:
        mlflow.delete_assessment(trace_id=a.trace_id, assessment_id=a.assessment_id)
    _cli(["review", "pull", audit_id, "--home", str(home)], servers.env)
    assert _latest(home, audit_id)[("q2", "doc-d")] == "retracted"
    assert mlflow.get_run(ui_audit["run_id"]).data.tags["review.status"] == "open"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed "
                                                              "(apt-get install -y chromium)")
def test_the_trace_view_renders_the_candidates(servers: Servers, ui_audit) -> None:
    from tasks.record.ui import audit_ui

    info = audit_ui(ui_audit["home"], ui_audit["audit_id"], tracking_uri=servers.mlflow_uri, per_query=True)
    assert info["command"] is None and info["urls"]["run"].startswith(servers.mlflow_uri + "/#/experiments/")
    url = info["urls"]["trace"]["q1"]
    profile = ui_audit["home"].parent / "chromium-profile"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
           "--window-size=1600,1000", "--virtual-time-budget=30000", "--dump-dom", url]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=240).stdout
    import html

    from tasks.record.traces import span_name

    dom = html.unescape(dom)
    for rank, doc, score in ((1, "doc-a", 0.9), (2, "doc-b", 0.4), (3, "doc-c", -0.1)):
        name = span_name(rank, score, text_of(doc))
        assert name in dom, f"candidate span {name} not rendered by the trace view of {url}"


# --------------------------------------------------------------------------------------------- durability


def _api(servers: Servers, method: str, path: str, **kw: Any) -> Any:
    r = httpx.request(method, servers.prefect_api + path, timeout=30, **kw)
    r.raise_for_status()
    return r.json()


def _state(servers: Servers, run_id: str) -> dict[str, Any]:
    return _api(servers, "GET", f"/flow_runs/{run_id}")["state"]


def _wait_state(servers: Servers, run_id: str, names: set[str], *procs, not_id: str | None = None,
                timeout: float = 300) -> dict[str, Any]:
    got: dict[str, Any] = {}

    def reached() -> bool:
        got.clear()
        got.update(_state(servers, run_id))
        if got["type"] in ("FAILED", "CRASHED", "CANCELLED"):
            pytest.fail(f"review flow run ended {got['name']}: {got.get('message')}")
        return got["name"] in names and got["id"] != not_id

    wait_for(reached, timeout, f"review flow run to be {'/'.join(sorted(names))}", *procs, every_s=1.0)
    return dict(got)


def test_a_killed_worker_loses_no_decision(servers: Servers, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run
    from prefect.input.run_input import keyset_from_paused_state, read_flow_run_input
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.review.runs import REVIEW_DEPLOYMENT, open_review_form

    audit_id = f"dur-{uuid.uuid4().hex[:8]}"
    home = servers.home
    _recorded_audit(servers, home, audit_id)
    env = servers.env | {"INFLUENCE_AUDIT_REPO": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "2",
                         "INFLUENCE_AUDIT_MODEL": "unused", "INFLUENCE_AUDIT_TRAIN": "unused",
                         "INFLUENCE_AUDIT_QUERIES": "unused"}
    prefect = str(BIN / "prefect")
    pools = {p["name"] for p in _api(servers, "POST", "/work_pools/filter", json={})}
    if "influence-review" not in pools:
        subprocess.run([prefect, "work-pool", "create", "influence-review", "--type", "process"], env=env, check=True,
                       capture_output=True, timeout=120)
    subprocess.run([prefect, "--no-prompt", "deploy", "-n", "review"], env=env, cwd=REPO, check=True,
                   capture_output=True, timeout=300)

    worker = start("review-worker-1", [prefect, "worker", "start", "--pool", "influence-review", "--limit", "1"],
                   env, servers.logs)
    try:
        with temporary_settings(updates={PREFECT_API_URL: servers.prefect_api}):
            said = open_review_form(audit_id, str(home))  # what every audit calls at its end
            assert "started" in said, said
            assert "waiting" in open_review_form(audit_id, str(home))  # a rerun of the audit opens no second one
            with get_client(sync_client=True) as client:
                dep = client.read_deployment_by_name(REVIEW_DEPLOYMENT)
                (run,) = [r for r in client.read_flow_runs() if r.deployment_id == dep.id
                          and r.parameters.get("audit_id") == audit_id]
            rid = str(run.id)
            first = _wait_state(servers, rid, {"Suspended"}, worker)
            worker.stop(grace_s=0)  # SIGINT then SIGKILL: the worker and anything it started are gone
            # suspended = no process of its own: nothing of the review survives but the server's record
            assert _state(servers, rid)["name"] == "Suspended"

            # decisions submitted while no worker runs: one valid, one pair that is not a candidate
            valid = {"query_id": "q1", "train_id": "doc-a", "verdict": "culprit", "comment": "planted"}
            resume_flow_run(run.id, run_input={"reviewer": "flo", "decisions": [
                valid, {"query_id": "q1", "train_id": "doc-zzz", "verdict": "culprit"}]})
            assert _state(servers, rid)["type"] in ("SCHEDULED", "PENDING")  # accepted, waiting for a worker
            worker2 = start("review-worker-2", [prefect, "worker", "start", "--pool", "influence-review", "--limit",
                                                "1"], env, servers.logs)
            try:
                again = _wait_state(servers, rid, {"Suspended"}, worker2, not_id=first["id"])
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(run.id).state
                keys = keyset_from_paused_state(state)
                description = read_flow_run_input(keys["description"], flow_run_id=run.id)
                assert "refused" in description and "q1:doc-zzz" in description, description
                schema = read_flow_run_input(keys["schema"], flow_run_id=run.id)
                props = schema["properties"]
                assert props["reviewer"]["default"] == "flo"
                assert [(d["query_id"], d["train_id"]) for d in props["decisions"]["default"]] == [("q1", "doc-a")]
                assert not (home / "audits" / audit_id / "review" / "decisions.parquet").exists()

                resume_flow_run(run.id, run_input={"reviewer": "flo", "decisions": [valid]})
                _wait_state(servers, rid, {"Completed"}, worker2, not_id=again["id"])
            finally:
                worker2.stop()
    finally:
        worker.stop()
    decisions = pl.read_parquet(home / "audits" / audit_id / "review" / "decisions.parquet")
    assert decisions.select("query_id", "train_id", "verdict", "reviewer", "comment").rows() == [
        ("q1", "doc-a", "culprit", "flo", "planted")]
    assert _latest(home, audit_id) == {("q1", "doc-a"): "culprit"}
    print(f"\nreview run {rid}: suspended, worker killed, decisions submitted, replayed by a new worker: "
          f"{json.dumps(_state(servers, rid)['name'])}; {time.strftime('%H:%M:%S')}")
