"""The review flow: show an audit's candidates, pause for a reviewer's typed input, record the decisions.

The input form (``ReviewInput``: reviewer + decisions) is rendered by the Prefect UI on the paused run;
input that does not fit the schema (unknown verdict, no reviewer, no decisions) is refused by the server
and the run stays paused. Input that fits the schema but not the audit (pairs that are not candidates)
is refused here: the run pauses again with the reason shown in the form and the markdown artifact.
Pausing needs a shared Prefect server (``PREFECT_API_URL``), not a temporary one.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.flow_runs import pause_flow_run

from tasks.review import ReviewInput, check_review_input, publish_review_form, resolve_home, submit_review_task


@flow(name="review_audit", log_prints=True)
def review_audit(audit_id: str, home: str | None = None, timeout_s: int = 7 * 24 * 3600,
                 poll_interval_s: int = 10) -> dict[str, Any]:
    """Wait (up to ``timeout_s`` per pause) for one reviewer's decisions on audit ``audit_id``; returns
    the review state after recording them (status, counts, reviewers, MLflow run id)."""
    log = get_run_logger()
    h = str(resolve_home(home))
    message = ""
    while True:
        form = publish_review_form(h, audit_id, message)
        answer = pause_flow_run(wait_for_input=ReviewInput.with_initial_data(description=form),
                                timeout=timeout_s, poll_interval=poll_interval_s)
        message = check_review_input(h, audit_id, answer.reviewer, answer.decisions) or ""
        if not message:
            return submit_review_task(h, audit_id, answer.reviewer, answer.decisions)
        log.warning(f"review input refused, pausing again: {message}")
