"""The review flows: the Prefect-form review of one audit, and the pull of reviewers' marks from MLflow.

``review_audit`` shows an audit's candidates, waits for a reviewer's typed input and records it. Run from its
deployment (``review`` in prefect.yaml) it *suspends* while waiting: the flow run's process exits, the input
is stored by the Prefect server, and a resume reschedules the run on any worker, which replays the flow
(earlier inputs come back from the server in order) and records the decisions. A killed worker therefore
loses nothing: the run waits, Scheduled, until a worker is back. Called directly (no deployment), Prefect
cannot suspend: the flow pauses and its process must stay alive until someone resumes it.

Input that does not fit the schema (unknown verdict, no decisions) is refused by the Prefect server and the
run stays suspended. Input that fits the schema but not the audit (pairs that are not candidates, a pair
twice, a blank reviewer) is refused here: the run waits again with the reason at the top of the form and the
artifact, and the form keeps the reviewer and the decisions that were valid.

``review_pull`` records the ``culprit`` assessments reviewers added in the MLflow UI (the ``review-pull``
deployment runs it on a short schedule).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.states import Failed

from tasks.paths import resolve_home
from tasks.review.decisions import (
    FORM_TOP,
    ReviewDecision,
    ReviewInput,
    check_review_input,
    publish_review_form,
    valid_decisions_task,
)
from tasks.review.pull import pull_reviews_task
from tasks.review.runs import submit_review_task


def _deployed() -> bool:
    ctx = FlowRunContext.get()
    return bool(ctx and ctx.flow_run and ctx.flow_run.deployment_id)


@flow(name="review_audit", log_prints=True)
def review_audit(audit_id: str, home: str | None = None, timeout_s: int = 7 * 24 * 3600,
                 poll_interval_s: int = 10, form_top: int = FORM_TOP) -> dict[str, Any]:
    """Wait (up to ``timeout_s`` per wait) for one reviewer's decisions on audit ``audit_id``; returns the
    review state after recording them (status, counts, reviewers, MLflow run id). The form shows the top
    ``form_top`` candidates of each query with their current verdicts (marks made in MLflow are pulled first;
    later pulls and submissions refresh it while it waits). ``poll_interval_s`` only applies when run without a
    deployment (paused, not suspended)."""
    log = get_run_logger()
    h = str(resolve_home(home))
    pulled = pull_reviews_task(h, audit_id, None, if_changed=True, return_state=True)
    if pulled.is_failed():  # MLflow unreachable or the audit has no run: the form shows the decisions on disk
        log.warning(f"marks in MLflow not pulled before the form: {pulled.message}")
    deployed = _deployed()
    if not deployed:
        log.warning("not run from a deployment: pausing (this process must stay alive until a reviewer "
                    "answers); deploy `review` (prefect.yaml) to wait suspended, holding no process")
    message, reviewer = "", ""
    kept: list[ReviewDecision] = []
    while True:
        form = publish_review_form(h, audit_id, message, form_top)
        wanted = ReviewInput.with_initial_data(description=form, reviewer=reviewer, decisions=kept) if message \
            else ReviewInput.with_initial_data(description=form)
        try:
            if deployed:
                answer = suspend_flow_run(wait_for_input=wanted, timeout=timeout_s)
            else:
                answer = pause_flow_run(wait_for_input=wanted, timeout=timeout_s, poll_interval=poll_interval_s)
        except FlowPauseTimeout:
            why = (f"no reviewer answered within {timeout_s} s: nothing was recorded and the review of audit "
                   f"{audit_id} stays open (start another review run, or review in the MLflow UI or with "
                   f"`influence-audit review submit`)")
            log.warning(why)
            return Failed(message=why)  # an end without a traceback: nothing went wrong but the wait
        message = check_review_input(h, audit_id, answer.reviewer, answer.decisions) or ""
        if not message:
            return submit_review_task(h, audit_id, answer.reviewer, answer.decisions)
        reviewer = answer.reviewer
        kept = valid_decisions_task(h, audit_id, answer.decisions)
        log.warning(f"review input refused, waiting again (keeping {len(kept)} valid decisions): {message}")


@flow(name="review_pull", log_prints=True)
def review_pull(home: str | None = None, audit_id: str | None = None,
                tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Record the ``culprit`` assessments made in MLflow since the last pull, for one audit or all of them; an
    audit whose marks did not change (one cheap search, tasks/review/pull.py) is skipped. Audits that could not
    be pulled are listed with their error (and the flow run fails, so it shows)."""
    log = get_run_logger()
    results = pull_reviews_task(str(resolve_home(home)), audit_id, tracking_uri, if_changed=True)
    failed = [r for r in results if "error" in r]
    unchanged = sum(bool(r.get("unchanged")) for r in results)
    if unchanged:
        log.info(f"{unchanged} of {len(results)} audit(s) unchanged since the last pull")
    for r in results:
        if r.get("unchanged"):
            continue
        if "error" in r:
            log.error(f"audit {r['audit_id']}: {r['error']}")
        else:
            log.info(f"audit {r['audit_id']}: {r['recorded']} decision(s) recorded from {r['marks']} mark(s), "
                     f"review {r['status']}" + (f"; refused: {'; '.join(r['refused'])}" if r["refused"] else ""))
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} audit(s) not pulled: "
                           + "; ".join(f"{r['audit_id']}: {r['error']}" for r in failed))
    return results
