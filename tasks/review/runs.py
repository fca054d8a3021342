"""Open an audit's Prefect-form review: a flow run of the ``review`` deployment, where a Prefect server has one.

Every audit (scheduled, triggered or by hand) calls :func:`open_review_form` at its end. With a Prefect server
configured (``PREFECT_API_URL``) and the ``review`` deployment on it, an audit without a waiting review run gets
one (it publishes the form and suspends: no process is held while people decide). Without a server or the
deployment nothing is started, and the returned line says why; reviewing in MLflow and the CLI work either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import task

from tasks.paths import resolve_home
from tasks.review.decisions import (
    FORM_TOP,
    ReviewDecision,
    artifact_key,
    audit_summary,
    form_text,
    review_markdown,
    submit_review,
)

__all__ = ["REVIEW_DEPLOYMENT", "open_review_form", "refresh_forms", "refresh_review_forms", "submit_decisions",
           "submit_review_task", "waiting_review_runs"]

REVIEW_DEPLOYMENT = "review_audit/review"
_WAITING = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED")


def waiting_review_runs(client: Any, deployment_id: Any, audit_id: str) -> list[Any]:
    """Flow runs of the review deployment for ``audit_id`` that have not finished (suspended ones included)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType(s) for s in _WAITING]))))
    return [r for r in runs if (r.parameters or {}).get("audit_id") == audit_id]


def _no_server() -> bool:
    if os.environ.get("PREFECT_API_URL"):
        return False
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


def refresh_review_forms(audit_id: str, home: str) -> int:
    """Bring the form of the audit's waiting review runs up to date with the decisions on disk (after a pull or a
    terminal submission): the text above the form fields (status, counts, the top candidates with their current
    verdicts) and the artifact with the full list. Returns how many waiting runs were refreshed (0 without a
    Prefect server, the deployment, or a waiting run)."""
    if _no_server():
        return 0
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.input.actions import create_flow_run_input, delete_flow_run_input
    from prefect.input.run_input import keyset_from_paused_state

    with get_client(sync_client=True) as client:  # suspended (deployed) and paused (direct) runs alike
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[REVIEW_DEPLOYMENT.split("/")[0]])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.PAUSED]))))
    waiting = [r for r in runs if (r.parameters or {}).get("audit_id") == audit_id and r.state is not None
               and r.state.state_details.run_input_keyset]
    if not waiting:
        return 0
    summary = audit_summary(home, audit_id)
    create_markdown_artifact(key=artifact_key(audit_id), markdown=review_markdown(summary),
                             description=f"Review audit {audit_id}")
    for run in waiting:
        keyset = keyset_from_paused_state(run.state)
        text = form_text(summary, top=int((run.parameters or {}).get("form_top") or FORM_TOP))
        try:
            delete_flow_run_input(key=keyset["description"], flow_run_id=run.id)
        except ObjectNotFound:
            pass
        create_flow_run_input(key=keyset["description"], value=text, flow_run_id=run.id)
    return len(waiting)


def open_review_form(audit_id: str, home: str) -> str:
    """Start (or find) the audit's review run; returns one line saying which, or why there is none."""
    if _no_server():
        return "no Prefect server configured (PREFECT_API_URL): no Prefect-form review"
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(REVIEW_DEPLOYMENT)
        except ObjectNotFound:
            return (f"no `{REVIEW_DEPLOYMENT}` deployment on the Prefect server: `prefect deploy -n review` "
                    "adds the Prefect-form review")
        waiting = waiting_review_runs(client, deployment.id, audit_id)
        if waiting:
            return f"review flow run {waiting[0].name} ({waiting[0].id}) is waiting for decisions"
    run = run_deployment(REVIEW_DEPLOYMENT, parameters={"audit_id": audit_id, "home": home}, timeout=0,
                         as_subflow=False, flow_run_name=f"review-{audit_id}")
    return f"review flow run {run.name} ({run.id}) started: it publishes the form and waits, suspended"


def refresh_forms(home: Path, audit_id: str) -> None:
    """Refresh the audit's waiting Prefect forms (:func:`refresh_review_forms`); a failure is
    logged, never raised: the form is a view, the decisions are recorded without it."""
    try:
        refresh_review_forms(audit_id, str(home))
    except Exception as exc:  # noqa: BLE001 (Prefect unreachable, a run resumed meanwhile)
        logging.getLogger(__name__).warning("review form of audit %s not refreshed: %s", audit_id, exc)


def submit_decisions(home: str | os.PathLike[str] | None, audit_id: str, reviewer: str, decisions: Sequence[Any], *,
                     tracking_uri: str | None = None) -> dict[str, Any]:
    """:func:`tasks.review.decisions.submit_review`, then the audit's waiting Prefect forms brought up to date."""
    result = submit_review(home, audit_id, reviewer, decisions, tracking_uri=tracking_uri)
    refresh_forms(resolve_home(home), audit_id)
    return result


@task(name="submit-review")
def submit_review_task(home: str, audit_id: str, reviewer: str, decisions: list[ReviewDecision]) -> dict[str, Any]:
    """:func:`submit_decisions` as a task (no retries: a retry after a partial write would duplicate rows)."""
    return submit_decisions(home, audit_id, reviewer, decisions)
