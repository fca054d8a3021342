"""Named reviewers on a real ``mlflow server --app-name basic-auth`` (``pytest -m integration``).

The server is configured as docs/operations.md says: no permission by default, our authorization function
(tasks/record/reviewer_auth.py) naming the logged-in user on every assessment. The admin records an audit, gives
two reviewers EDIT and a viewer READ on its experiment; the reviewers mark candidates with the very request the
UI sends (source id "User"); ``influence-audit review pull`` (the installed command, logged in through
MLFLOW_TRACKING_USERNAME / PASSWORD) records each mark under its reviewer. An account without permission can
neither read the traces nor mark them; the viewer reads but cannot mark; no login is refused.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest
from servers import AUTH_ADMIN, mlflow_auth_server

from .conftest import BIN, REPO, base_env

sys.path.insert(0, str(REPO / "tests"))
from test_report import make_candidates  # noqa: E402
from test_review_mlflow import make_audit, text_of, write_manifest  # noqa: E402

pytestmark = pytest.mark.integration

PASSWORDS = {"ann": "ann-pw-7c1d2e", "bob": "bob-pw-90af3b", "eve": "eve-pw-55e0c1", "vic": "vic-pw-1b7f4a"}


@pytest.fixture(scope="module")
def auth_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from mlflow_auth_server(tmp_path_factory.mktemp("mlflow-auth"))


def _login(mp: pytest.MonkeyPatch, user: str, password: str) -> None:
    mp.setenv("MLFLOW_TRACKING_USERNAME", user)
    mp.setenv("MLFLOW_TRACKING_PASSWORD", password)


def _ui_mark(uri: str, user: str, trace_id: str, span_id: str, value, rationale: str,
             source_id: str = "User") -> httpx.Response:
    """The request the MLflow 3.17 UI sends on "Create" (its source id is always "User")."""
    body = {"assessment": {"assessment_name": "culprit", "trace_id": trace_id, "span_id": span_id,
                           "source": {"source_type": "HUMAN", "source_id": source_id}, "rationale": rationale,
                           "feedback": {"value": value}}}
    return httpx.post(f"{uri}/ajax-api/3.0/mlflow/traces/{trace_id}/assessments", json=body, timeout=30,
                      auth=(user, PASSWORDS[user]))


def test_each_mark_carries_its_reviewer_and_an_outsider_can_neither_read_nor_mark(
        auth_uri: str, tmp_path: Path) -> None:
    from mlflow.server import get_app_client

    from tasks.record.traces import QUERY_TAG, audit_traces, record_traces
    from tasks.record.tracker import TrackingRefused, configure_tracking, finish_audit_run, start_audit_run, tracker

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
        _login(mp, *AUTH_ADMIN)
        users = get_app_client("basic-auth", tracking_uri=auth_uri)
        for name, password in PASSWORDS.items():
            users.create_user(name, password)

        # the audit, recorded by the admin account (the workers' account in a deployment)
        home, audit_id = tmp_path / "home", f"auth-{uuid.uuid4().hex[:8]}"
        cands = make_candidates()
        audit_dir = make_audit(home, cands, audit_id)
        configure_tracking(auth_uri, home)
        run_id = start_audit_run("influence-audit", run_name=f"audit-{audit_id}", params={},
                                 tags={"audit.id": audit_id})
        write_manifest(audit_dir, run_id)
        record_traces(run_id, cands, audit_id=audit_id, texts={i: text_of(i) for i in cands["train_id"]})
        finish_audit_run(run_id, succeeded=True, validation_passed=True)
        exp = tracker().experiment_of(run_id)
        for name, permission in (("ann", "EDIT"), ("bob", "EDIT"), ("vic", "READ")):
            users.grant_user_permission(name, "experiment", exp, permission)
        spans = {(t.info.tags[QUERY_TAG], s.attributes["influence_audit.train_id"]): (t.info.trace_id, s.span_id)
                 for t in audit_traces(exp, audit_id, include_spans=True) for s in t.data.spans
                 if "influence_audit.train_id" in s.attributes}

        # two reviewers mark in the UI; ann also tries to sign as bob
        assert _ui_mark(auth_uri, "ann", *spans[("q1", "doc-a")], True, "states the fact").status_code == 200
        assert _ui_mark(auth_uri, "bob", *spans[("q2", "doc-d")], False, "only mentions it").status_code == 200
        assert _ui_mark(auth_uri, "ann", *spans[("q2", "doc-e")], "unsure", "look again",
                        source_id="bob").status_code == 200

        # outsiders: eve has no permission, vic may only read, nobody logged in is asked to log in
        trace_id, span_id = spans[("q1", "doc-b")]
        assert _ui_mark(auth_uri, "eve", trace_id, span_id, True, "x").status_code == 403
        assert _ui_mark(auth_uri, "vic", trace_id, span_id, True, "x").status_code == 403
        search = {"locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": exp}}]}
        for user, status in (("eve", 403), ("vic", 200)):
            r = httpx.post(f"{auth_uri}/api/3.0/mlflow/traces/search", json=search, timeout=30,
                           auth=(user, PASSWORDS[user]))
            assert r.status_code == status, (user, r.text)
            r = httpx.get(f"{auth_uri}/ajax-api/3.0/mlflow/traces/{trace_id}", timeout=30,
                          auth=(user, PASSWORDS[user]))
            assert r.status_code == status, (user, r.text)
        assert httpx.get(f"{auth_uri}/ajax-api/3.0/mlflow/traces/{trace_id}", timeout=30).status_code == 401
        _login(mp, "eve", PASSWORDS["eve"])
        with pytest.raises(TrackingRefused, match="user 'eve' has no permission to search traces"):
            audit_traces(exp, audit_id)
        _login(mp, *AUTH_ADMIN)

    # the pull, logged in through MLflow's environment variables, names each reviewer
    env = base_env(MLFLOW_TRACKING_URI=auth_uri, MLFLOW_TRACKING_USERNAME=AUTH_ADMIN[0],
                   MLFLOW_TRACKING_PASSWORD=AUTH_ADMIN[1])
    r = subprocess.run([str(BIN / "influence-audit"), "review", "pull", audit_id, "--home", str(home)], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 decision(s) recorded from 3 culprit mark(s)" in r.stdout, r.stdout
    flagged = pl.read_parquet(home / "flagged_documents.parquet")
    got = {(x["query_id"], x["train_id"]): (x["verdict"], x["reviewer"], x["comment"])
           for x in flagged.iter_rows(named=True)}
    assert got == {("q1", "doc-a"): ("culprit", "ann", "states the fact"),
                   ("q2", "doc-d"): ("not-culprit", "bob", "only mentions it"),
                   ("q2", "doc-e"): ("unsure", "ann", "look again")}

    # the same pull as eve: one line, non-zero, nothing written
    env |= {"MLFLOW_TRACKING_USERNAME": "eve", "MLFLOW_TRACKING_PASSWORD": PASSWORDS["eve"]}
    r = subprocess.run([str(BIN / "influence-audit"), "review", "pull", audit_id, "--home", str(home)], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "user 'eve' has no permission" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert pl.read_parquet(home / "flagged_documents.parquet").height == 3
