"""Named reviewers on an MLflow server with authentication: the logged-in account becomes the assessment's source.

Runs inside ``mlflow server --app-name basic-auth`` (never in our clients), named in the auth config file as its
authorization function::

    [mlflow]
    authorization_function = tasks.record.reviewer_auth:authenticate

Why it is needed (read in MLflow 3.17.2's source): basic-auth checks the user and the experiment permission of
every request, but it stores who made an assessment nowhere. The assessment row keeps only the ``source_id`` the
client sent, and the UI sends the constant ``"User"`` (its ``getUser()`` returns ``"User"`` in the OSS build),
so every mark made in the UI looks alike. This function authenticates exactly as basic-auth does
(:func:`mlflow.server.auth.authenticate_request_basic_auth`) and then, on a request that *creates* an assessment
(``POST .../traces/<trace id>/assessments``, the UI's "Create" and its edits, which MLflow records as a new
assessment that overrides the old one), writes the authenticated user name into the assessment before MLflow
stores it: as ``source.source_id`` of a HUMAN assessment, and as the metadata ``influence_audit.account`` of every
assessment. A client cannot claim another reviewer's name: what it sent as ``source_id`` is replaced (kept in
the metadata ``influence_audit.claimed_source_id`` when it differed). Updates in place (PATCH) keep the creator's
name: the UI only makes them on one's own assessments.

Failed authentication is answered by basic-auth itself (401); permissions are checked after this function, by
basic-auth, as without it.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["ACCOUNT_KEY", "CLAIMED_KEY", "authenticate", "stamp_assessment"]

ACCOUNT_KEY = "influence_audit.account"
CLAIMED_KEY = "influence_audit.claimed_source_id"
# v3: /ajax-api/3.0/mlflow/traces/<trace>/assessments; v4: .../4.0/mlflow/traces/<location>/<trace>/assessments
_CREATE = re.compile(r"/mlflow/traces/(?:[^/]+/)?[^/]+/assessments/?$")


def stamp_assessment(body: Any, username: str) -> bool:
    """Write ``username`` into a CreateAssessment request body (a dict, changed in place); False when the body is
    not one (then it is left alone and MLflow answers it as usual)."""
    assessment = body.get("assessment") if isinstance(body, dict) else None
    if not isinstance(assessment, dict):
        return False
    source = assessment.get("source")
    if not isinstance(source, dict):
        source = assessment["source"] = {"source_type": "HUMAN"}
    metadata = assessment.get("metadata")
    if not isinstance(metadata, dict):
        metadata = assessment["metadata"] = {}
    metadata[ACCOUNT_KEY] = username
    if str(source.get("source_type", "HUMAN")).upper() == "HUMAN":
        claimed = source.get("source_id")
        if claimed and claimed != username:
            metadata[CLAIMED_KEY] = str(claimed)
        source["source_id"] = username
    return True


def authenticate() -> Any:
    """basic-auth's own check; on success, a created assessment carries the authenticated user (module doc)."""
    from flask import request
    from mlflow.server.auth import authenticate_request_basic_auth
    from werkzeug.datastructures import Authorization

    result = authenticate_request_basic_auth()
    if isinstance(result, Authorization) and request.method == "POST" and _CREATE.search(request.path):
        # Flask caches the parsed body: the handler's get_json() returns this same dict, stamped.
        stamp_assessment(request.get_json(force=True, silent=True), result.username)
    return result
